"""The real daemon registering through the fake kubelet's plugin watcher (1.20, protocol doc
§7.6): `--registration=plugin_watcher`, its socket in the registry directory, found there by the
kubelet, also after a kubelet restart, re-created when the kubelet refuses it."""

import os
from collections.abc import Callable, Iterator

import pytest

from tests.daemon import Daemon, free_port, removed_from, wait_for_http
from tests.fake_kubelet import FAST_WATCHER, FakeKubelet, Mode, Notification, advertising, reconciler_passes

RESOURCE = "example.com/token"
SOCKET = "token.sock"


@pytest.fixture
def kubelet(plugin_dir: str, registry: str) -> Iterator[FakeKubelet]:
    """A 1.20 fake kubelet (E1) with its plugin watcher on `registry`; the test fails if it saw
    the daemon break a protocol rule (both routes, an endpoint in device-plugins, slow GetInfo)."""
    fake = FakeKubelet(plugin_dir, Mode.E1, registry_dir=registry, watcher=FAST_WATCHER)
    fake.start()
    yield fake
    fake.stop()
    assert fake.violations == []


def start(daemons: Callable[..., Daemon], kubelet: FakeKubelet, *flags: str) -> Daemon:
    assert kubelet.registry_dir is not None
    return daemons(
        "--registration=plugin_watcher",
        f"--plugins_registry_dir={kubelet.registry_dir}",
        f"--plugin_dir={kubelet.directory}",
        f"--socket={SOCKET}",
        f"--resource={RESOURCE}",
        "--count=2",
        *flags,
    )


def socket_path(kubelet: FakeKubelet) -> str:
    assert kubelet.registry_dir is not None
    return os.path.join(kubelet.registry_dir, SOCKET)


def accepted(kubelet: FakeKubelet, times: int) -> Callable[[FakeKubelet], bool]:
    """The watcher has told the daemon `times` times that it is registered, and the resource
    is advertised with the daemon's stream open."""
    ok = Notification(socket_path(kubelet), True, "")
    return lambda k: k.notifications.count(ok) == times and advertising(RESOURCE, 2)(k)


def inode(path: str) -> int:
    return os.stat(path).st_ino


def test_registers_allocates_and_leaves_on_sigterm(daemons: Callable[..., Daemon], kubelet: FakeKubelet) -> None:
    daemon = start(daemons, kubelet)
    kubelet.wait_until(accepted(kubelet, 1))
    daemon.wait_for_log("registered with the kubelet through the plugin watcher")
    assert kubelet.registered_plugins() == {socket_path(kubelet): RESOURCE}
    assert kubelet.register_requests == []  # nothing on kubelet.sock
    assert sorted(os.listdir(kubelet.directory)) == ["kubelet.sock"]  # nothing in device-plugins
    [attempt] = kubelet.watcher_attempts
    assert attempt.info is not None and attempt.info.endpoint == ""  # this same socket
    allocation = kubelet.admit("pod", "app", RESOURCE, 2)
    assert dict(allocation.response.envs) == {"EXAMPLE_COM_TOKEN": "item-0,item-1"}

    with removed_from(kubelet.registry_dir or "", SOCKET):
        assert daemon.terminate() == 0
    kubelet.wait_until(lambda k: k.deregistrations == [(socket_path(kubelet), RESOURCE)])
    kubelet.wait_until(lambda k: not k.resources[RESOURCE].connected)


def test_a_kubelet_restart_finds_the_same_socket_again(daemons: Callable[..., Daemon], kubelet: FakeKubelet) -> None:
    daemon = start(daemons, kubelet)
    kubelet.wait_until(accepted(kubelet, 1))
    before = inode(socket_path(kubelet))
    kubelet.restart()  # the registry is kept; device-plugins is wiped
    kubelet.wait_until(accepted(kubelet, 2))
    daemon.wait_for_log("waiting to be found again")
    assert inode(socket_path(kubelet)) == before
    assert kubelet.deregistrations == []
    assert "re-creating" not in daemon.log() and "serving again" not in daemon.log()
    assert dict(kubelet.admit("pod", "app", RESOURCE, 1).response.envs) == {"EXAMPLE_COM_TOKEN": "item-0"}


