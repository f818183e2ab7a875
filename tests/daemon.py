"""Runs the real token-resource binary as a child process, for tests and the simulation."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

import inotify_simple

from token_resource import watch


def binary_path() -> str:
    """The py_binary //token_resource, from the runfiles tree this module runs in."""
    workspace_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(workspace_root, "token_resource", "token_resource")


def short_tempdir(prefix: str = "tr-") -> str:
    """A directory under /tmp: unix socket paths must stay under 108 bytes, which
    Bazel's TEST_TMPDIR alone nearly exhausts."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def terminate(process: subprocess.Popen, timeout: float) -> bool:
    """SIGTERM if it still runs, then wait up to `timeout`; SIGKILL if it outlives that.
    Returns whether it exited by itself."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


class Daemon:
    """One token-resource process; its stderr (absl logs) goes to a file for diagnosis."""

    def __init__(
        self, *args: str, log_dir: str | None = None, launcher: Sequence[str] = (), cwd: str | None = None
    ) -> None:
        self.args = list(args)
        self._log_dir = log_dir or short_tempdir("tr-log-")
        self.log_path = os.path.join(self._log_dir, "daemon.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (open as long as the process runs)
        self.process = subprocess.Popen(
            [*launcher, binary_path(), "--logtostderr", *self.args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM, then the exit code (killing it and raising TimeoutExpired if it outlives
        `timeout`)."""
        if not terminate(self.process, timeout):
            raise subprocess.TimeoutExpired(self.process.args, timeout)
        return self.process.returncode

    def wait(self, timeout: float = 10.0) -> int:
        return self.process.wait(timeout)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Until `text` appears in the log (inotify on the log file, no polling); TimeoutError
        if it does not within `timeout` or the process exits first."""
        inotify = inotify_simple.INotify()
        try:
            inotify.add_watch(self.log_path, inotify_simple.flags.MODIFY)
            deadline = time.monotonic() + timeout
            while text not in self.log():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise TimeoutError(f"{text!r} not in the log of {self.args}:\n{self.log()}")
                inotify.read(timeout=max(1, int(remaining * 1000)))
        finally:
            inotify.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        shutil.rmtree(self._log_dir, ignore_errors=True)


def run_to_exit(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Runs the binary to completion (bad flags, --version) and returns its output."""
    return subprocess.run([binary_path(), *args], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def created_in(directory: str, name: str) -> Iterator[threading.Event]:
    """An event set when `name` is created in `directory` (inotify, no polling); on leaving the
    block, waits for it."""
    with _named_event(directory, name, watch.flags.CREATE | watch.flags.MOVED_TO, "created") as event:
        yield event


@contextlib.contextmanager
def removed_from(directory: str, name: str) -> Iterator[threading.Event]:
    """An event set when `name` is removed from `directory` (inotify, no polling); on leaving
    the block, waits for it."""
    with _named_event(directory, name, watch.flags.DELETE | watch.flags.MOVED_FROM, "removed") as event:
        yield event


@contextlib.contextmanager
def _named_event(directory: str, name: str, mask: int, what: str) -> Iterator[threading.Event]:
    happened = threading.Event()

    def seen(event_name: str, event_mask: int) -> None:
        if event_name == name:
            happened.set()

    watcher = watch.Watcher()
    try:
        watcher.subscribe(directory, mask, seen)
        yield happened
        if not happened.wait(10):
            raise TimeoutError(f"{name} was not {what} in {directory}")
    finally:
        watcher.close()


def free_port() -> int:
    """A loopback TCP port that is free now (for the daemon's --http_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:<port><path>."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for_http(port: int, path: str, code: int, saying: str = "", timeout: float = 10.0) -> str:
    """Polls the endpoint until it answers `code` with `saying` in the body (an HTTP probe is
    itself a poll: the daemon offers no change notification)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = http_get(port, path)
        except OSError:
            status, body = 0, "no answer"
        if status == code and saying in body:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} answered {status} {body!r}, expected {code} saying {saying!r}")
        time.sleep(0.05)
