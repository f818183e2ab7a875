"""OCI image layouts (https://github.com/opencontainers/image-spec/blob/main/image-layout.md).

Shared by the oci_* tools: content-addressed blobs under blobs/sha256/, index.json at the top.
"""

import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
from typing import Any

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_INDEX = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (INDEX, DOCKER_INDEX)

# A descriptor (mediaType, digest, size, ...) and a platform (os, architecture[, variant]), as in JSON.
Descriptor = dict[str, Any]
Platform = dict[str, str]


class OciError(Exception):
    """A bad input, layout or registry answer: the oci_* tools' main() prints the message and exits 1."""


_MACHINES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
}


def tool_parser(doc: str) -> argparse.ArgumentParser:
    """The command line shared by the `bazel run` tools: their docstring as help, and the
    image layout their generated launcher passes as --image."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n", 2)[2],
    )
    parser.add_argument("--image", required=True, help=argparse.SUPPRESS)
    return parser


def canonical_json(value: object) -> bytes:
    """The one serialization used for every manifest, index and config: stable bytes, stable digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def gunzip_sha256(path: str) -> str:
    """The diff_id of a gzipped layer: the sha256 of the uncompressed tar."""
    digest = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def host_platform() -> Platform:
    machine = platform.machine()
    if machine not in _MACHINES:
        raise OciError(f"no OCI platform known for this machine ({machine})")
    arch, variant = _MACHINES[machine]
    return {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}


def parse_platform(text: str) -> Platform:
    """'linux/arm64' or 'linux/arm64/v8' -> a platform dict."""
    parts = text.split("/")
    if len(parts) not in (2, 3):
        raise OciError(f"bad platform {text!r}: expected os/arch[/variant]")
    return {"os": parts[0], "architecture": parts[1], **({"variant": parts[2]} if len(parts) == 3 else {})}


def platform_matches(have: Platform, want: Platform) -> bool:
    if have.get("os") != want["os"] or have.get("architecture") != want["architecture"]:
        return False
    # arm64 images often omit the (implied) v8 variant.
    return "variant" not in want or have.get("variant", want["variant"]) == want["variant"]


class Layout:
    """An OCI image layout directory."""

    def __init__(self, root: str) -> None:
        self.root = root

    @classmethod
    def create(cls, root: str) -> "Layout":
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "wb") as f:
            f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))
        return cls(root)

    def blob_path(self, digest: str) -> str:
        algorithm, _, hexdigest = digest.partition(":")
        return os.path.join(self.root, "blobs", algorithm, hexdigest)

    def read_json(self, digest: str) -> Any:
        with open(self.blob_path(digest), "rb") as f:
            return json.load(f)

    def index(self) -> dict[str, Any]:
        with open(os.path.join(self.root, "index.json"), "rb") as f:
            return json.load(f)

    def write_bytes(self, data: bytes, media_type: str, **extra: Any) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def write_json(self, value: object, media_type: str, **extra: Any) -> Descriptor:
        return self.write_bytes(canonical_json(value), media_type, **extra)

    def add_file(self, path: str, media_type: str) -> Descriptor:
        digest, size = sha256_file(path)
        target = self.blob_path(digest)
        if not os.path.exists(target):
            shutil.copyfile(path, target)
        return {"mediaType": media_type, "digest": digest, "size": size}

    def copy_blob(self, other: "Layout", digest: str) -> None:
        target = self.blob_path(digest)
        if not os.path.exists(target):
            shutil.copyfile(other.blob_path(digest), target)

    def write_index(self, manifests: list[Descriptor]) -> None:
        with open(os.path.join(self.root, "index.json"), "wb") as f:
            f.write(canonical_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}))

    def finish(self, top: Descriptor, digest_file: str | None) -> None:
        """Makes `top` the layout's one entry point, and writes its digest if asked."""
        self.write_index([top])
        if digest_file:
            with open(digest_file, "w") as f:
                f.write(top["digest"])

    # Reading ----------------------------------------------------------------------------------

    def top(self) -> Descriptor:
        """The one descriptor index.json points at (an image manifest or an image index)."""
        manifests = self.index()["manifests"]
        if len(manifests) != 1:
            raise OciError(f"{self.root}: expected one manifest in index.json, found {len(manifests)}")
        return manifests[0]

    def images(self, descriptor: Descriptor | None = None) -> list[tuple[Platform, Descriptor]]:
        """(platform, manifest descriptor) of every image manifest below the descriptor."""
        descriptor = descriptor or self.top()
        if descriptor["mediaType"] in INDEX_TYPES:
            found: list[tuple[Platform, Descriptor]] = []
            for child in self.read_json(descriptor["digest"])["manifests"]:
                found.extend(self.images(child))
            return found
        manifest = self.read_json(descriptor["digest"])
        config = self.read_json(manifest["config"]["digest"])
        plat = {"os": config["os"], "architecture": config["architecture"]}
        if config.get("variant"):
            plat["variant"] = config["variant"]
        return [(plat, descriptor)]

    def select(self, want: Platform) -> Descriptor:
        """The manifest descriptor for one platform."""
        images = self.images()
        for plat, descriptor in images:
            if platform_matches(plat, want):
                return descriptor
        have = ", ".join("/".join(filter(None, (p["os"], p["architecture"], p.get("variant")))) for p, _ in images)
        raise OciError(f"{self.root}: no image for {'/'.join(want.values())} (has {have})")

    def blobs_of(self, descriptor: Descriptor) -> list[Descriptor]:
        """Every descriptor reachable from this one, children before parents (push order)."""
        found: list[Descriptor] = []
        if descriptor["mediaType"] in INDEX_TYPES:
            for child in self.read_json(descriptor["digest"])["manifests"]:
                found.extend(self.blobs_of(child))
        elif descriptor["mediaType"] in (MANIFEST, DOCKER_MANIFEST):
            manifest = self.read_json(descriptor["digest"])
            found.append(manifest["config"])
            found.extend(manifest["layers"])
        found.append(descriptor)
        return found
