"""The device-plugin directory missing, read-only, or removed under a running daemon.

What a user gets (also in BENCHMARKS.md / README):
- missing at start: exit 1 with "the device-plugin directory ... does not exist";
- not writable at start: exit 1 with "cannot create the socket ...: is ... writable?";
- made read-only while running: nothing happens until the kubelet restarts; then the daemon
  cannot re-create its socket and exits 1 with the same message;
- removed (or renamed) while running: exit 1 with "the device-plugin directory ... was
  removed" (or "... does not exist" when the socket's removal is seen first), within moments;
  the DaemonSet's restart brings it back once the kubelet has re-created the directory (the
  daemon does not wait for it itself).
Root ignores directory permissions, so the read-only cases run the daemon without
CAP_DAC_OVERRIDE (setpriv), as a non-root container user would be.
"""

import functools
import os
import shutil

import pytest

from tests.daemon import short_tempdir
from tests.fake_kubelet import FakeKubelet, Mode, advertising
from tests.reliability.common import RESOURCE, plugin_args

NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


@pytest.fixture
def unprivileged(daemons):
    """Starts the daemon through setpriv (util-linux), so directory permissions apply even
    to root."""
    return functools.partial(daemons, launcher=NO_DAC if os.geteuid() == 0 else ())


def test_missing_at_start_exits_1_with_a_clear_message(plugin_dir, daemons):
    missing = os.path.join(plugin_dir, "device-plugins")
    daemon = daemons(*plugin_args(missing))
    assert daemon.wait(15) == 1
    assert f"the device-plugin directory {missing} does not exist" in daemon.log()
    assert "Traceback" not in daemon.log()


def test_not_writable_at_start_exits_1_with_a_clear_message(plugin_dir, unprivileged):
    os.chmod(plugin_dir, 0o555)
    daemon = unprivileged(*plugin_args(plugin_dir))
    assert daemon.wait(15) == 1
    assert f"cannot create the socket {plugin_dir}/token-resource.sock" in daemon.log()
    assert "Traceback" not in daemon.log()


def test_made_read_only_while_running_fails_at_the_next_kubelet_restart(plugin_dir, unprivileged):
    os.chmod(plugin_dir, 0o777)
    kubelet = FakeKubelet(plugin_dir, Mode.E2)
    kubelet.start()
    try:
        daemon = unprivileged(*plugin_args(plugin_dir, "--count=2"))
        kubelet.wait_until(advertising(RESOURCE, 2))
        os.chmod(plugin_dir, 0o555)
        # Serving goes on: the socket is already bound.
        assert kubelet.admit("pod", "c", "example.com/token", 1).ids == ("item-0",)
        kubelet.restart()  # deletes the daemon's socket, which it then cannot re-create
        assert daemon.wait(15) == 1
        assert "cannot create the socket" in daemon.log()
        assert "Traceback" not in daemon.log()
    finally:
        kubelet.stop()
        os.chmod(plugin_dir, 0o755)


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_removed_while_running_exits_1_and_a_restart_recovers(daemons, how):
    parent = short_tempdir()
    directory = os.path.join(parent, "dp")
    kubelet = FakeKubelet(directory, Mode.E2)
    kubelet.start()
    try:
        daemon = daemons(*plugin_args(directory, "--count=2"))
        kubelet.wait_until(advertising(RESOURCE, 2))
        kubelet.stop()
        if how == "removed":
            shutil.rmtree(directory)
        else:
            os.rename(directory, directory + ".old")
        assert daemon.wait(15) == 1
        # Which message depends on which inotify event the daemon handles first: the directory's
        # own removal, or its socket's (then it finds no directory to serve in).
        assert (
            f"the device-plugin directory {directory} was removed" in daemon.log()
            or f"the device-plugin directory {directory} does not exist" in daemon.log()
        )
        assert "Traceback" not in daemon.log()
        # The kubelet re-creates the directory; the restarted daemon (DaemonSet) registers.
        kubelet = FakeKubelet(directory, Mode.E2)
        kubelet.start()
        daemons(*plugin_args(directory, "--count=2"))
        kubelet.wait_until(advertising(RESOURCE, 2))
    finally:
        kubelet.stop()
        shutil.rmtree(parent, ignore_errors=True)
