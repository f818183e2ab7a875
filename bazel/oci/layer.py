"""Writes one reproducible image layer (.tar.gz) from a JSON spec written by //bazel/oci rules.

Spec keys (all optional):
  files:    [{"dest": "/app/x.py", "src": exec path, "short": runfiles path, "mode": 0o644}]
  debs:     [{"src": ..., "short": ...}]        .deb files whose data.tar is unpacked
  deb_exclude: [fnmatch patterns]               paths (no leading /) dropped from the .debs
  deb_keep: [fnmatch patterns]                  exceptions to deb_exclude
  merged_usr: bool                              /bin, /lib, ... of the .debs go to /usr (bookworm's layout)
  contents: {"/etc/passwd": "text"}             small generated files (mode 0644)
  symlinks: {"/path": "target"}
  dirs:     ["/path"]                           empty directories (mode 0755)
  compile:  ["/usr/lib/python3.11", "/app"]    every .py below these also gets a .pyc and an .opt-2.pyc

Reproducible by construction: entries sorted by path, parents before children, uid/gid 0,
mtime 0, no world-writable bits, hard links stored as copies, PAX headers only where a name
needs one, gzip without name or time at a fixed level. The .pyc files are hash-based and
unchecked (PEP 552): they do not depend on file times, never go stale in an immutable image,
and let a read-only root filesystem run without writing bytecode.
"""

import argparse
import fnmatch
import gzip
import importlib.util
import io
import json
import lzma
import marshal
import os
import posixpath
import stat
import sys
import tarfile
from collections.abc import Callable
from types import CodeType
from typing import Any

from bazel.oci.layout import OciError

GZIP_LEVEL = 6
MERGED_USR_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
STATUS_DIR = "var/lib/dpkg/status.d"
# The flags word of a PEP 552 .pyc: bit 0 = hash-based, bit 1 = check the source (off: unchecked).
PYC_HASH_BASED_UNCHECKED = 0b01
# The .pyc files written for each module: plain, and -OO's (no asserts, no docstrings), which the
# image runs with (PYTHONOPTIMIZE=2). Python looks for the one of its own level only.
PYC_LEVELS = ((0, ""), (2, ".opt-2"))

# A spec's file or deb item -> the path to read it from.
Resolve = Callable[[dict[str, Any]], str]


class Entry:
    __slots__ = ("data", "kind", "linkname", "mode")

    def __init__(self, kind: bytes, mode: int = 0o755, data: bytes = b"", linkname: str = "") -> None:
        self.kind, self.mode, self.data, self.linkname = kind, mode, data, linkname


