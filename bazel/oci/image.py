"""Assembles an OCI image layout from an optional base image layout and gzipped layers.

The settings file (JSON, written by the oci_image rule) holds entrypoint, cmd, env, labels,
annotations, user, workdir, os, architecture, variant. Labels and annotations may name
workspace status keys in braces ("{STABLE_SOURCE_REVISION}"), replaced from --stamp_info files.
Env values may use $VAR / ${VAR} to extend the base image's value.
"""

import argparse
import json
import os
import re
import sys
from typing import Any

from bazel.oci import layout as oci

EPOCH = "1970-01-01T00:00:00Z"


def read_status(paths: list[str]) -> dict[str, str]:
    status = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                key, _, value = line.rstrip("\n").partition(" ")
                if key:
                    status[key] = value
    return status


def stamp(value: str, status: dict[str, str]) -> str:
    return re.sub(r"\{([A-Z][A-Z0-9_]*)\}", lambda m: status.get(m.group(1), m.group(0)), value)


def merge_env(base: list[str], updates: dict[str, str]) -> list[str]:
    env = dict(item.split("=", 1) for item in base)
    for key, value in sorted(updates.items()):
        env[key] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)
    return [f"{k}={v}" for k, v in env.items()]


def assemble(
    settings: dict[str, Any],
    base_dir: str | None,
    layer_paths: list[str],
    status: dict[str, str],
    output: str,
    digest_file: str | None,
) -> None:
    """Writes the image layout `output`: the base image's layers (if any), then `layer_paths`."""
    out = oci.Layout.create(output)
    config: dict[str, Any] = {
        "architecture": "",
        "os": "",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    }
    layers: list[oci.Descriptor] = []
    annotations: dict[str, str] = {}
    if base_dir:
        base = oci.Layout(base_dir)
        descriptor = base.top()
        if descriptor["mediaType"] in oci.INDEX_TYPES:
            raise oci.OciError("oci_image: base must be a single-platform image, not an index")
        base_manifest = base.read_json(descriptor["digest"])
        config = base.read_json(base_manifest["config"]["digest"])
        config.setdefault("history", [])
        for layer in base_manifest["layers"]:
            out.copy_blob(base, layer["digest"])
            layers.append(layer)
        annotations.update(base_manifest.get("annotations", {}))

    for key in ("os", "architecture", "variant"):
        if settings.get(key):
            config[key] = settings[key]
    if not config.get("os") or not config.get("architecture"):
        raise oci.OciError("oci_image: set os and architecture (or use a base image)")
    run = config.setdefault("config", {})
    if settings.get("entrypoint") is not None:
        run["Entrypoint"] = settings["entrypoint"]
        run.pop("Cmd", None)  # as in rules_oci and docker: a new entrypoint resets cmd
    if settings.get("cmd") is not None:
        run["Cmd"] = settings["cmd"]
    if settings.get("env"):
        run["Env"] = merge_env(run.get("Env", []), settings["env"])
    if settings.get("labels"):
        run["Labels"] = {**run.get("Labels", {}), **{k: stamp(v, status) for k, v in settings["labels"].items()}}
    if settings.get("user"):
        run["User"] = settings["user"]
    if settings.get("workdir"):
        run["WorkingDir"] = settings["workdir"]
    config["created"] = EPOCH

    for path, comment in zip(layer_paths, settings.get("layer_comments", [None] * len(layer_paths)), strict=True):
        layers.append(out.add_file(path, oci.LAYER_GZIP))
        config["rootfs"]["diff_ids"].append(oci.gunzip_sha256(path))
        config["history"].append({"created": EPOCH, "created_by": comment or os.path.basename(path)})

    annotations.update({k: stamp(v, status) for k, v in settings.get("annotations", {}).items()})
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.MANIFEST,
        "config": out.write_json(config, oci.CONFIG),
        "layers": layers,
    }
    if annotations:
        manifest["annotations"] = annotations
    descriptor = out.write_json(manifest, oci.MANIFEST)
    out.finish(descriptor, digest_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True)
    parser.add_argument("--base", help="the base image's OCI layout")
    parser.add_argument("--layer", action="append", default=[], help="a .tar.gz layer, in order")
    parser.add_argument("--stamp_info", action="append", default=[])
    parser.add_argument("--output", required=True, help="the OCI layout directory to write")
    parser.add_argument("--digest", help="write the manifest digest here")
    args = parser.parse_args(argv)
    with open(args.settings) as f:
        settings = json.load(f)
    try:
        assemble(settings, args.base, args.layer, read_status(args.stamp_info), args.output, args.digest)
    except oci.OciError as error:
        sys.exit(str(error))


if __name__ == "__main__":
    main()
