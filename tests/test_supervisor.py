"""The supervisor's reloads that lower what the kubelet is told: a lower count, a removed
resource. With real plugin runners, the fake kubelet and the real NodeDrain against the fake API
server (tests/fake_apiserver.py): the scheduler's view is withheld before the kubelet's drops."""

import os
import pathlib
import threading
import time
from typing import cast

from tests.fake_apiserver import ADMITTED, LICENSE, NODE, TOKEN, FakeAPIServer, pod
from tests.fake_kubelet import FakeKubelet, advertising
from token_resource import config
from token_resource.config import PluginConfig
from token_resource.drain import NodeDrain
from token_resource.kubeapi import KubeAPI
from token_resource.policy import DevicePolicy
from token_resource.supervisor import ConfigFile, Supervisor
from token_resource.tokens import TokenPolicy


def token_policy(plugin: PluginConfig, previous: DevicePolicy | None) -> DevicePolicy:
    """As the daemon's (main.token_policy)."""
    if isinstance(previous, TokenPolicy):
        return previous.reconfigured(plugin.count)
    return TokenPolicy(plugin.resource, plugin.count)


class Reloads:
    """A Supervisor of the resources in a config file, with the real NodeDrain as its withholder,
    running on a thread against the fake kubelet; write() changes the file, which it reloads."""

    def __init__(self, kubelet: FakeKubelet, api: KubeAPI, text: str, registry_dir: str = "") -> None:
        directory = os.path.join(kubelet.directory, "config")
        os.mkdir(directory)
        self.path = os.path.join(directory, "config.yaml")
        pathlib.Path(self.path).write_text(text)
        source = ConfigFile(self.path, config.Placement(kubelet.directory, registry_dir or kubelet.directory), NODE)
        _, plugins = source.load()
        self.supervisor = Supervisor(
            plugins,
            token_policy,
            instance=time.time_ns(),
            source=source,
            source_text=text,
            withholder=NodeDrain(api, NODE, settle_s=0.1, timeout_s=5),
        )
        self.thread = threading.Thread(target=self.supervisor.run)
        self.thread.start()

    def write(self, text: str) -> None:
        tmp = self.path + ".tmp"
        pathlib.Path(tmp).write_text(text)
        os.rename(tmp, self.path)  # MOVED_TO: one reload, of the whole file

    def wait_held(self, *names: str, timeout: float = 10.0) -> None:
        """Until the runners of `names` are REGISTERED: the kubelet may read a snapshot before
        the runner has taken in that its stream opened, and only what is held is withheld."""
        deadline = time.monotonic() + timeout
        while not all(self.supervisor.statuses()[name].registered for name in names):
            assert time.monotonic() < deadline, self.supervisor.statuses()
            time.sleep(0.01)

    def published(self, resource: str) -> int:
        """How many devices the resource's runner serves now (not what the kubelet has read yet)."""
        running = self.supervisor._running.get(resource)
        return -1 if running is None else len(running.runner.policy.devices().devices)

    def stop(self) -> None:
        self.supervisor.stop()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()


def resources(*entries: tuple[str, int], extra: str = "") -> str:
    return "resources:\n" + "".join(f"  - name: {name}\n    count: {count}\n" for name, count in entries) + extra


def test_a_lower_count_is_withheld_until_bound_pods_are_admitted_then_published_then_sealed(
    server: FakeAPIServer, api: KubeAPI, kubelet: FakeKubelet
) -> None:
    server.allocatable = {TOKEN: "3"}
    reloads = Reloads(kubelet, api, resources((TOKEN, 3)))
    try:
        kubelet.wait_until(advertising(TOKEN, 3))
        reloads.wait_held(TOKEN)
        server.observe = lambda: (kubelet.allocatable(TOKEN), reloads.published(TOKEN))
        server.pods = [pod("bound", resources={TOKEN: "3"})]  # bound by the scheduler, not admitted yet
        reloads.write(resources((TOKEN, 1)))
        server.wait_for(lambda: bool(server.patches) and server.watching())
        # The scheduler's view first, while the kubelet still has 3 devices for the bound pod.
        assert server.patches[0] == ({TOKEN: "1"}, (3, 3))
        server.write_allocatable({TOKEN: "3"})  # the kubelet's status update from its view
        server.wait_for(lambda: len(server.patches) == 2)
        assert server.patches[1] == ({TOKEN: "1"}, (3, 3)) and server.allocatable[TOKEN] == "1"
        # The bound pod gets 3 tokens from the snapshot still published: after the decrease,
        # the kubelet would refuse it (UnexpectedAdmissionError).
        assert kubelet.admit("bound", "c", TOKEN, 3).ids == ("item-0", "item-1", "item-2")
        server.pods = [pod("bound", resources={TOKEN: "3"}, status=ADMITTED)]
        kubelet.wait_until(advertising(TOKEN, 1))
        server.wait_for(lambda: len(server.patches) == 3)
        # Sealed once the runner serves the lower count, so a write-back of 3 between the end
        # of the withholding and the new snapshot does not stand.
        sealed, (_, published) = cast(tuple[dict[str, str], tuple[int, int]], server.patches[2])
        assert sealed == {TOKEN: "1"} and published == 1
        assert len(kubelet.register_requests) == 1  # the same stream throughout
        # An increase needs none of it: the scheduler's view can only be behind on the safe side.
        reloads.write(resources((TOKEN, 4)))
        kubelet.wait_until(advertising(TOKEN, 4))
        assert len(server.patches) == 3
    finally:
        reloads.stop()
    # The stop is the same with quantity 0, while the stream is still open.
    assert [p[0] for p in server.patches[3:]] == [{TOKEN: "0"}, {TOKEN: "0"}]
    assert server.patches[3][1] == (4, 4)


def test_a_removed_resource_is_withheld_as_a_stop_and_one_not_held_is_left_alone(
    server: FakeAPIServer, api: KubeAPI, kubelet: FakeKubelet, registry: str
) -> None:
    # The license registers through a plugin watcher that no kubelet runs: never held.
    watched = "    registration: plugin_watcher\n    socket: license.sock\n"
    reloads = Reloads(kubelet, api, resources((TOKEN, 2), (LICENSE, 2), extra=watched), registry_dir=registry)
    try:
        kubelet.wait_until(advertising(TOKEN, 2))
        reloads.wait_held(TOKEN)
        server.observe = lambda: kubelet.resources[TOKEN].connected
        reloads.write(resources((LICENSE, 1), extra=watched))
        kubelet.wait_until(lambda k: not k.resources[TOKEN].connected)
        server.wait_for(lambda: len(server.patches) == 2)
        assert server.patches == [({TOKEN: "0"}, True), ({TOKEN: "0"}, server.patches[1][1])]
        assert reloads.published(LICENSE) == 1
    finally:
        reloads.stop()
    assert len(server.patches) == 2  # and not at the stop: the license was never held


def test_without_api_access_a_lower_count_applies_as_before(
    server: FakeAPIServer, api: KubeAPI, kubelet: FakeKubelet
) -> None:
    server.forbidden.add(("PATCH", f"/api/v1/nodes/{NODE}/status"))
    reloads = Reloads(kubelet, api, resources((TOKEN, 3)))
    try:
        kubelet.wait_until(advertising(TOKEN, 3))
        reloads.wait_held(TOKEN)
        reloads.write(resources((TOKEN, 1)))
        kubelet.wait_until(advertising(TOKEN, 1))
        assert len(server.calls("PATCH", f"/api/v1/nodes/{NODE}/status")) == 1  # tried once: 403
        assert not server.calls("GET", "/api/v1/pods") and not server.patches
    finally:
        reloads.stop()
