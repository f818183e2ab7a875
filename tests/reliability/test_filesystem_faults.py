"""The device-plugin directory missing, read-only, or removed under a running daemon.

What a user gets (also in README.md beside this file):
- missing at start: exit 1 with "the device-plugin directory ... does not exist" (a wrong
  --plugin_dir or a missing mount is a deployment mistake, said at once);
- not writable at start: exit 1 with "cannot create the socket in ...: is ... writable?";
- made read-only while running: nothing happens until the kubelet restarts; then the daemon
  cannot re-create its socket, stays up and retries with back-off ("cannot create the socket
  ...", in /readyz meanwhile), and serves and registers again once the directory is writable;
- removed (or renamed) while running: the daemon stays up, stops serving and retries; /healthz
  says "the device-plugin directory ... is missing" (in a pod the liveness probe restarts the
  container, which mounts the directory anew); when the directory comes back at the same path
  the same process watches it again, serves, and registers once kubelet.sock appears.
Root ignores directory permissions, so the read-only cases run the daemon without
CAP_DAC_OVERRIDE (setpriv), as a non-root container user would be.
"""

import functools
import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import StartDaemon
from tests.daemon import Daemon, free_port, http_get, short_tempdir, wait_for_http
from tests.fake_kubelet import FakeKubelet, Mode, advertising
from tests.reliability.common import RESOURCE, SOCKET, plugin_args
from token_resource.backoff import BACKOFF_CAP_S

NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


@pytest.fixture
def unprivileged(daemons: StartDaemon) -> Callable[..., Daemon]:
    """Starts the daemon through setpriv (util-linux), so directory permissions apply even
    to root."""
    return functools.partial(daemons, launcher=NO_DAC if os.geteuid() == 0 else ())


@pytest.fixture
def nested() -> Iterator[str]:
    """A device-plugin directory path inside a temporary parent, so it can be removed and
    re-created."""
    parent = short_tempdir()
    yield os.path.join(parent, "dp")
    shutil.rmtree(parent, ignore_errors=True)


def http_args(port: int) -> list[str]:
    return [f"--http_port={port}", "--http_address=127.0.0.1"]


def registered_again(registrations: int) -> Callable[[FakeKubelet], bool]:
    return lambda k: len(k.register_requests) == registrations and advertising(RESOURCE, 2)(k)


def test_missing_at_start_exits_1_with_a_clear_message(plugin_dir: str, daemons: StartDaemon) -> None:
    missing = os.path.join(plugin_dir, "device-plugins")
    daemon = daemons(*plugin_args(missing))
    assert daemon.wait(15) == 1
    assert f"the device-plugin directory {missing} does not exist" in daemon.log()
    assert "Traceback" not in daemon.log()


def test_not_writable_at_start_exits_1_with_a_clear_message(
    plugin_dir: str, unprivileged: Callable[..., Daemon]
) -> None:
    os.chmod(plugin_dir, 0o555)
    daemon = unprivileged(*plugin_args(plugin_dir))
    assert daemon.wait(15) == 1
    assert f"cannot create the socket in {plugin_dir}: is {plugin_dir} writable?" in daemon.log()
    assert "Traceback" not in daemon.log()


