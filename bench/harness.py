"""What every benchmark in bench/ shares: starting a server beside a fake kubelet, and the figures.

One way to start anything a benchmark measures: `serving(start)` runs a fake kubelet (1.25+
mode) in a plugin directory, enters `start(directory)` (which spawns the server: the daemon
through its py_binary launcher, `python <script>`, a chroot or a podman container) and returns
once the kubelet holds a first ListAndWatch snapshot of every resource, with the time from the
spawn to then. A baseline server (no kubelet) is served once it answers GetDevicePluginOptions
on <directory>/noop.sock. Then one way to summarize repeated runs (median [min..max]) and to
print them (one table per benchmark).

Imported as `harness` by the scripts beside it (their directory is on sys.path), each of which
sets GRPC_VERBOSITY before it imports grpc.
"""

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import grpc
from google.protobuf.message import Message

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests import procfs
from tests.daemon import binary_path, short_tempdir, terminate
from tests.fake_kubelet import FakeKubelet, Mode

RESOURCE = "example.com/token"
NOOP_SOCKET = "noop.sock"  # a baseline server's socket, in its directory
# bench/ in the runfiles tree (the scripts' own directory on sys.path is their source directory).
BENCH = os.path.join(os.path.dirname(os.path.dirname(binary_path())), "bench")


# Statistics and tables -----------------------------------------------------------------------


class Summary(TypedDict):
    """A figure over several runs: their median and spread, and every run's value."""

    median: float
    min: float
    max: float
    runs: list[float]


def summary(per_run: list[float]) -> Summary:
    """Median of per-run figures, and their spread."""
    return {"median": statistics.median(per_run), "min": min(per_run), "max": max(per_run), "runs": per_run}


def ratio(plugin: Summary, baseline: Summary) -> float:
    return plugin["median"] / baseline["median"] if baseline["median"] else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def fmt(s: Summary, unit: str = "ms", scale: float = 1e3, digits: int = 3) -> str:
    """`median unit [min..max]`, each scaled (no unit: `median [min..max]`)."""
    median = f"{s['median'] * scale:.{digits}f}" + (f" {unit}" if unit else "")
    return f"{median} [{s['min'] * scale:.{digits}f}..{s['max'] * scale:.{digits}f}]"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n## {title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def latencies(call: Callable[..., object], request: Message, n: int) -> list[float]:
    """`n` calls one after the other; the seconds each took."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call(request, timeout=30)
        out.append(time.perf_counter() - t)
    return out


def loadavg_text() -> str:
    """The 1-, 5- and 15-minute load averages, as /proc/loadavg has them: the machine is shared."""
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def loadavg() -> float:
    """The 1-minute load average."""
    return float(loadavg_text().split()[0])


def machine() -> dict[str, object]:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def default_json(name: str, elsewhere: str) -> str:
    """bench/<name> in the workspace under `bazel run`, else `elsewhere` in the temporary directory."""
    workspace = os.environ.get("BUILD_WORKSPACE_DIRECTORY")
    return os.path.join(workspace, "bench", name) if workspace else os.path.join(tempfile.gettempdir(), elsewhere)


def settle(pid: int, timeout: float = 5.0, read: Callable[[int], int] = procfs.rss_bytes) -> None:
    """Until RSS (`read(pid)`) stops moving (three equal readings 100 ms apart) or `timeout`."""
    deadline, last, same = time.monotonic() + timeout, -1, 0
    while time.monotonic() < deadline and same < 3:
        value = read(pid)
        same = same + 1 if value == last else 0
        last = value
        time.sleep(0.1)


# Servers -------------------------------------------------------------------------------------

# Spawns a server for a plugin directory (its argument) and yields its pid; stops it on exit.
Starter = Callable[[str], contextlib.AbstractContextManager[int]]


@contextlib.contextmanager
def spawn(argv: Sequence[str], env: Mapping[str, str] | None = None, log: str | None = None) -> Iterator[int]:
    """`argv` as a child process (stderr to the file `log`, or nowhere) and its pid; SIGTERM on
    exit (SIGKILL if it outlives 30 s)."""
    with open(log or os.devnull, "wb") as stderr:
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            yield process.pid
        finally:
            terminate(process, 30)


def python_env() -> dict[str, str]:
    """This environment, with this process's sys.path as PYTHONPATH (for `python <script>`)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def daemon(*flags: str) -> Starter:
    """The daemon through its py_binary launcher (//token_resource), its log in <directory>/daemon.log."""
    return lambda directory: spawn(
        [binary_path(), "--logtostderr", f"--plugin_dir={directory}", *flags],
        log=os.path.join(directory, "daemon.log"),
    )


