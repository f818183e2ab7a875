"""Assembles a multi-platform OCI image index from single-platform image layouts.

The output layout's index.json points at one image index blob, whose digest is the digest
users pull and push (`<repo>@sha256:...`); that index lists each image with its platform.
"""

import argparse
import sys

from bazel.oci import layout as oci


def assemble(image_dirs: list[str], output: str, digest_file: str | None) -> None:
    """Writes the index layout `output` over the images of `image_dirs`, in order."""
    out = oci.Layout.create(output)
    manifests: list[oci.Descriptor] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    for path in image_dirs:
        image = oci.Layout(path)
        for plat, descriptor in image.images():
            key = tuple(sorted(plat.items()))
            if key in seen:
                raise oci.OciError(f"oci_image_index: two images for platform {plat}")
            seen.add(key)
            for blob in image.blobs_of(descriptor):
                out.copy_blob(image, blob["digest"])
            manifests.append({k: descriptor[k] for k in ("mediaType", "digest", "size")} | {"platform": plat})
    descriptor = out.write_json({"schemaVersion": 2, "mediaType": oci.INDEX, "manifests": manifests}, oci.INDEX)
    out.finish(descriptor, digest_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", action="append", required=True, help="an image's OCI layout")
    parser.add_argument("--output", required=True)
    parser.add_argument("--digest")
    args = parser.parse_args(argv)
    try:
        assemble(args.image, args.output, args.digest)
    except oci.OciError as error:
        sys.exit(str(error))


if __name__ == "__main__":
    main()
