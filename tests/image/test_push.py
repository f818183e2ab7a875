"""Pushes the image index to a real registry (Debian's docker-registry on 127.0.0.1) with the
`bazel run //:push` runner and pulls it back with skopeo: digests must match end to end."""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.daemon import free_port
from tests.image import imagefs

REGISTRY = "/usr/bin/docker-registry"  # tools/bazel installs it, and skopeo, from Debian


def read_text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


@pytest.fixture
def registry() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="tr-registry-")
    port = free_port()
    config = os.path.join(root, "config.yml")
    with open(config, "w") as f:
        f.write(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root}/data\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
    log = open(os.path.join(root, "registry.log"), "wb")  # noqa: SIM115 (open while the registry runs)
    process = subprocess.Popen([REGISTRY, "serve", config], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(read_text(os.path.join(root, "registry.log"))) from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        log.close()
        print(read_text(os.path.join(root, "registry.log")))
        shutil.rmtree(root, ignore_errors=True)


def skopeo_raw(reference: str) -> bytes:
    return subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reference}"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_push_then_pull_gives_the_same_digests(registry: str) -> None:
    with open(imagefs.runfile("image_index.digest")) as f:
        index_digest = f.read().strip()
    repository = f"{registry}/example/token-resource"
    # The same script `bazel run //:push` runs, with the same kind of arguments.
    result = subprocess.run(
        [imagefs.runfile("push.sh"), "--repository", repository, "--tag", "v-test", "--tag", "latest"],
        cwd=imagefs.runfile(""),
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(result.stdout, result.stderr)
    assert f"{repository}@{index_digest}" in result.stdout

    for tag in ("v-test", "latest"):
        assert sha256(skopeo_raw(f"{repository}:{tag}")) == index_digest
    index = json.loads(skopeo_raw(f"{repository}@{index_digest}"))
    layout = imagefs.index_layout()
    assert index == layout.read_json(index_digest)
    for descriptor in index["manifests"]:
        manifest = skopeo_raw(f"{repository}@{descriptor['digest']}")
        assert sha256(manifest) == descriptor["digest"]

    # A full copy back out of the registry (every blob verified by skopeo) into an OCI layout.
    pulled = tempfile.mkdtemp(prefix="tr-pulled-")
    try:
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--all",
                "--src-tls-verify=false",
                f"docker://{repository}:v-test",
                f"oci:{pulled}:v-test",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        with open(os.path.join(pulled, "index.json")) as f:
            assert json.load(f)["manifests"][0]["digest"] == index_digest
        for descriptor in layout.blobs_of(layout.top()):
            assert os.path.exists(os.path.join(pulled, "blobs", "sha256", descriptor["digest"].split(":")[1]))
    finally:
        shutil.rmtree(pulled, ignore_errors=True)

    # Pushing again finds every blob in place and changes nothing.
    again = subprocess.run(
        [imagefs.runfile("push.sh"), "--repository", repository, "--tag", "v-test"],
        cwd=imagefs.runfile(""),
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "already there" in again.stdout
    assert sha256(skopeo_raw(f"{repository}:v-test")) == index_digest
