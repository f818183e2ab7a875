"""Hand-off between two daemon instances of one resource (a surge upgrade, or a restart on a
fixed socket) against each kubelet era of the fake kubelet (§8.2).

Without --socket every process serves its own `token-resource.<start ns>.sock`; the newer
instance registers, the older one goes to standby and takes over again if the newer one dies.
With --socket the name is fixed and a second instance waits until the socket is free.
"""

import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from tests.daemon import Daemon, free_port
from tests.fake_kubelet import Connection, FakeKubelet, Mode, Resource, advertising, newest_connection, serving_from

RESOURCE = "example.com/token"
COUNT = 2
INSTANCE_SOCKET = re.compile(r"token-resource\.(\d+)\.sock")
PROMPTLY_S = 1.0  # a Register that answers a dropped stream comes without back-off
QUIET_S = 3.0  # how long no further Register must arrive once the hand-off settled

Kubelets = Callable[..., FakeKubelet]
Daemons = Callable[..., Daemon]


def plugin_args(plugin_dir: str, *extra: str) -> list[str]:
    return [f"--plugin_dir={plugin_dir}", f"--count={COUNT}", *extra]


def instance(endpoint: str) -> int:
    match = INSTANCE_SOCKET.fullmatch(endpoint)
    assert match, f"{endpoint!r} is not token-resource.<instance>.sock"
    return int(match.group(1))


def connection(kubelet: FakeKubelet, endpoint: str) -> Connection:
    return newest_connection(kubelet, RESOURCE, endpoint)


def registered(endpoint: str) -> Callable[[FakeKubelet], bool]:
    return serving_from(RESOURCE, endpoint, COUNT)


def endpoints(resource: Resource) -> list[str]:
    return [r.endpoint for r in resource.registrations]


def dropped_at(resource: Resource) -> float:
    """When allocatable last dropped to 0 (time.monotonic())."""
    return next(t for t, allocatable in reversed(resource.allocatable_history) if allocatable == 0)


def expect_quiet(kubelet: FakeKubelet, registrations: int) -> None:
    """No Register beyond the first `registrations` arrives for QUIET_S: no ping-pong."""
    with pytest.raises(TimeoutError):
        kubelet.wait_until(lambda k: len(k.register_requests) > registrations, timeout=QUIET_S)


def surge(kubelet: FakeKubelet, daemons: Daemons, plugin_dir: str) -> tuple[Daemon, str, Daemon, str]:
    """A registers; B starts while A runs and registers; A goes to standby."""
    a = daemons(*plugin_args(plugin_dir))
    kubelet.wait_until(advertising(RESOURCE, COUNT))
    a_sock = kubelet.resources[RESOURCE].endpoint
    b = daemons(*plugin_args(plugin_dir))
    kubelet.wait_until(
        lambda k: k.resources[RESOURCE].endpoint != a_sock and registered(k.resources[RESOURCE].endpoint)(k)
    )
    b_sock = kubelet.resources[RESOURCE].endpoint
    assert instance(b_sock) > instance(a_sock)
    a.wait_for_log("standby")
    resource = kubelet.resources[RESOURCE]
    assert endpoints(resource) == [a_sock, b_sock] and resource.unhealthy_marks == 0
    assert a.process.poll() is None and b.process.poll() is None
    return a, a_sock, b, b_sock


