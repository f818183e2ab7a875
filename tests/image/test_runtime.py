"""Runs the image in a real container engine (podman + runc) against the fake kubelet.

The container gets only what a hardened DaemonSet gives it: the device-plugin directory
bind-mounted, a read-only root file system, no capabilities, no network. The fake kubelet
listens on kubelet.sock in that directory on the host side.
"""

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from bazel.oci import load
from tests.daemon import short_tempdir
from tests.fake_kubelet import FakeKubelet, Mode
from tests.image import imagefs

RESOURCE = "example.com/token"
SOCKET = "token-resource.sock"
# runc, the runtime tools/bazel installs: podman would otherwise pick crun where that is installed.
PODMAN = ["podman", "--runtime", "runc"]
# Explicit ulimits: podman gives a root container limits above the host's hard ones, and a host
# without CAP_SYS_RESOURCE (such as a container) cannot raise those, so runc fails to start the
# container; these fit under the hard limits the test hosts grant. --network none: a hardened
# DaemonSet needs no network (the plugin talks to the kubelet over unix sockets only), and the
# test then needs no netavark/iptables on the host.
RUN_FLAGS = ["--ulimit", "nofile=1024:20000", "--ulimit", "nproc=4096:4096", "--network", "none"]


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], check=check, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def image_tag() -> Iterator[str]:
    tag = f"localhost/token-resource:runtime-test-{os.getpid()}"
    load.main(["--image", imagefs.runfile("image_index"), "--tag", tag, "--engine", "podman"])
    yield tag
    podman("rmi", "--force", tag, check=False)


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"token-resource-test-{os.getpid()}-{time.monotonic_ns()}"
    yield name
    logs = podman("logs", name, check=False)
    print(f"---- container log ----\n{logs.stdout}{logs.stderr}")
    podman("rm", "--force", name, check=False)


def test_registers_allocates_and_stops_cleanly(image_tag: str, container_name: str) -> None:
    plugin_dir = short_tempdir("tr-img-")
    kubelet = FakeKubelet(plugin_dir, Mode.E2)
    kubelet.start()
    try:
        podman(
            "run",
            "--detach",
            "--name",
            container_name,
            *RUN_FLAGS,
            "--read-only",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--volume",
            f"{plugin_dir}:/var/lib/kubelet/device-plugins",
            image_tag,
            "--count",
            "2",
            "--resource",
            RESOURCE,
            "--socket",
            SOCKET,
        )
        kubelet.wait_until(
            lambda k: (
                RESOURCE in k.resources and k.resources[RESOURCE].connected and k.resources[RESOURCE].allocatable == 2
            ),
            timeout=60,
        )
        request = kubelet.register_requests[0]
        assert (request.version, request.endpoint, request.resource_name) == ("v1beta1", SOCKET, RESOURCE)
        snapshot = kubelet.resources[RESOURCE].snapshots[-1]
        assert sorted((d.ID, d.health) for d in snapshot.devices) == [("item-0", "Healthy"), ("item-1", "Healthy")]

        allocation = kubelet.admit("pod-a", "app", RESOURCE, 1)
        assert len(allocation.ids) == 1
        assert kubelet.admit("pod-b", "app", RESOURCE, 1).ids != allocation.ids
        assert os.path.exists(os.path.join(plugin_dir, SOCKET))

        podman("stop", "--time", "20", container_name)
        state = podman("inspect", "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}", container_name).stdout.split()
        assert state == ["0", "false"]
        assert not os.path.exists(os.path.join(plugin_dir, SOCKET)), "the plugin left its socket behind"
        assert kubelet.violations == []
    finally:
        kubelet.stop()
        shutil.rmtree(plugin_dir, ignore_errors=True)


def test_version_flag(image_tag: str) -> None:
    result = podman("run", "--rm", *RUN_FLAGS, "--read-only", "--cap-drop=ALL", image_tag, "--version")
    assert result.stdout.startswith("token-resource ")


def test_help_shows_the_usage(image_tag: str) -> None:
    """The image runs with -OO (PYTHONOPTIMIZE=2), which drops docstrings: --help still has the usage."""
    result = podman("run", "--rm", *RUN_FLAGS, "--read-only", "--cap-drop=ALL", image_tag, "--help", check=False)
    assert "Usage: token_resource --count=2 --resource=example.com/token" in result.stdout, result.stdout


# Imports what any of the daemon's flags loads, and prints the optimization level and every
# loaded module whose .pyc of that level is not in the image (Python would compile it at every
# start: the read-only root and PYTHONDONTWRITEBYTECODE keep it from writing one).
BYTECODE_PROBE = """
import os, sys
import token_resource.main, token_resource.status, token_resource.plugin_watcher
import token_resource.kubeapi, token_resource.drain, yaml
print(sys.flags.optimize)
for module in list(sys.modules.values()):
    cached = getattr(getattr(module, "__spec__", None), "cached", None)
    if cached and not os.path.exists(cached):
        print(cached)
"""


def test_every_module_runs_from_shipped_bytecode(image_tag: str) -> None:
    result = podman(
        "run",
        "--rm",
        *RUN_FLAGS,
        "--read-only",
        "--cap-drop=ALL",
        "--entrypoint",
        "/usr/bin/python3.11",
        image_tag,
        "-c",
        BYTECODE_PROBE,
    )
    assert result.stdout.split("\n", 1) == ["2", ""], result.stdout
