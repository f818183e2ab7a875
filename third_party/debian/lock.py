"""Resolves packages.ini against Debian's archive and writes packages.lock.json.

Run with `tools/bazel run //third_party/debian:lock`. For every architecture it reads the
signed InRelease of each configured suite (checked with gpgv against Debian's archive keyring
when that is installed), the Packages index it lists (checked against the hash in InRelease),
takes the highest version of each package across the suites, and follows Depends and
Pre-Depends from the [packages] of packages.ini. A dependency that is neither in [packages]
nor in [excluded] is an error, so every package of the image is explained in packages.ini.
The lock pins, per architecture, each package's version, .deb URL, size and sha256; the
`debian_packages` repository rule (//bazel:debian.bzl) downloads exactly those. Each package
also gets a snapshot.debian.org URL of its archive as of its suite's InRelease Date: the pool
of the security and updates suites drops a version once it is superseded, snapshot keeps it.
"""

import configparser
import datetime
import email.utils
import hashlib
import json
import lzma
import os
import pathlib
import re
import shutil
import subprocess
import sys
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
FIELDS = ("Package", "Version", "Architecture", "Depends", "Pre-Depends", "Provides", "Filename", "SHA256", "Size")


# Debian version comparison (Debian Policy 5.6.12) -----------------------------------------------


def _order(char: str) -> int:
    if char == "~":
        return -1
    if char.isdigit():
        return 0
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def found(match: re.Match[str] | None, what: str) -> re.Match[str]:
    """`match`, or exit saying the text lacks `what`."""
    if match is None:
        sys.exit(f"lock: no {what}")
    return match


def _compare_part(a: str, b: str) -> int:
    while a or b:
        a_text = found(re.match(r"[^\d]*", a), "text").group()
        b_text = found(re.match(r"[^\d]*", b), "text").group()
        for i in range(max(len(a_text), len(b_text))):
            ca = _order(a_text[i]) if i < len(a_text) else 0
            cb = _order(b_text[i]) if i < len(b_text) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(a_text) :], b[len(b_text) :]
        a_num = found(re.match(r"\d*", a), "digits").group()
        b_num = found(re.match(r"\d*", b), "digits").group()
        if int(a_num or 0) != int(b_num or 0):
            return -1 if int(a_num or 0) < int(b_num or 0) else 1
        a, b = a[len(a_num) :], b[len(b_num) :]
    return 0


def compare_versions(a: str, b: str) -> int:
    def split(version: str) -> tuple[int, str, str]:
        epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def satisfies(version: str, op: str, wanted: str) -> bool:
    c = compare_versions(version, wanted)
    return {"<<": c < 0, "<=": c <= 0, "=": c == 0, ">=": c >= 0, ">>": c > 0}[op]


# The archive -------------------------------------------------------------------------------------


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def signed_release(base: str, suite: str, keyring: str) -> str:
    """InRelease's text, its signature checked when gpgv and the keyring are there."""
    data = fetch(f"{base}/dists/{suite}/InRelease")
    if shutil.which("gpgv") and os.path.exists(keyring):
        result = subprocess.run(
            ["gpgv", "--quiet", "--keyring", keyring, "--output", "-", "-"],
            input=data,
            capture_output=True,
        )
        if result.returncode != 0:
            sys.exit(f"lock: bad signature on {base}/dists/{suite}/InRelease:\n{result.stderr.decode()}")
        return result.stdout.decode()
    print(f"lock: WARNING: gpgv or {keyring} missing; {suite}'s InRelease signature NOT checked", file=sys.stderr)
    text = data.decode()
    return text.split("\n\n", 1)[1].split("-----BEGIN PGP SIGNATURE-----")[0]


def snapshot_base(base: str, release: str) -> str:
    """The snapshot.debian.org URL of the archive at `base` in the state its InRelease describes."""
    date = email.utils.parsedate_to_datetime(
        found(re.search(r"^Date: (.*)$", release, re.M), "Date in InRelease").group(1)
    )
    date = date.astimezone(datetime.UTC)
    archive = base.rstrip("/").rsplit("/", 1)[1]
    return f"https://snapshot.debian.org/archive/{archive}/{date.strftime('%Y%m%dT%H%M%SZ')}"


def packages_index(base: str, suite: str, component: str, arch: str, keyring: str) -> list[dict]:
    release = signed_release(base, suite, keyring)
    snapshot = snapshot_base(base, release)
    path = f"{component}/binary-{arch}/Packages.xz"
    sha256 = found(re.search(r"^SHA256:\n((?: .*\n)+)", release, re.M), "SHA256 in InRelease").group(1)
    digest = next((line.split()[0] for line in sha256.splitlines() if line.split()[2] == path), None)
    if digest is None:
        sys.exit(f"lock: {suite}'s InRelease does not list {path}")
    data = fetch(f"{base}/dists/{suite}/{path}")
    if hashlib.sha256(data).hexdigest() != digest:
        sys.exit(f"lock: {base}/dists/{suite}/{path} does not match the hash in InRelease")
    packages = []
    for stanza in lzma.decompress(data).decode().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace():
                key, _, value = line.partition(":")
                if key in FIELDS:
                    fields[key] = value.strip()
        if "Package" in fields:
            fields["url"] = f"{base}/{fields['Filename']}"
            fields["snapshot_url"] = f"{snapshot}/{fields['Filename']}"
            fields["suite"] = suite
            packages.append(fields)
    return packages


