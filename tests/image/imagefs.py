"""Reading a built OCI image without running it: its layouts, layers, files and ELF binaries."""

import gzip
import io
import json
import os
import posixpath
import struct
import tarfile
from typing import Any

from bazel.oci import layout as oci

WORKSPACE = "io_example_token_resource"
TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}
ELF_MACHINES = {"amd64": 62, "arm64": 183}  # EM_X86_64, EM_AARCH64


def runfile(path: str) -> str:
    root = os.environ.get("TEST_SRCDIR") or os.environ["RUNFILES_DIR"]
    return os.path.join(root, WORKSPACE, path)


def index_layout() -> oci.Layout:
    return oci.Layout(runfile("image_index"))


class ImageFS:
    """The merged file system of one image: path (no leading /) -> (TarInfo, bytes, layer number)."""

    arch: str  # set by the test that picked the image, for its messages

    def __init__(self, image: oci.Layout, descriptor: dict) -> None:
        self.manifest = image.read_json(descriptor["digest"])
        self.config = image.read_json(self.manifest["config"]["digest"])
        self.entries: dict[str, tuple[tarfile.TarInfo, bytes, int]] = {}
        for number, layer in enumerate(self.manifest["layers"]):
            with gzip.open(image.blob_path(layer["digest"])) as f:
                data = f.read()
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for info in tar:
                    member = tar.extractfile(info) if info.isfile() else None
                    content = member.read() if member is not None else b""
                    self.entries[posixpath.normpath(info.name)] = (info, content, number)

    def resolve(self, path: str, depth: int = 0) -> str | None:
        """The path with every symlink followed (absolute or relative); None if it dangles."""
        parts = [p for p in path.strip("/").split("/") if p]
        current = ""
        for part in parts:
            candidate = posixpath.join(current, part) if current else part
            entry = self.entries.get(candidate)
            if entry is None:
                return None
            info = entry[0]
            if info.issym():
                if depth > 40:
                    return None
                target = info.linkname
                base = "" if target.startswith("/") else posixpath.dirname(candidate)
                joined = posixpath.normpath(posixpath.join("/", base, target)).lstrip("/")
                resolved = self.resolve(joined, depth + 1)
                if resolved is None:
                    return None
                candidate = resolved
            current = candidate
        return current

    def file(self, path: str) -> tuple[tarfile.TarInfo, bytes] | None:
        resolved = self.resolve(path)
        if resolved is None or resolved not in self.entries:
            return None
        info, data, _ = self.entries[resolved]
        return (info, data) if info.isfile() else None

    def regular(self, path: str) -> tuple[tarfile.TarInfo, bytes]:
        """file(path), which the caller expects to be there."""
        found = self.file(path)
        assert found is not None, f"/{path}: no such regular file"
        return found

    def exists(self, path: str) -> bool:
        return self.resolve(path) is not None


def image_for(arch: str) -> ImageFS:
    image = index_layout()
    return ImageFS(image, image.select({"os": "linux", "architecture": arch}))


# ELF -----------------------------------------------------------------------------------------------


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def elf_info(data: bytes) -> dict:
    """Machine, PT_INTERP and DT_NEEDED of a 64-bit little-endian ELF file."""
    if data[4] != 2 or data[5] != 1:
        raise ValueError("not ELF64 little-endian")
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    interp = None
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            interp = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for sh in sections:
        if sh[1] != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, value = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                start = strtab[4] + value
                needed.append(data[start : data.index(b"\0", start)].decode())
    return {"machine": machine, "interp": interp, "needed": needed}


def json_blob(image: oci.Layout, digest: str) -> dict[str, Any]:
    with open(image.blob_path(digest), "rb") as f:
        return json.load(f)
