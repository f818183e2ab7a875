"""Runs the image in Docker, not only podman: a private dockerd (its own data and exec roots,
socket, containerd namespace and config file; no iptables, no bridge), the image loaded the way
`bazel run //:image -- --engine docker` loads it, then the hardened container against the fake
kubelet — registration, admission, `docker stop` to exit 0 with the socket removed.

dockerd starts a containerd of its own under its exec root when none listens on
/run/containerd/containerd.sock; where a system containerd does, it shares it, in a namespace of
this test's own. It skips, saying why, without dockerd (.ci/run fails if it skipped). The
daemon is stopped by its PID and its directories removed at the end.
"""

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import inotify_simple
import pytest

from bazel.oci import load
from tests.daemon import short_tempdir, terminate
from tests.image import imagefs
from tests.image.containers import HARDENED, Engine, registers_allocates_and_stops

# Bazel's strict test PATH lacks the sbin directories dockerd lives in.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
READY_TIMEOUT_S = 120


def read_log(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def wait_for_socket(path: str, process: subprocess.Popen, log: str, timeout: float) -> None:
    """Until `path` exists (inotify), failing at once if `process` exits first."""
    directory = os.path.dirname(path)
    deadline = time.monotonic() + timeout
    with inotify_simple.INotify() as inotify:
        inotify.add_watch(directory, inotify_simple.flags.CREATE | inotify_simple.flags.MOVED_TO)
        while not os.path.exists(path):
            if process.poll() is not None:
                raise RuntimeError(f"dockerd exited {process.returncode} before listening:\n{read_log(log)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"dockerd did not create {path} in {timeout} s:\n{read_log(log)}")
            inotify.read(timeout=int(min(remaining, 1.0) * 1000))  # wakes on an event, or to check the process


def leftover_mounts(root: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(root + "/")]


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Engine]:
    binary = shutil.which("dockerd", path=SYSTEM_PATH)
    if binary is None:
        pytest.skip("no dockerd: Debian's docker.io is not installed (tools/bazel installs it)")
    if shutil.which("docker") is None:
        pytest.skip("no docker client on PATH (Debian's docker.io)")
    if os.geteuid() != 0:
        pytest.skip("a private dockerd needs root")
    root = short_tempdir("tr-dk-")
    socket = os.path.join(root, "s")
    log_path = os.path.join(root, "dockerd.log")
    config = os.path.join(root, "daemon.json")
    with open(config, "w") as f:
        f.write("{}\n")  # not the host's /etc/docker/daemon.json
    os.mkdir(os.path.join(root, "client"))
    namespace = f"tr-test-{os.getpid()}"
    log = open(log_path, "wb")  # noqa: SIM115 (open while dockerd runs)
    process = subprocess.Popen(
        [
            binary,
            "--config-file",
            config,
            "--data-root",
            os.path.join(root, "d"),
            "--exec-root",
            os.path.join(root, "x"),
            "--host",
            f"unix://{socket}",
            "--pidfile",
            os.path.join(root, "pid"),
            "--containerd-namespace",
            namespace,
            "--containerd-plugins-namespace",
            f"{namespace}-plugins",
            "--iptables=false",
            "--bridge=none",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": SYSTEM_PATH},
    )
    env = {"DOCKER_HOST": f"unix://{socket}", "DOCKER_CONFIG": os.path.join(root, "client")}
    try:
        wait_for_socket(socket, process, log_path, READY_TIMEOUT_S)
        engine = Engine(["docker"], env)
        engine("version", timeout=READY_TIMEOUT_S)  # answered once the daemon has initialised
        yield engine
    finally:
        terminate(process, 60)
        log.close()
        print(f"---- dockerd log (exit {process.returncode}) ----\n{read_log(log_path)[-20000:]}")
        mounts = leftover_mounts(root)
        for mount in reversed(mounts):
            subprocess.run(["umount", "--lazy", mount], check=False)
        shutil.rmtree(root, ignore_errors=True)
        assert mounts == [], f"dockerd left mounts behind: {mounts}"


@pytest.fixture(scope="module")
def docker_image(dockerd: Engine) -> Iterator[str]:
    tag = f"localhost/token-resource:docker-test-{os.getpid()}"
    saved = {name: os.environ.get(name) for name in dockerd.env_overrides}
    os.environ.update(dockerd.env_overrides)  # load.main runs `docker load` with this environment
    try:
        load.main(["--image", imagefs.runfile("image_index"), "--tag", tag, "--engine", "docker"])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    yield tag
    dockerd("rmi", "--force", tag, check=False)


def test_registers_allocates_and_stops_cleanly(dockerd: Engine, docker_image: str) -> None:
    registers_allocates_and_stops(dockerd, docker_image, HARDENED, start_timeout=60, stop_timeout=20)