def parse_relations(text: str) -> list[list[tuple[str, str | None, str | None]]]:
    """'a (>= 1) | b, c:any' -> [[('a', '>=', '1'), ('b', None, None)], [('c', None, None)]]."""
    groups = []
    for group in filter(None, (g.strip() for g in text.split(","))):
        alternatives = []
        for alt in group.split("|"):
            m = found(
                re.match(r"\s*([^\s(:\[]+)(?::\S+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?", alt), f"relation in {alt!r}"
            )
            alternatives.append((m.group(1), m.group(2), m.group(3)))
        groups.append(alternatives)
    return groups


# Resolution --------------------------------------------------------------------------------------


def resolve(index: list[dict], wanted: dict[str, str], excluded: dict[str, str], arch: str) -> list[dict]:
    newest: dict[str, dict] = {}
    providers: dict[str, list[str]] = {}
    for pkg in index:
        name = pkg["Package"]
        if name not in newest or compare_versions(pkg["Version"], newest[name]["Version"]) > 0:
            newest[name] = pkg
        for provided in parse_relations(pkg.get("Provides", "")):
            providers.setdefault(provided[0][0], []).append(name)

    chosen: dict[str, dict] = {}
    reasons: dict[str, str] = {}
    queue = [(name, "listed in packages.ini") for name in wanted]
    while queue:
        name, why = queue.pop(0)
        if name in chosen:
            continue
        if name not in newest:
            sys.exit(f"lock: {name} ({why}) is not in the archive for {arch}")
        pkg = chosen[name] = newest[name]
        reasons[name] = why
        relations = parse_relations(pkg.get("Pre-Depends", "")) + parse_relations(pkg.get("Depends", ""))
        for group in relations:
            names = [alt[0] for alt in group]
            if any(n in excluded for n in names) and not any(n in wanted for n in names):
                continue
            candidates = [alt for alt in group if alt[0] in newest or alt[0] in providers]
            if not candidates:
                sys.exit(f"lock: {name}: no package satisfies {' | '.join(names)} on {arch}")
            dep, op, version = next((alt for alt in candidates if alt[0] in chosen or alt[0] in wanted), candidates[0])
            if dep not in newest:
                dep = providers[dep][0]
            elif op and version is not None and not satisfies(newest[dep]["Version"], op, version):
                sys.exit(f"lock: {name} needs {dep} ({op} {version}), the archive has {newest[dep]['Version']}")
            if dep not in wanted:
                sys.exit(
                    f"lock: {name} depends on {dep}, which packages.ini neither lists nor excludes; "
                    f"add it to [packages] (with the reason it is needed) or to [excluded]"
                )
            queue.append((dep, f"dependency of {name}"))
    return [chosen[name] for name in sorted(chosen)]


def main() -> None:
    config = configparser.ConfigParser()
    config.read(HERE / "packages.ini")
    wanted = dict(config["packages"])
    excluded = dict(config["excluded"])
    archive = config["archive"]
    keyring = archive.get("keyring", "")
    sources = [line.split() for line in archive["sources"].strip().splitlines()]
    packages: dict[str, list[dict[str, str | int]]] = {}
    lock = {
        "comment": "Generated by `tools/bazel run //third_party/debian:lock` from packages.ini; do not edit.",
        "sources": [" ".join(s) for s in sources],
        "packages": packages,
    }
    for arch in archive["architectures"].split():
        index = []
        for base, suite, *components in sources:
            for component in components:
                print(f"lock: reading {base} {suite}/{component} {arch}", file=sys.stderr)
                index.extend(packages_index(base, suite, component, arch, keyring))
        resolved = resolve(index, wanted, excluded, arch)
        packages[arch] = [
            {
                "name": pkg["Package"],
                "version": pkg["Version"],
                "arch": pkg["Architecture"],
                "suite": pkg["suite"],
                "url": pkg["url"],
                "snapshot_url": pkg["snapshot_url"],
                "sha256": pkg["SHA256"],
                "size": int(pkg["Size"]),
            }
            for pkg in resolved
        ]
        unused = sorted(set(wanted) - {p["Package"] for p in resolved})
        if unused:
            sys.exit(f"lock: [packages] lists {unused}, which nothing needs on {arch}")
    workspace = pathlib.Path(os.environ.get("BUILD_WORKSPACE_DIRECTORY", HERE.parent.parent))
    out = workspace / "third_party" / "debian" / "packages.lock.json"
    out.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    for arch, pkgs in packages.items():
        print(f"lock: {arch}: " + ", ".join(f"{p['name']} {p['version']}" for p in pkgs), file=sys.stderr)
    print(f"lock: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
