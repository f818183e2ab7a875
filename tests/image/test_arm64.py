"""Runs the index's linux/arm64 image, not only builds it: podman (runc) under qemu-user
emulation against the fake kubelet — registration, admission, SIGTERM clean-up.

The host is left as it is: the test skips, saying why, where the kernel has no enabled
qemu-aarch64 binfmt_misc handler with the F flag (qemu opened at registration, so it works in
a container's mount namespace). .ci/run enables it, and fails if this test skipped.
"""

import os
import platform
from collections.abc import Iterator

import pytest

from bazel.oci import load
from tests.image import imagefs
from tests.image.containers import HARDENED, Engine, registers_allocates_and_stops

HANDLER = "/proc/sys/fs/binfmt_misc/qemu-aarch64"
SETUP = "apt-get install qemu-user-static binfmt-support; update-binfmts --enable qemu-aarch64 (.ci/run does it)"
PODMAN = Engine(["podman", "--runtime", "runc"])
# As tests/image/test_runtime.py: ulimits under the hosts' hard limits, no network.
ULIMITS = ["--ulimit", "nofile=1024:20000", "--ulimit", "nproc=4096:4096"]
# Python's start under qemu takes seconds (about 10x native); a loaded 2-core CI machine more.
START_TIMEOUT_S = 240


def emulation_missing() -> str | None:
    """Why arm64 binaries cannot run here, or None."""
    if platform.machine() in ("aarch64", "arm64"):
        return None
    if not os.path.exists("/proc/sys/fs/binfmt_misc/status"):
        return f"binfmt_misc is not mounted at /proc/sys/fs/binfmt_misc: no arm64 emulation ({SETUP})"
    if not os.path.exists(HANDLER):
        return f"no qemu-aarch64 binfmt_misc handler: no arm64 emulation ({SETUP})"
    with open(HANDLER) as f:
        lines = f.read().splitlines()
    if not lines or lines[0] != "enabled":
        return f"the qemu-aarch64 binfmt_misc handler is disabled ({SETUP})"
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags:")), "")
    if "F" not in flags:
        return f"the qemu-aarch64 handler lacks the F flag (flags {flags!r}), so containers cannot see qemu ({SETUP})"
    return None


@pytest.fixture(scope="module")
def arm64_image() -> Iterator[str]:
    reason = emulation_missing()
    if reason:
        pytest.skip(reason)
    tag = f"localhost/token-resource:arm64-test-{os.getpid()}"
    load.main(
        ["--image", imagefs.runfile("image_index"), "--tag", tag, "--engine", "podman", "--platform", "linux/arm64"]
    )
    yield tag
    PODMAN("rmi", "--force", tag, check=False)


def test_image_is_arm64(arm64_image: str) -> None:
    assert PODMAN("image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", arm64_image).stdout.split() == [
        "linux/arm64"
    ]


def test_registers_allocates_and_stops_cleanly(arm64_image: str) -> None:
    registers_allocates_and_stops(
        PODMAN,
        arm64_image,
        ["--arch", "arm64", *ULIMITS, *HARDENED],
        start_timeout=START_TIMEOUT_S,
        stop_timeout=60,
    )


def test_interpreter_is_aarch64(arm64_image: str) -> None:
    result = PODMAN(
        "run",
        "--rm",
        "--arch",
        "arm64",
        *ULIMITS,
        *HARDENED,
        "--entrypoint",
        "/usr/bin/python3.11",
        arm64_image,
        "-c",
        "import platform; print(platform.machine())",
        timeout=300,
    )
    assert result.stdout.split() == ["aarch64"]
