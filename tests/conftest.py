"""Shared fixtures: a short temp directory, a fake kubelet in it, and daemons to clean up."""

import shutil
from typing import Any

import pytest

from tests.daemon import Daemon, short_tempdir
from tests.fake_kubelet import FakeKubelet, Mode


@pytest.fixture
def plugin_dir():
    directory = short_tempdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def kubelets(plugin_dir):
    """start(mode, **options) runs a fake kubelet in plugin_dir; each is stopped after the
    test, which fails if the kubelet saw the plugin break a protocol rule."""
    started: list[FakeKubelet] = []

    def start(mode: Mode = Mode.E2, **options) -> FakeKubelet:
        fake = FakeKubelet(plugin_dir, mode, **options)
        fake.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        if fake.e1_dial is not None:
            fake.e1_dial.set()  # release a held-back dial so its thread ends
        fake.stop()
    for fake in started:
        assert fake.violations == []


@pytest.fixture
def kubelet(kubelets):
    return kubelets(Mode.E2)


@pytest.fixture
def daemons(request):
    """start(*flags, **options) runs a daemon (options as for Daemon); all are killed after
    the test, and their logs are printed if the test failed."""
    started: list[Daemon] = []

    def start(*args: str, **options: Any) -> Daemon:
        daemon = Daemon(*args, **options)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        print(f"---- daemon {daemon.args} log ----\n{daemon.log()}")
        daemon.close()
