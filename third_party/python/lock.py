"""Resolves requirements.in and writes requirements_lock.json.

Run with `tools/bazel run //third_party/python:lock`. pip resolves the dependency closure for
CPython 3.11 on Linux; then PyPI's simple index supplies, for each pinned version, the wheel
and its sha256 for every platform the image is built for.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import urllib.request

from pip._vendor.packaging.requirements import Requirement

INDEX = "https://pypi.org/simple"
PYTHON = (3, 11)
GLIBC_MAX = (2, 36)  # Debian bookworm
PLATFORMS = {"linux_x86_64": "x86_64", "linux_aarch64": "aarch64"}
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def resolve(requirements: pathlib.Path) -> dict[str, dict]:
    """Returns {name: {version, deps}} for the closure of the requirements."""
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp, "report.json")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--isolated",
                "--quiet",
                "--dry-run",
                "--ignore-installed",
                "--only-binary=:all:",
                "--index-url",
                INDEX,
                "--report",
                str(report),
                "-r",
                str(requirements),
            ],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    names = {normalize(i["metadata"]["name"]) for i in installs}
    resolved = {}
    for item in installs:
        meta = item["metadata"]
        deps = set()
        for spec in meta.get("requires_dist", []):
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                deps.add(normalize(req.name))
        resolved[normalize(meta["name"])] = {
            "version": meta["version"],
            "deps": sorted(deps & names),
        }
    return resolved


def platform_rank(tag: str, arch: str) -> tuple[int, int] | None:
    """Higher is better; None if the platform tag cannot run on Linux `arch` with our glibc."""
    if tag == "any":
        return (0, 0)
    if m := re.fullmatch(rf"manylinux_(\d+)_(\d+)_{arch}", tag):
        glibc = (int(m.group(1)), int(m.group(2)))
    elif m := re.fullmatch(rf"(manylinux\d+)_{arch}", tag):
        glibc = LEGACY_MANYLINUX.get(m.group(1), (99, 0))
    else:
        return None
    return (1, glibc[0] * 1000 + glibc[1]) if glibc <= GLIBC_MAX else None


def abi_rank(python_tag: str, abi_tag: str) -> int | None:
    cp = f"cp{PYTHON[0]}{PYTHON[1]}"
    pythons = python_tag.split(".")
    if cp in pythons and abi_tag == cp:
        return 3
    if abi_tag == "abi3" and any(p.startswith("cp3") and int(p[3:]) <= PYTHON[1] for p in pythons):
        return 2
    if abi_tag == "none" and ({"py3", f"py{PYTHON[0]}{PYTHON[1]}", cp} & set(pythons)):
        return 1
    return None


def pick_wheels(name: str, version: str) -> dict[str, dict]:
    request = urllib.request.Request(
        f"{INDEX}/{name.replace('_', '-')}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    best: dict[str, tuple] = {}
    for f in files:
        parts = f["filename"][: -len(".whl")].split("-") if f["filename"].endswith(".whl") else []
        if len(parts) not in (5, 6) or normalize(parts[0]) != name or parts[1] != version:
            continue
        if f.get("yanked"):
            continue
        python_tag, abi_tag, platform_tags = parts[-3:]
        abi = abi_rank(python_tag, abi_tag)
        if abi is None:
            continue
        for platform, arch in PLATFORMS.items():
            ranks = [r for t in platform_tags.split(".") if (r := platform_rank(t, arch))]
            if ranks:
                rank = (abi, max(ranks))
                if platform not in best or rank > best[platform][0]:
                    best[platform] = (rank, {"url": f["url"], "sha256": f["hashes"]["sha256"]})
    missing = set(PLATFORMS) - set(best)
    if missing:
        sys.exit(f"lock: {name}=={version} has no wheel for {', '.join(sorted(missing))}")
    return {platform: choice for platform, (_, choice) in sorted(best.items())}


def main() -> None:
    workspace = os.environ.get("BUILD_WORKSPACE_DIRECTORY")
    here = pathlib.Path(workspace, "third_party/python") if workspace else pathlib.Path(__file__).parent
    try:
        resolved = resolve(here / "requirements.in")
    except subprocess.CalledProcessError:
        sys.exit("lock: pip could not resolve requirements.in (its error is above)")
    packages = {}
    for name, info in sorted(resolved.items()):
        packages[name] = {**info, "wheels": pick_wheels(name, info["version"])}
        print(f"{name}=={info['version']}", file=sys.stderr)
    lock = {
        "comment": "Generated by `tools/bazel run //third_party/python:lock`; do not edit.",
        "python": f"{PYTHON[0]}.{PYTHON[1]}",
        "packages": packages,
    }
    (here / "requirements_lock.json").write_text(json.dumps(lock, indent=2) + "\n")


if __name__ == "__main__":
    main()