def test_a_refusal_after_getinfo_re_creates_the_socket(daemons: Callable[..., Daemon], kubelet: FakeKubelet) -> None:
    # Refused three times (the first re-creation is immediate, the next ones back off): the
    # refusal stays in /readyz until the kubelet accepts.
    kubelet.fail_register_plugin(times=3)
    port = free_port()
    daemon = start(daemons, kubelet, f"--http_port={port}", "--http_address=127.0.0.1")
    text = (
        "RegisterPlugin error -- plugin registration failed with err: failed to dial device plugin with "
        f"socketPath {socket_path(kubelet)}: failed to dial device plugin: context deadline exceeded"
    )
    daemon.wait_for_log(f"the kubelet refused the registration: {text}")
    wait_for_http(port, "/readyz", 503, "the kubelet refused the registration")
    kubelet.wait_until(accepted(kubelet, 1))
    wait_for_http(port, "/readyz", 200, "ok")
    refusals = [n for n in kubelet.notifications if not n.registered]
    assert refusals == [Notification(socket_path(kubelet), False, text)] * 3
    assert daemon.log().count(f"re-creating {socket_path(kubelet)}") == 3
    # Each re-created socket was unregistered (DeRegisterPlugin) before it registered again.
    assert kubelet.deregistrations == [(socket_path(kubelet), RESOURCE)] * 3
    metrics = wait_for_http(port, "/metrics", 200)
    assert f'token_resource_registration_failures_total{{resource="{RESOURCE}"}} 3.0' in metrics
    assert f'token_resource_registrations_total{{resource="{RESOURCE}"}} 1.0' in metrics


def test_the_stale_socket_of_a_killed_daemon_is_removed(daemons: Callable[..., Daemon], kubelet: FakeKubelet) -> None:
    first = start(daemons, kubelet)
    kubelet.wait_until(accepted(kubelet, 1))
    first.process.kill()
    first.process.wait()
    kubelet.wait_until(lambda k: not k.resources[RESOURCE].connected)  # its stream ended
    assert os.path.exists(socket_path(kubelet))  # left behind: nobody serves on it
    second = start(daemons, kubelet)
    second.wait_for_log(f"removed stale socket {socket_path(kubelet)}")
    kubelet.wait_until(accepted(kubelet, 2))
    second.wait_for_log("registered with the kubelet through the plugin watcher")


def test_a_second_instance_on_the_same_socket_waits_for_the_first(
    daemons: Callable[..., Daemon], kubelet: FakeKubelet
) -> None:
    first = start(daemons, kubelet)
    kubelet.wait_until(accepted(kubelet, 1))
    port = free_port()
    second = start(daemons, kubelet, f"--http_port={port}", "--http_address=127.0.0.1")
    second.wait_for_log("another process is serving on")
    wait_for_http(port, "/readyz", 503, "another process is serving on")
    assert len(kubelet.watcher_attempts) == 1  # the second one touched nothing

    with removed_from(kubelet.registry_dir or "", SOCKET):
        assert first.terminate() == 0
    kubelet.wait_until(accepted(kubelet, 2))
    second.wait_for_log("registered with the kubelet through the plugin watcher")
    wait_for_http(port, "/readyz", 200, "ok")
    kubelet.wait_until(reconciler_passes(20))  # no ping-pong: nothing more happens
    assert len(kubelet.watcher_attempts) == 2 and kubelet.deregistrations == [(socket_path(kubelet), RESOURCE)]
    assert "re-creating" not in second.log()
    assert kubelet.resources[RESOURCE].connected


def test_a_kubelet_restart_while_only_a_stale_socket_is_there(
    daemons: Callable[..., Daemon], kubelet: FakeKubelet
) -> None:
    """The restarted kubelet finds the dead daemon's socket and keeps dialling it (each dial
    fails, the reconciler backs off); the next daemon replaces it and ends registered. A dial in
    flight may reach the new socket: registered under the old socket's timestamp, the kubelet
    then unregisters it (closing its stream) and registers it again, which the daemon follows."""
    first = start(daemons, kubelet)
    kubelet.wait_until(accepted(kubelet, 1))
    first.process.kill()
    first.process.wait()
    kubelet.restart()
    kubelet.wait_until(lambda k: any(a.socket_path == socket_path(k) and a.error for a in k.watcher_attempts))
    second = start(daemons, kubelet)
    second.wait_for_log(f"removed stale socket {socket_path(kubelet)}")
    kubelet.wait_until(lambda k: k.registered_plugins() == {socket_path(k): RESOURCE} and advertising(RESOURCE, 2)(k))
    kubelet.wait_until(reconciler_passes(40))  # settled: still registered, nothing re-created
    assert advertising(RESOURCE, 2)(kubelet) and "re-creating" not in second.log()
