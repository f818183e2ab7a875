"""Reproducibility: an independent rebuild of every layer, image and the index from the same
inputs gives Bazel's bytes exactly.

The rebuild runs the same tools in fresh processes with random hash seeds, another working
directory and other output paths, reading the inputs from the runfiles tree instead of the
exec root; so file times, paths, ordering and hash seeds cannot leak into the digests.
"""

import hashlib
import json
import os
import random
import subprocess
import sys

from tests.image import imagefs

# The layers in the test's data: the BUILD rule's LAYERS.
LAYERS = os.environ["LAYERS"].split()
# As in //:BUILD.bazel: image -> (base, layers).
IMAGES = {
    "python_base_amd64": (None, ["runtime_layer_amd64", "etc_layer"]),
    "python_base_arm64": (None, ["runtime_layer_arm64", "etc_layer"]),
    "image_amd64": ("python_base_amd64", ["site_layer_amd64", "app_layer"]),
    "image_arm64": ("python_base_arm64", ["site_layer_arm64", "app_layer"]),
}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tool(name: str, *args: str, cwd: str) -> None:
    env = dict(os.environ, PYTHONHASHSEED=str(random.randrange(1, 2**32)), PYTHONPATH=imagefs.runfile(""))
    subprocess.run([sys.executable, imagefs.runfile(f"bazel/oci/{name}.py"), *args], check=True, cwd=cwd, env=env)


def test_independent_rebuild_has_the_same_digests() -> None:
    out = os.path.join(os.environ["TEST_TMPDIR"], "rebuild")
    os.makedirs(out)
    for layer in LAYERS:
        rebuilt = os.path.join(out, layer + ".tar.gz")
        tool(
            "layer",
            "--spec",
            imagefs.runfile(f"{layer}.spec.json"),
            "--output",
            rebuilt,
            "--inputs_root",
            imagefs.runfile(""),
            cwd=out,
        )
        assert sha256(rebuilt) == sha256(imagefs.runfile(f"{layer}.tar.gz")), f"{layer} differs"

    # The stamped revision is whatever this tree's status said; feed the same value back.
    built_index = imagefs.index_layout()
    labels = imagefs.image_for("amd64").config["config"]["Labels"]
    status = os.path.join(out, "status.txt")
    with open(status, "w") as f:
        f.write(f"STABLE_SOURCE_REVISION {labels['org.opencontainers.image.revision']}\n")
    for image, (base, layers) in IMAGES.items():
        args = ["--settings", imagefs.runfile(f"{image}.settings.json"), "--output", os.path.join(out, image)]
        if base:
            args += [
                "--base",
                os.path.join(out, base),
                "--stamp_info",
                status,
                "--stamp_info",
                imagefs.runfile("version.txt"),
            ]
        for layer in layers:
            args += ["--layer", os.path.join(out, layer + ".tar.gz")]
        tool("image", *args, "--digest", os.path.join(out, image + ".digest"), cwd=out)

    tool(
        "index",
        "--image",
        os.path.join(out, "image_amd64"),
        "--image",
        os.path.join(out, "image_arm64"),
        "--output",
        os.path.join(out, "index"),
        "--digest",
        os.path.join(out, "index.digest"),
        cwd=out,
    )
    with open(os.path.join(out, "index.digest")) as f:
        rebuilt_digest = f.read()
    assert rebuilt_digest == built_index.top()["digest"]
    with open(os.path.join(out, "index", "index.json")) as f:
        assert json.load(f) == built_index.index()
