"""Runs the real token-resource binary as a child process, for tests and the simulation."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence

from token_resource import watch


def binary_path() -> str:
    """The py_binary //token_resource, from the runfiles tree this module runs in."""
    workspace_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(workspace_root, "token_resource", "token_resource")


def short_tempdir(prefix: str = "tr-") -> str:
    """A directory under /tmp: unix socket paths must stay under 108 bytes, which
    Bazel's TEST_TMPDIR alone nearly exhausts."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


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
        """SIGTERM, then the exit code (killing it if it outlives `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def wait(self, timeout: float = 10.0) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self._log.close()
        shutil.rmtree(self._log_dir, ignore_errors=True)


def run_to_exit(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Runs the binary to completion (bad flags, --version) and returns its output."""
    return subprocess.run([binary_path(), *args], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def created_in(directory: str, name: str) -> Iterator[threading.Event]:
    """An event set when `name` is created in `directory` (inotify, no polling)."""
    created = threading.Event()

    def seen(event_name: str, mask: int) -> None:
        if event_name == name:
            created.set()

    events = watch.DirectoryEvents(directory, watch.flags.CREATE | watch.flags.MOVED_TO, seen, name="test-watch")
    try:
        yield created
        if not created.wait(10):
            raise TimeoutError(f"{name} was not created in {directory}")
    finally:
        events.close()


def free_port() -> int:
    """A loopback TCP port that is free now (for the daemon's --http_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