def test_made_read_only_while_running_it_retries_and_recovers_without_a_restart(
    plugin_dir: str, unprivileged: Callable[..., Daemon]
) -> None:
    os.chmod(plugin_dir, 0o777)
    kubelet = FakeKubelet(plugin_dir, Mode.E2)
    kubelet.start()
    port = free_port()
    try:
        daemon = unprivileged(*plugin_args(plugin_dir, "--count=2", *http_args(port)))
        kubelet.wait_until(advertising(RESOURCE, 2))
        os.chmod(plugin_dir, 0o555)
        # Serving goes on: the socket is already bound.
        assert kubelet.admit("pod", "c", RESOURCE, 1).ids == ("item-0",)
        kubelet.restart()  # deletes the daemon's socket, which it then cannot re-create
        cannot = f"cannot create the socket {plugin_dir}/{SOCKET}: is {plugin_dir} writable?"
        daemon.wait_for_log(cannot)
        wait_for_http(port, "/readyz", 503, saying=f"{RESOURCE}: not serving; retrying: {cannot}")
        assert http_get(port, "/healthz")[0] == 200  # the directory is there: a restart would not help
        assert daemon.process.poll() is None
        os.chmod(plugin_dir, 0o777)
        kubelet.wait_until(registered_again(2), timeout=2 * BACKOFF_CAP_S)
        wait_for_http(port, "/readyz", 200)
        assert kubelet.admit("pod-2", "c", RESOURCE, 1).ids == ("item-1",)  # "pod" keeps item-0
        assert daemon.process.poll() is None
        assert daemon.log().count("cannot serve") == 1  # said once, however many retries
        assert "Traceback" not in daemon.log()
    finally:
        kubelet.stop()
        os.chmod(plugin_dir, 0o755)


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_removed_while_running_it_waits_and_the_same_process_recovers(
    nested: str, daemons: StartDaemon, how: str
) -> None:
    directory = nested
    kubelet = FakeKubelet(directory, Mode.E2)
    kubelet.start()
    port = free_port()
    try:
        daemon = daemons(*plugin_args(directory, "--count=2", *http_args(port)))
        kubelet.wait_until(advertising(RESOURCE, 2))
        kubelet.stop()
        if how == "removed":
            # rm -rf races the daemon, which serves again at once when its socket goes (as after
            # a kubelet restart), so the directory may not be empty by rmdir: repeat, as a person would.
            while os.path.exists(directory):
                shutil.rmtree(directory, ignore_errors=True)
        else:
            os.rename(directory, directory + ".old")
        daemon.wait_for_log(f"{directory} was removed")
        wait_for_http(port, "/healthz", 503, saying=f"the device-plugin directory {directory} is missing")
        wait_for_http(port, "/readyz", 503, saying=f"{RESOURCE}: not serving; retrying")
        assert daemon.process.poll() is None
        # The kubelet re-creates the directory and its socket: the same process serves and registers.
        kubelet = FakeKubelet(directory, Mode.E2)
        kubelet.start()
        kubelet.wait_until(advertising(RESOURCE, 2), timeout=2 * BACKOFF_CAP_S)
        assert kubelet.register_requests[0].endpoint == SOCKET
        wait_for_http(port, "/healthz", 200)
        wait_for_http(port, "/readyz", 200)
        assert kubelet.admit("pod", "c", RESOURCE, 1).ids == ("item-0",)
        assert daemon.process.poll() is None
        assert "Traceback" not in daemon.log()
    finally:
        kubelet.stop()


def test_the_renamed_away_directory_is_watched_no_more(nested: str, daemons: StartDaemon) -> None:
    directory = nested
    kubelet = FakeKubelet(directory, Mode.E2)
    kubelet.start()
    try:
        daemon = daemons(*plugin_args(directory, "--count=2"))
        kubelet.wait_until(advertising(RESOURCE, 2))
        kubelet.stop()
        os.rename(directory, directory + ".old")
        daemon.wait_for_log(f"{directory} was removed")
        kubelet = FakeKubelet(directory, Mode.E2)
        kubelet.start()
        kubelet.wait_until(advertising(RESOURCE, 2), timeout=2 * BACKOFF_CAP_S)
        registrations = len(kubelet.register_requests)
        shutil.rmtree(directory + ".old")  # nothing to do with the plugin any more
        with pytest.raises(TimeoutError):  # no new Register: the daemon kept serving
            kubelet.wait_until(lambda k: len(k.register_requests) > registrations, timeout=3)
        assert daemon.log().count("was removed") == 1
    finally:
        kubelet.stop()