@pytest.mark.parametrize("mode", list(Mode))
def test_sigterm_of_the_older_instance_after_a_surge(
    plugin_dir: str, kubelets: Kubelets, daemons: Daemons, mode: Mode
) -> None:
    kubelet = kubelets(mode)
    a, a_sock, b, b_sock = surge(kubelet, daemons, plugin_dir)
    resource = kubelet.resources[RESOURCE]
    assert a.terminate() == 0
    kubelet.wait_until(lambda k: connection(k, a_sock).cleaned_up)
    if mode is Mode.E2:
        # A's stream end disconnects B (#121994): one unhealthy mark, then B registers again at once.
        kubelet.wait_until(lambda k: len(resource.registrations) >= 3 and registered(b_sock)(k))
        assert resource.unhealthy_marks == 1
        assert resource.registrations[2].endpoint == b_sock
        assert resource.registrations[2].time - dropped_at(resource) < PROMPTLY_S
        expected = [a_sock, b_sock, b_sock]
    else:
        # E1: A is no longer the current endpoint; E3: only A's instance goes.
        assert registered(b_sock)(kubelet) and resource.unhealthy_marks == 0
        expected = [a_sock, b_sock]
    expect_quiet(kubelet, len(expected))
    assert endpoints(resource) == expected
    assert resource.unhealthy_marks == (1 if mode is Mode.E2 else 0)
    assert registered(b_sock)(kubelet) and b.process.poll() is None
    assert kubelet.admit("pod", "app", RESOURCE, 1).ids == ("item-0",)  # B answers Allocate
    files = os.listdir(plugin_dir)
    assert a_sock not in files and b_sock in files  # A removed only its own socket


@pytest.mark.parametrize(
    "mode,marks",
    [
        (Mode.E1, 1),  # B was the current endpoint
        (Mode.E2, 1),  # B was the client under the name
        (Mode.E3, 0),  # A's instance is still tracked: allocation falls back to it
    ],
)
def test_the_standby_instance_takes_over_when_the_newer_one_is_killed(
    plugin_dir: str, kubelets: Kubelets, daemons: Daemons, mode: Mode, marks: int
) -> None:
    kubelet = kubelets(mode)
    a, a_sock, b, b_sock = surge(kubelet, daemons, plugin_dir)
    resource = kubelet.resources[RESOURCE]
    b.process.kill()
    b.process.wait()
    kubelet.wait_until(lambda k: connection(k, b_sock).cleaned_up)
    if mode is Mode.E3:
        # A standby that registers again here is refused (its socket path is still tracked);
        # either way A keeps serving without an unhealthy mark.
        assert registered(a_sock)(kubelet)
        expect_quiet(kubelet, 3)
        assert endpoints(resource)[2:] in ([], [a_sock])
    else:
        kubelet.wait_until(lambda k: len(resource.registrations) >= 3 and registered(a_sock)(k), timeout=5)
        assert resource.registrations[2].endpoint == a_sock
        assert resource.registrations[2].time - dropped_at(resource) < PROMPTLY_S
        expect_quiet(kubelet, 3)
        assert endpoints(resource) == [a_sock, b_sock, a_sock]
    assert resource.unhealthy_marks == marks
    assert registered(a_sock)(kubelet) and a.process.poll() is None


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status == 200
    except urllib.error.HTTPError as error:
        assert error.code == 503
        return False


@pytest.mark.parametrize("mode", list(Mode))
def test_a_second_instance_on_a_fixed_socket_waits_until_it_is_free(
    plugin_dir: str, kubelets: Kubelets, daemons: Daemons, mode: Mode
) -> None:
    kubelet = kubelets(mode)
    a = daemons(*plugin_args(plugin_dir, "--socket=token-resource.sock"))
    kubelet.wait_until(advertising(RESOURCE, COUNT, registrations=1))
    port = free_port()
    b = daemons(*plugin_args(plugin_dir, "--socket=token-resource.sock", f"--http_port={port}"))
    b.wait_for_log("/readyz")
    expect_quiet(kubelet, 1)  # B waits: it neither registers nor takes the socket over
    assert b.process.poll() is None and not ready(port)
    resource = kubelet.resources[RESOURCE]
    assert a.terminate() == 0
    kubelet.wait_until(lambda k: resource.streams_opened == 2 and advertising(RESOURCE, COUNT)(k), timeout=15)
    # Stop-then-start: A was the only instance, so its end marks the resource unhealthy once.
    assert resource.unhealthy_marks == 1
    assert set(endpoints(resource)) == {"token-resource.sock"}
    if mode is not Mode.E3:  # E3 may refuse B once if it registers before A's end is processed
        assert len(resource.registrations) == 2
    expect_quiet(kubelet, len(kubelet.register_requests))
    assert b.process.poll() is None and "token-resource.sock" in os.listdir(plugin_dir)