class Tree:
    """The layer's file system: normalized path (no leading /) -> Entry."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        while parent and parent not in self.entries:
            self.entries[parent] = Entry(tarfile.DIRTYPE, 0o755)
            parent = posixpath.dirname(parent)

    def add(self, path: str, entry: Entry, origin: str) -> None:
        path = posixpath.normpath(path.lstrip("/"))
        if path in (".", "") or path.startswith(".."):
            raise OciError(f"layer: bad path {path!r} from {origin}")
        old = self.entries.get(path)
        if old is not None:
            if old.kind == entry.kind == tarfile.DIRTYPE:
                return
            if (old.kind, old.data, old.linkname) != (entry.kind, entry.data, entry.linkname):
                raise OciError(f"layer: {origin} puts a different /{path} where one already is")
        self._parents(path)
        self.entries[path] = entry

    def write(self, out: io.BufferedIOBase) -> None:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                entry = self.entries[path]
                info = tarfile.TarInfo(path)
                info.type = entry.kind
                info.mode = entry.mode & 0o7755  # never world-writable
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                if entry.kind == tarfile.SYMTYPE:
                    info.linkname = entry.linkname
                    tar.addfile(info)
                elif entry.kind == tarfile.REGTYPE:
                    info.size = len(entry.data)
                    tar.addfile(info, io.BytesIO(entry.data))
                else:
                    tar.addfile(info)


def read_ar(path: str) -> dict[str, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"!<arch>\n"):
        raise OciError(f"layer: {path} is not a .deb (ar archive)")
    members: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return members


def decompress(name: str, data: bytes) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".tar"):
        return data
    raise OciError(f"layer: cannot unpack {name} (only xz, gzip and plain tar are supported)")


def member(members: dict[str, bytes], stem: str, deb: str) -> tuple[str, bytes]:
    for name, data in members.items():
        if name.startswith(stem):
            return name, decompress(name, data)
    raise OciError(f"layer: {deb} has no {stem}")


def extract(tar: tarfile.TarFile, info: tarfile.TarInfo, deb: str) -> bytes:
    f = tar.extractfile(info)
    if f is None:
        raise OciError(f"layer: {deb}: {info.name} is not a regular file")
    return f.read()


def add_deb(tree: Tree, deb: str, spec: dict[str, Any]) -> None:
    members = read_ar(deb)
    _, control_tar = member(members, "control.tar", deb)
    with tarfile.open(fileobj=io.BytesIO(control_tar)) as tar:
        control = extract(tar, tar.getmember("./control"), deb)
    package = next(
        line.split(":", 1)[1].strip() for line in control.decode().splitlines() if line.startswith("Package:")
    )
    # What scanners (Trivy, Grype, syft) read to list the packages of a distroless image.
    tree.add(f"{STATUS_DIR}/{package}", Entry(tarfile.REGTYPE, 0o644, control), deb)

    exclude, keep = spec.get("deb_exclude", []), spec.get("deb_keep", [])
    merged = spec.get("merged_usr", False)
    _, data_tar = member(members, "data.tar", deb)
    with tarfile.open(fileobj=io.BytesIO(data_tar)) as tar:
        infos = tar.getmembers()
        by_name = {posixpath.normpath(i.name): i for i in infos}
        for info in infos:
            path = posixpath.normpath(info.name)
            if path == ".":
                continue
            if any(fnmatch.fnmatchcase(path, p) for p in exclude) and not any(
                fnmatch.fnmatchcase(path, p) for p in keep
            ):
                continue
            if merged and path.split("/", 1)[0] in MERGED_USR_DIRS:
                path = "usr/" + path
            if info.isdir():
                tree.add(path, Entry(tarfile.DIRTYPE, info.mode), deb)
            elif info.issym():
                tree.add(path, Entry(tarfile.SYMTYPE, 0o777, linkname=info.linkname), deb)
            elif info.islnk():
                target = by_name[posixpath.normpath(info.linkname)]
                tree.add(path, Entry(tarfile.REGTYPE, target.mode, extract(tar, target, deb)), deb)
            elif info.isfile():
                tree.add(path, Entry(tarfile.REGTYPE, info.mode, extract(tar, info, deb)), deb)
            else:
                raise OciError(f"layer: {deb}: unsupported entry type for /{path}")


def merged_usr_links(tree: Tree) -> None:
    for name in MERGED_USR_DIRS:
        if f"usr/{name}" in tree.entries:
            tree.add(name, Entry(tarfile.SYMTYPE, 0o777, linkname=f"usr/{name}"), "merged /usr")


def hash_based_pyc(source: bytes, code: CodeType) -> bytes:
    """An unchecked hash-based .pyc (PEP 552): magic, flags, the source's hash, the marshalled code."""
    return (
        importlib.util.MAGIC_NUMBER
        + PYC_HASH_BASED_UNCHECKED.to_bytes(4, "little")
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def compile_pyc(tree: Tree, prefixes: list[str]) -> None:
    if sys.version_info[:2] != (3, 11):
        raise OciError(f"layer: .pyc files for the image's Python 3.11 need Python 3.11 here, not {sys.version}")
    prefixes = [p.strip("/") + "/" for p in prefixes]
    for path in sorted(tree.entries):
        if not path.endswith(".py") or not any(path.startswith(p) for p in prefixes):
            continue
        source = regular_file(tree, path)
        if source is None:
            continue
        directory, name = posixpath.split(path)
        for optimize, suffix in PYC_LEVELS:
            try:
                code = compile(source, "/" + path, "exec", dont_inherit=True, optimize=optimize)
            except SyntaxError:
                break  # e.g. lib2to3's test data: Python 2 files that are never imported
            target = f"{directory}/__pycache__/{name[:-3]}.{sys.implementation.cache_tag}{suffix}.pyc"
            tree.add(target, Entry(tarfile.REGTYPE, 0o644, hash_based_pyc(source, code)), "compile")


def regular_file(tree: Tree, path: str) -> bytes | None:
    """The data of the regular file at `path`, following symbolic links within the layer (Debian's
    /usr/lib/python3.11/sitecustomize.py -> /etc/python3.11/sitecustomize.py): Python finds the
    .pyc next to the name it imported, not next to the link's target."""
    for _ in range(8):
        entry = tree.entries.get(path)
        if entry is None or entry.kind == tarfile.REGTYPE:
            return entry.data if entry is not None else None
        if entry.kind != tarfile.SYMTYPE:
            return None
        link = entry.linkname
        path = posixpath.normpath(
            link.lstrip("/") if link.startswith("/") else posixpath.join(posixpath.dirname(path), link)
        )
    return None


def build(spec: dict[str, Any], resolve: Resolve) -> Tree:
    tree = Tree()
    for deb in spec.get("debs", []):
        add_deb(tree, resolve(deb), spec)
    if spec.get("merged_usr"):
        merged_usr_links(tree)
    for item in spec.get("files", []):
        path = resolve(item)
        with open(path, "rb") as f:
            data = f.read()
        mode = item.get("mode")
        if mode is None:
            mode = 0o755 if os.stat(path).st_mode & stat.S_IXUSR else 0o644
        tree.add(item["dest"], Entry(tarfile.REGTYPE, mode, data), path)
    for dest, text in spec.get("contents", {}).items():
        tree.add(dest, Entry(tarfile.REGTYPE, 0o644, text.encode()), "contents")
    for dest, target in spec.get("symlinks", {}).items():
        tree.add(dest, Entry(tarfile.SYMTYPE, 0o777, linkname=target), "symlinks")
    for dest in spec.get("dirs", []):
        tree.add(dest, Entry(tarfile.DIRTYPE, 0o755), "dirs")
    if spec.get("compile"):
        compile_pyc(tree, spec["compile"])
    return tree


def write_layer(tree: Tree, output: str) -> None:
    with (
        open(output, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz,
    ):
        tree.write(gz)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--inputs_root",
        help="resolve inputs by their runfiles path below this directory (tests) instead of their exec path",
    )
    args = parser.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    inputs_root: str | None = args.inputs_root

    def resolve(item: dict[str, Any]) -> str:
        return os.path.normpath(os.path.join(inputs_root, item["short"])) if inputs_root else item["src"]

    try:
        write_layer(build(spec, resolve), args.output)
    except OciError as error:
        sys.exit(str(error))


if __name__ == "__main__":
    main()