def noop_server(*flags: str) -> Starter:
    """The baseline, //bench:noop_server, on <directory>/noop.sock (serve it with baseline=True)."""
    return lambda directory: spawn(
        [os.path.join(BENCH, "noop_server"), f"--socket={os.path.join(directory, NOOP_SOCKET)}", *flags]
    )


def connect(path: str, receive_limit: int | None = 64 * 1024 * 1024, timeout: float = 30.0) -> grpc.Channel:
    """A channel to the unix socket `path`, once ready (receive_limit None: gRPC's 4 MiB, the kubelet's)."""
    options: list[tuple[str, str | int]] = [("grpc.default_authority", "localhost")]
    if receive_limit is not None:
        options.append(("grpc.max_receive_message_length", receive_limit))
    channel = grpc.insecure_channel(f"unix://{path}", options=options)
    grpc.channel_ready_future(channel).result(timeout=timeout)
    return channel


class Kubelet(FakeKubelet):
    """The fake kubelet (1.25+), noting when kubelet.sock is served (on the clock of register_times)."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory, Mode.E2)
        self.started_at = 0.0

    def start(self) -> None:
        super().start()
        self.started_at = time.monotonic()


def snapshots_of(names: Sequence[str]) -> Callable[[FakeKubelet], bool]:
    """Each of `names` registered, its ListAndWatch stream connected and a first snapshot in."""

    def check(kubelet: FakeKubelet) -> bool:
        found = [kubelet.resources.get(n) for n in names]
        return all(r is not None and r.connected and bool(r.snapshots) for r in found)

    return check


@contextlib.contextmanager
def workdir(path: str | None = None) -> Iterator[str]:
    """`path`, or a fresh short directory under /tmp removed afterwards."""
    if path is not None:
        yield path
        return
    fresh = short_tempdir("tr-bench-")
    try:
        yield fresh
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


@contextlib.contextmanager
def kubelet(path: str | None = None) -> Iterator[Kubelet]:
    """A fake kubelet serving kubelet.sock in `path` (or a fresh directory), stopped afterwards."""
    with workdir(path) as where:
        k = Kubelet(where)
        k.start()
        try:
            yield k
        finally:
            k.stop()


@dataclass
class Server:
    """A started server: its plugin directory, pid, spawn -> registered (or answering) time, and
    its fake kubelet (None for a baseline)."""

    directory: str
    pid: int
    startup_s: float
    kubelet: Kubelet | None
    channels: list[grpc.Channel] = field(default_factory=list)  # closed when the server stops

    def socket(self, resource: str = RESOURCE) -> str:
        """The path of the socket serving `resource`, as registered (a baseline's noop.sock)."""
        if self.kubelet is None:
            return os.path.join(self.directory, NOOP_SOCKET)
        return os.path.join(self.directory, self.kubelet.resources[resource].endpoint)

    def connect(self, resource: str = RESOURCE) -> grpc.Channel:
        """A channel to `socket(resource)`, closed when the server stops."""
        channel = connect(self.socket(resource))
        self.channels.append(channel)
        return channel

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


@contextlib.contextmanager
def serving(
    start: Starter,
    resources: Sequence[str] = (RESOURCE,),
    *,
    baseline: bool = False,
    directory: str | None = None,
    timeout: float = 60.0,
) -> Iterator[Server]:
    """`start` entered for `directory` (default: a fresh one, removed afterwards), until it is
    registered with a fake kubelet there, with a first snapshot of each of `resources`; or, for a
    `baseline` server (no kubelet), until it answers GetDevicePluginOptions on noop.sock, over a
    channel that stays open. The server stops, then the kubelet, on exit."""
    with contextlib.ExitStack() as stack:
        where = stack.enter_context(workdir(directory))
        k = None if baseline else stack.enter_context(kubelet(where))
        started = time.perf_counter()
        pid = stack.enter_context(start(where))
        server = Server(where, pid, 0.0, k)
        stack.callback(server.close)
        if k is not None:
            k.wait_until(snapshots_of(resources), timeout=timeout)
        else:
            channel = connect(server.socket(), timeout=timeout)
            server.channels.append(channel)
            api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(api_pb2.Empty(), timeout=10)
        server.startup_s = time.perf_counter() - started
        yield server
