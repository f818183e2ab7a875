"""Shared fixtures: a short temp directory, a fake kubelet in it, and daemons to clean up."""

import shutil

import pytest

from tests.daemon import Daemon, short_tempdir
from tests.fake_kubelet import FakeKubelet, Mode


@pytest.fixture
def plugin_dir():
    directory = short_tempdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def kubelet(plugin_dir):
    fake = FakeKubelet(plugin_dir, Mode.E2)
    fake.start()
    yield fake
    fake.stop()
    assert fake.violations == []


@pytest.fixture
def daemons(request):
    """start(*flags) runs a daemon; all are killed after the test, and their logs are
    printed if the test failed."""
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        daemon = Daemon(*args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        print(f"---- daemon {daemon.args} log ----\n{daemon.log()}")
        daemon.close()
