"""`bazel run` an oci_load target: loads one platform's image into podman or docker.

    bazel run //:image                                   host platform, default tags
    bazel run //:image -- --tag my/name:dev              other tag(s)
    bazel run //:image -- --platform linux/arm64         another platform of the index
    bazel run //:image -- --engine docker                podman is tried first by default
    bazel run //:image -- --output /tmp/image.tar        write the docker-archive, load nothing

The engine gets a docker-archive (manifest.json with RepoTags, the config and the gzipped
layers), which `podman load` and `docker load` both read.
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from typing import IO

from bazel.oci import layout as oci


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", path: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    if path is not None:
        info.size = os.path.getsize(path)
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_archive(image: oci.Layout, descriptor: oci.Descriptor, tags: list[str], out: IO[bytes]) -> None:
    manifest = image.read_json(descriptor["digest"])
    config = manifest["config"]["digest"]
    config_name = f"blobs/sha256/{config.split(':')[1]}"
    layers: list[str] = []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, config_name, path=image.blob_path(config))
        for layer in manifest["layers"]:
            name = f"blobs/sha256/{layer['digest'].split(':')[1]}"
            if name not in layers:
                _add(tar, name, path=image.blob_path(layer["digest"]))
            layers.append(name)
        names = {"Config": config_name, "RepoTags": tags, "Layers": layers}
        _add(tar, "manifest.json", data=json.dumps([names]).encode())


def find_engine(wanted: str | None) -> str:
    for engine in [wanted] if wanted else ["podman", "docker"]:
        if shutil.which(engine):
            return engine
    raise oci.OciError(f"oci_load: no {wanted or 'podman or docker'} on PATH; use --output FILE to write a tarball")


def load(image_dir: str, tags: list[str], platform: str | None, engine: str | None, output: str | None) -> None:
    """Loads the image for `platform` (default: this machine's) into `engine`, or writes it to `output`."""
    image = oci.Layout(image_dir)
    want = oci.parse_platform(platform) if platform else oci.host_platform()
    descriptor = image.select(want)
    if output:
        # `bazel run` starts in the runfiles tree: relative paths mean the user's directory.
        output = os.path.join(os.environ.get("BUILD_WORKING_DIRECTORY", ""), output)
        with open(output, "wb") as f:
            write_archive(image, descriptor, tags, f)
        print(f"oci_load: wrote {output} ({descriptor['digest']}, {', '.join(tags)})")
        return
    engine = find_engine(engine)
    process = subprocess.Popen([engine, "load"], stdin=subprocess.PIPE)
    assert process.stdin is not None  # stdin=PIPE
    try:
        write_archive(image, descriptor, tags, process.stdin)
    finally:
        process.stdin.close()
    if process.wait() != 0:
        raise oci.OciError(f"oci_load: `{engine} load` failed")
    print(
        f"oci_load: loaded {', '.join(tags)} ({'/'.join(want.values())}, manifest {descriptor['digest']}) into {engine}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = oci.tool_parser(__doc__)
    parser.add_argument("--default_tag", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--tag", "-t", action="append", default=[], help="repository:tag to load as (repeatable)")
    parser.add_argument("--platform", help="os/arch[/variant]; default: this machine's")
    parser.add_argument("--engine", help="podman or docker (default: whichever is found first, in that order)")
    parser.add_argument("--output", help="write the archive to this file instead of loading it")
    args = parser.parse_args(argv)
    try:
        load(args.image, args.tag or args.default_tag, args.platform, args.engine, args.output)
    except oci.OciError as error:
        sys.exit(str(error))


if __name__ == "__main__":
    main()
