"""The image in a container engine against the fake kubelet: the scenario the arm64 (podman under
qemu) and docker tests share.

The container gets what a hardened DaemonSet gives it: the device-plugin directory bind-mounted,
a read-only root file system, no capabilities, no network. The fake kubelet listens on
kubelet.sock in that directory on the host side. The daemon runs without --socket, so the test
takes the plugin's socket name from its registration (the default name may be per instance).
"""

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence

from tests.daemon import short_tempdir
from tests.fake_kubelet import KUBELET_SOCKET, FakeKubelet, Mode, advertising

RESOURCE = "example.com/token"
ENV_NAME = "EXAMPLE_COM_TOKEN"
PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
HARDENED = ["--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--network", "none"]


class Engine:
    """podman or docker on the command line, with fixed global options and environment."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.command = list(command)
        self.env_overrides = dict(env or {})
        self.env = {**os.environ, **self.env_overrides} if env else None

    def __call__(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self.command, *args], capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join([*self.command, *args])} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result


def plugin_sockets(directory: str) -> list[str]:
    """Sockets in the plugin directory other than the kubelet's."""
    return sorted(
        name
        for name in os.listdir(directory)
        if name != KUBELET_SOCKET and stat.S_ISSOCK(os.lstat(os.path.join(directory, name)).st_mode)
    )


def registers_allocates_and_stops(
    engine: Engine,
    image: str,
    run_flags: Sequence[str] = (),
    *,
    start_timeout: float,
    stop_timeout: int = 30,
) -> dict[str, float]:
    """Runs `image` detached against a fake kubelet: it must register with 2 healthy tokens,
    answer two admissions with different tokens (the container's environment naming them), and
    on `stop` (SIGTERM) exit 0 with its socket removed. Returns the phases' durations (s)."""
    name = f"token-resource-test-{os.getpid()}-{time.monotonic_ns()}"
    plugin_dir = short_tempdir("tr-img-")
    kubelet = FakeKubelet(plugin_dir, Mode.E2)
    kubelet.start()
    timings = {}
    try:
        started = time.monotonic()
        engine(
            "run",
            "--detach",
            "--name",
            name,
            *run_flags,
            "--volume",
            f"{plugin_dir}:{PLUGIN_DIR}",
            image,
            "--count",
            "2",
            "--resource",
            RESOURCE,
        )
        kubelet.wait_until(advertising(RESOURCE, 2), timeout=start_timeout)
        timings["start_to_registered"] = time.monotonic() - started

        request = kubelet.register_requests[0]
        endpoint = kubelet.resources[RESOURCE].endpoint
        assert (request.version, request.resource_name) == ("v1beta1", RESOURCE)
        assert endpoint and "/" not in endpoint, f"endpoint {endpoint!r} is not a bare file name"
        assert plugin_sockets(plugin_dir) == [endpoint]
        snapshot = kubelet.resources[RESOURCE].snapshots[-1]
        assert sorted((d.ID, d.health) for d in snapshot.devices) == [("item-0", "Healthy"), ("item-1", "Healthy")]

        started = time.monotonic()
        first = kubelet.admit("pod-a", "app", RESOURCE, 1)
        second = kubelet.admit("pod-b", "app", RESOURCE, 1)
        timings["two_admissions"] = time.monotonic() - started
        assert len(first.ids) == len(second.ids) == 1 and first.ids != second.ids
        assert dict(first.response.envs)[ENV_NAME] == first.ids[0]
        assert dict(second.response.envs)[ENV_NAME] == second.ids[0]

        started = time.monotonic()
        engine("stop", "--time", str(stop_timeout), name, timeout=stop_timeout + 60)
        timings["stop"] = time.monotonic() - started
        state = engine("inspect", "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}", name).stdout.split()
        assert state == ["0", "false"], f"exit code, OOM-killed: {state}"
        assert plugin_sockets(plugin_dir) == [], "the plugin left its socket behind"
        assert os.path.exists(kubelet.socket_path), "the plugin removed kubelet.sock"
        assert kubelet.violations == []
        print(f"timings (s): {timings}")
        return timings
    finally:
        logs = engine("logs", name, check=False)
        print(f"---- container log ----\n{logs.stdout}{logs.stderr}")
        engine("rm", "--force", name, check=False)
        kubelet.stop()
        shutil.rmtree(plugin_dir, ignore_errors=True)
