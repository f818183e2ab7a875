"""Shared fixtures: a short temp directory, a fake kubelet in it, and daemons to clean up."""

import pathlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import pytest

from tests.daemon import Daemon, short_tempdir
from tests.fake_apiserver import FakeAPIServer
from tests.fake_kubelet import STOP_GRACE_PERIOD_S, FakeKubelet, Mode, WatcherTiming
from token_resource.kubeapi import KubeAPI


class StartKubelet(Protocol):
    """The kubelets fixture: starts a FakeKubelet in plugin_dir (FakeKubelet's other arguments)."""

    def __call__(
        self,
        mode: Mode = Mode.E2,
        *,
        e1_dial: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        grace_period: float = STOP_GRACE_PERIOD_S,
        registry_dir: str | None = None,
        watcher: WatcherTiming = ...,
    ) -> FakeKubelet: ...


class StartDaemon(Protocol):
    """The daemons fixture: starts a Daemon (its arguments)."""

    def __call__(
        self, *args: str, log_dir: str | None = None, launcher: Sequence[str] = (), cwd: str | None = None
    ) -> Daemon: ...


@pytest.fixture
def plugin_dir() -> Iterator[str]:
    directory = short_tempdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def registry() -> Iterator[str]:
    """A plugin-watcher registry directory (plugins_registry)."""
    directory = short_tempdir("tr-reg-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def kubelets(plugin_dir: str) -> Iterator[StartKubelet]:
    """start(mode, **options) runs a fake kubelet in plugin_dir; each is stopped after the
    test, which fails if the kubelet saw the plugin break a protocol rule."""
    started: list[FakeKubelet] = []

    def start(mode: Mode = Mode.E2, **options: Any) -> FakeKubelet:  # StartKubelet's keywords, checked there
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
def kubelet(kubelets: StartKubelet) -> FakeKubelet:
    return kubelets(Mode.E2)


@pytest.fixture
def daemons(request: pytest.FixtureRequest) -> Iterator[StartDaemon]:
    """start(*flags, **options) runs a daemon (options as for Daemon); all are killed after
    the test, and their logs are printed if the test failed."""
    started: list[Daemon] = []

    def start(*args: str, log_dir: str | None = None, launcher: Sequence[str] = (), cwd: str | None = None) -> Daemon:
        daemon = Daemon(*args, log_dir=log_dir, launcher=launcher, cwd=cwd)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        print(f"---- daemon {daemon.args} log ----\n{daemon.log()}")
        daemon.close()


@pytest.fixture
def server() -> Iterator[FakeAPIServer]:
    """The fake Kubernetes API server (tests/fake_apiserver.py), on loopback."""
    fake = FakeAPIServer()
    yield fake
    fake.close()


@pytest.fixture
def api(server: FakeAPIServer, tmp_path: pathlib.Path) -> KubeAPI:
    """The daemon's API client, with the fake server's bearer token in a file."""
    token = tmp_path / "token"
    token.write_text(server.token + "\n")
    return KubeAPI(server.url, str(token))
