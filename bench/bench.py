"""Benchmarks of the real token-resource daemon, each beside its baseline, in one run.

    tools/bazel run //bench -- all                  # everything (~2.5 minutes on 2 cores)
    tools/bazel run //bench -- allocate startup     # some of: allocate startup recovery idle scale
    tools/bazel run //bench -- all --json=/tmp/r.json --repeats=7

Prints one table per benchmark and writes JSON (default: bench/results.json in the workspace;
a partial run updates only its own sections). Every figure is the median over repeated runs
with its spread (min..max of the per-run figures), the baseline measured the same way in the
same run, and the ratio plugin/baseline. See BENCHMARKS.md for what each one means.
"""

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TypedDict

# Keep gRPC's C-core INFO lines ("Got goaway ...") out of the tables; inherited by the daemons spawned.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from google.protobuf.message import Message

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests.daemon import Daemon, binary_path, run_to_exit, short_tempdir
from tests.fake_kubelet import FakeKubelet, Mode
from tests.reliability import procfs
from token_resource import tokens

RESOURCE = "example.com/token"
SOCKET = "token-resource.sock"
MAX = tokens.max_count()
SIZES = (1, 100, 1000)
COUNTS = (1, 1_000, 10_000, 100_000, MAX)


# Statistics ----------------------------------------------------------------------------------


def _reconnected(kubelet: FakeKubelet, seen: int) -> bool:
    """Registered again (options known) and a snapshot beyond the first `seen` received."""
    resource = kubelet.resources[RESOURCE]
    return resource.options is not None and resource.connected and len(resource.snapshots) > seen


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


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


def fmt(s: Summary, unit: str = "ms", scale: float = 1e3, digits: int = 3) -> str:
    return f"{s['median'] * scale:.{digits}f} {unit} [{s['min'] * scale:.{digits}f}..{s['max'] * scale:.{digits}f}]"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n## {title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)))
    sys.stdout.flush()


# Processes ----------------------------------------------------------------------------------


def _workspace_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NoopServer:
    """//bench:noop_server in its own process: the baseline gRPC server."""

    def __init__(self, directory: str, responses: str | None = None) -> None:
        self.socket = os.path.join(directory, "noop.sock")
        args = [os.path.join(_workspace_root(), "bench", "noop_server"), f"--socket={self.socket}"]
        if responses:
            args.append(f"--responses={responses}")
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.process.stdout is not None  # stdout=PIPE
        if self.process.stdout.readline().strip() != b"serving":
            raise RuntimeError("noop server did not start")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def connect(path: str) -> grpc.Channel:
    ch = grpc.insecure_channel(
        f"unix://{path}",
        options=[("grpc.default_authority", "localhost"), ("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    grpc.channel_ready_future(ch).result(timeout=30)
    return ch


def registered(k: FakeKubelet) -> bool:
    r = k.resources.get(RESOURCE)
    return r is not None and r.connected and bool(r.snapshots)


def settle(pid: int, timeout: float = 5.0) -> None:
    """Until RSS stops moving (three equal readings 100 ms apart) or `timeout`."""
    deadline, last, same = time.monotonic() + timeout, None, 0
    while time.monotonic() < deadline and same < 3:
        value = procfs.rss_bytes(pid)
        same = same + 1 if value == last else 0
        last = value
        time.sleep(0.1)


class TimedKubelet(FakeKubelet):
    """The fake kubelet, noting when kubelet.sock is served (on the clock of register_times)."""

    def __init__(self, directory: str, mode: Mode = Mode.E2) -> None:
        super().__init__(directory, mode)
        self.started_at = 0.0

    def start(self) -> None:
        super().start()
        self.started_at = time.monotonic()


# Unary latency ------------------------------------------------------------------------------


def _latencies(call: Callable[..., object], request: Message, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call(request, timeout=30)
        out.append(time.perf_counter() - t)
    return out


def _allocate_request(n: int) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=[tokens.token_id(i) for i in range(n)])]
    )


def _preferred_request(n: int) -> api_pb2.PreferredAllocationRequest:
    return api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=[tokens.token_id(i) for i in reversed(range(n))], allocation_size=max(1, n // 2)
            )
        ]
    )


def bench_allocate(repeats: int) -> dict:
    """Allocate (and GetPreferredAllocation) latency: daemon vs the no-op server, interleaved."""
    directory = short_tempdir("tr-bench-")
    kubelet = FakeKubelet(directory, Mode.E2)
    kubelet.start()
    daemon = Daemon(f"--plugin_dir={directory}", f"--socket={SOCKET}", f"--count={max(SIZES)}")
    noop = None
    try:
        kubelet.wait_until(registered, timeout=30)
        plugin_ch = connect(os.path.join(directory, SOCKET))
        plugin = api_pb2_grpc.DevicePluginStub(plugin_ch)
        # The baseline returns the daemon's own answers, byte for byte, without computing them.
        canned: dict[str, dict[int, str]] = {"Allocate": {}, "GetPreferredAllocation": {}}
        for n in SIZES:
            canned["Allocate"][n] = plugin.Allocate(_allocate_request(n)).SerializeToString().hex()
            canned["GetPreferredAllocation"][n] = (
                plugin.GetPreferredAllocation(_preferred_request(n)).SerializeToString().hex()
            )
        responses = os.path.join(directory, "canned.json")
        with open(responses, "w", encoding="utf-8") as f:
            json.dump(canned, f)
        noop = NoopServer(directory, responses)
        noop_ch = connect(noop.socket)
        base = api_pb2_grpc.DevicePluginStub(noop_ch)

        results, rows = {}, []
        cases = [("Allocate", n) for n in SIZES] + [("GetPreferredAllocation", n) for n in SIZES]
        for method, n in cases:
            request = _allocate_request(n) if method == "Allocate" else _preferred_request(n)
            calls = {1: 2000, 100: 1000, 1000: 300}[n]
            runs: dict[str, dict[str, list[float]]] = {
                "plugin": {"p50": [], "p99": []},
                "baseline": {"p50": [], "p99": []},
            }
            for r in range(repeats):
                order = [("plugin", plugin), ("baseline", base)]
                for name, target in order if r % 2 == 0 else order[::-1]:
                    call = getattr(target, method)
                    _latencies(call, request, min(200, calls // 4))  # warm-up
                    lat = _latencies(call, request, calls)
                    runs[name]["p50"].append(percentile(lat, 50))
                    runs[name]["p99"].append(percentile(lat, 99))
            key = f"{method}[{n}]"
            entry: dict[str, object] = {
                "calls_per_run": calls,
                "request_bytes": request.ByteSize(),
                "response_bytes": len(bytes.fromhex(canned[method][n])),
            }
            for q in ("p50", "p99"):
                p, b = summary(runs["plugin"][q]), summary(runs["baseline"][q])
                entry[q] = {"plugin_s": p, "baseline_s": b, "ratio": ratio(p, b)}
                rows.append([key, q, fmt(p), fmt(b), f"{ratio(p, b):.2f}"])
            results[key] = entry
        table(
            f"Allocate / GetPreferredAllocation latency over the unix socket (median [min..max] of {repeats} runs)",
            ["call[IDs]", "q", "plugin", "no-op baseline", "ratio"],
            rows,
        )
        plugin_ch.close()
        noop_ch.close()
        return results
    finally:
        if noop is not None:
            noop.stop()
        daemon.terminate()
        daemon.close()
        kubelet.stop()


# Start-up ------------------------------------------------------------------------------------


def _time_process(args: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def startup_to_snapshot(count: int) -> float:
    """Process start -> the fake kubelet holds the first ListAndWatch snapshot."""
    directory = short_tempdir("tr-bench-")
    kubelet = FakeKubelet(directory, Mode.E2)
    kubelet.start()
    try:
        t = time.perf_counter()
        daemon = Daemon(f"--plugin_dir={directory}", f"--socket={SOCKET}", f"--count={count}")
        try:
            kubelet.wait_until(registered, timeout=60)
            return time.perf_counter() - t
        finally:
            daemon.terminate()
            daemon.close()
    finally:
        kubelet.stop()


def bench_startup(repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    runs: dict[str, list[float]] = {"plugin": [], "import_grpc": [], "python": [], "version": []}
    for _ in range(repeats):
        runs["plugin"].append(startup_to_snapshot(1))
        runs["import_grpc"].append(_time_process([sys.executable, "-c", "import grpc"], env))
        runs["python"].append(_time_process([sys.executable, "-c", "pass"], env))
        runs["version"].append(_time_process([binary_path(), "--version"]))
    s = {k: summary(v) for k, v in runs.items()}
    rows = [
        ["daemon start -> first snapshot at the kubelet", fmt(s["plugin"]), "1.00"],
        ['baseline: python -c "import grpc"', fmt(s["import_grpc"]), f"{ratio(s['plugin'], s['import_grpc']):.2f}"],
        [
            "reference: token_resource --version (launcher + imports)",
            fmt(s["version"]),
            f"{ratio(s['plugin'], s['version']):.2f}",
        ],
        ['reference: python -c "pass"', fmt(s["python"]), f"{ratio(s['plugin'], s['python']):.2f}"],
    ]
    table(f"Start-up (median [min..max] of {repeats} runs)", ["what", "time", "plugin / this"], rows)
    return {
        "plugin_to_first_snapshot_s": s["plugin"],
        "baseline_import_grpc_s": s["import_grpc"],
        "ratio": ratio(s["plugin"], s["import_grpc"]),
        "version_s": s["version"],
        "python_s": s["python"],
    }


# Kubelet-restart recovery ---------------------------------------------------------------------


def recovery_trials(trials: int, count: int = 1) -> dict:
    directory = short_tempdir("tr-bench-")
    kubelet = TimedKubelet(directory, Mode.E2)
    kubelet.start()
    daemon = Daemon(f"--plugin_dir={directory}", f"--socket={SOCKET}", f"--count={count}")
    register, snapshot = [], []
    try:
        kubelet.wait_until(registered, timeout=60)
        for _ in range(trials):
            seen = len(kubelet.resources[RESOURCE].snapshots)
            kubelet.restart()  # forgets the options: only a new registration sets them again
            kubelet.wait_until(functools.partial(_reconnected, seen=seen), timeout=60)
            done = time.monotonic()
            register.append(kubelet.register_times[-1] - kubelet.started_at)
            snapshot.append(done - kubelet.started_at)
        extra = len(kubelet.register_requests) - (trials + 1)  # Register calls beyond one per restart
        violations = list(kubelet.violations)
        if extra and os.environ.get("BENCH_DEBUG"):
            print(daemon.log()[-20000:])
        daemon.terminate()
        # Baseline: the floor for any plugin, a process that is already connected-ready and
        # needs only to dial the new kubelet.sock and make one call (answered at once).
        floor = []
        for _ in range(trials):
            kubelet.restart()
            t = kubelet.started_at
            ch = grpc.insecure_channel(f"unix://{kubelet.socket_path}")
            with contextlib.suppress(grpc.RpcError):  # the version is refused: that answer ends the round trip
                api_pb2_grpc.RegistrationStub(ch).Register(api_pb2.RegisterRequest(version="baseline"), timeout=10)
            floor.append(time.monotonic() - t)
            ch.close()
    finally:
        daemon.close()
        kubelet.stop()

    def dist(values: list[float]) -> dict[str, float]:
        return {
            "min": min(values),
            "median": statistics.median(values),
            "p99": percentile(values, 99),
            "max": max(values),
            "trials": len(values),
        }

    return {
        "register": dist(register),
        "snapshot": dist(snapshot),
        "floor": dist(floor),
        "extra_registrations": extra,
        "violations": violations,
    }


def bench_recovery(trials: int) -> dict:
    r = recovery_trials(trials)

    def row(name: str, d: dict[str, float], base: dict[str, float] | None = None) -> list[str]:
        cells = [name] + [f"{d[k] * 1e3:.1f}" for k in ("min", "median", "p99", "max")]
        return [*cells, f"{d['median'] / base['median']:.1f}" if base else "1.0"]

    rows = [
        row("kubelet.sock served -> Register received", r["register"], r["floor"]),
        row("kubelet.sock served -> first snapshot received", r["snapshot"], r["floor"]),
        row("baseline: dial new kubelet.sock + one call", r["floor"]),
    ]
    table(
        f"Kubelet-restart recovery over {trials} restarts (ms); "
        f"Register calls beyond one per restart: {r['extra_registrations']}",
        ["interval", "min", "median", "p99", "max", "median / baseline"],
        rows,
    )
    return r


# Idle footprint -------------------------------------------------------------------------------


@contextlib.contextmanager
def registered_daemon(count: int) -> Iterator[tuple[str, Daemon]]:
    """(plugin directory, daemon) for a daemon with `count` tokens, registered with a fake
    kubelet; both are stopped afterwards."""
    directory = short_tempdir("tr-bench-")
    kubelet = FakeKubelet(directory, Mode.E2)
    kubelet.start()
    daemon = Daemon(f"--plugin_dir={directory}", f"--socket={SOCKET}", f"--count={count}")
    try:
        kubelet.wait_until(registered, timeout=60)
        yield directory, daemon
    finally:
        daemon.terminate()
        daemon.close()
        kubelet.stop()


def idle_footprint(count: int) -> dict[str, int]:
    with registered_daemon(count) as (_, daemon):
        settle(daemon.pid)
        return {
            "rss": procfs.rss_bytes(daemon.pid),
            "threads": procfs.threads(daemon.pid),
            "fds": procfs.fds(daemon.pid),
        }


def bench_idle(repeats: int) -> dict:
    runs: dict[str, list[dict[str, int]]] = {"plugin": [], "baseline": []}
    for _ in range(repeats):
        runs["plugin"].append(idle_footprint(1))
        directory = short_tempdir("tr-bench-")
        noop = NoopServer(directory)
        try:
            ch = connect(noop.socket)
            options: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                "/v1beta1.DevicePlugin/GetDevicePluginOptions"
            )
            options(b"", timeout=10)
            settle(noop.pid)
            runs["baseline"].append(
                {"rss": procfs.rss_bytes(noop.pid), "threads": procfs.threads(noop.pid), "fds": procfs.fds(noop.pid)}
            )
            ch.close()
        finally:
            noop.stop()
    out, rows = {}, []
    for key, unit, scale in (("rss", "MiB", 2**-20), ("threads", "", 1), ("fds", "", 1)):
        p = summary([r[key] * scale for r in runs["plugin"]])
        b = summary([r[key] * scale for r in runs["baseline"]])
        out[key] = {"plugin": p, "baseline": b, "ratio": ratio(p, b)}
        digits = 1 if key == "rss" else 0
        rows.append(
            [key + (f" ({unit})" if unit else ""), fmt(p, "", 1, digits), fmt(b, "", 1, digits), f"{ratio(p, b):.2f}"]
        )
    table(
        f"Idle footprint, registered with 1 token (median [min..max] of {repeats} runs)",
        ["figure", "plugin", "bare grpcio server, 1 no-op method", "ratio"],
        rows,
    )
    return out


# Scale -----------------------------------------------------------------------------------------


def _first_snapshot_over_socket(path: str, repeats: int) -> list[float]:
    """ListAndWatch opened by a client with the kubelet's 4 MiB limit -> first message decoded."""
    ch = grpc.insecure_channel(f"unix://{path}", options=[("grpc.default_authority", "localhost")])
    grpc.channel_ready_future(ch).result(timeout=30)
    stub = api_pb2_grpc.DevicePluginStub(ch)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        stream = stub.ListAndWatch(api_pb2.Empty())
        next(stream)
        times.append(time.perf_counter() - t)
        stream.cancel()
    ch.close()
    return times[1:]  # the first also pays for the connection


def bench_scale(repeats: int) -> dict:
    out, rows = {}, []
    for count in COUNTS:
        build, encode = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            snap = tokens.snapshot(count)
            build.append(time.perf_counter() - t)
            t = time.perf_counter()
            data = snap.SerializeToString()
            encode.append(time.perf_counter() - t)
        assert len(data) == tokens.snapshot_bytes(count)
        # The daemon itself: start-up to the kubelet's first snapshot, a snapshot over the socket,
        # idle memory, and the Register round trip after a kubelet restart.
        startup = [startup_to_snapshot(count) for _ in range(max(2, repeats // 2))]
        with registered_daemon(count) as (directory, daemon):
            send = _first_snapshot_over_socket(os.path.join(directory, SOCKET), repeats)
            settle(daemon.pid)
            rss = procfs.rss_bytes(daemon.pid)
        recovery = recovery_trials(max(5, repeats), count)
        out[count] = {
            "snapshot_bytes": len(data),
            "build_s": summary(build),
            "encode_s": summary(encode),
            "send_s": summary(send),
            "startup_s": summary(startup),
            "idle_rss_bytes": rss,
            "recovery_register_s": recovery["register"],
            "recovery_extra_registrations": recovery["extra_registrations"],
            "recovery_violations": recovery["violations"],
        }
    base = out[COUNTS[0]]
    for count, r in out.items():
        rows.append(
            [
                f"{count:,}",
                f"{r['snapshot_bytes']:,}",
                fmt(r["build_s"], digits=2),
                fmt(r["encode_s"], digits=2),
                fmt(r["send_s"], digits=2),
                fmt(r["startup_s"], "s", 1, 3),
                f"{r['recovery_register_s']['median'] * 1e3:.1f} ms",
                f"{r['recovery_extra_registrations']} / {r['recovery_register_s']['trials']}",
                f"{r['idle_rss_bytes'] / 2**20:.1f} MiB",
                f"{r['send_s']['median'] / base['send_s']['median']:.0f}x",
            ]
        )
    table(
        f"Scale with the token count (median [min..max] of {repeats} runs; baseline = the 1-token row)",
        [
            "tokens",
            "snapshot B",
            "build",
            "encode",
            "send+decode",
            "start->snapshot",
            "restart->Register",
            "extra Register",
            "idle RSS",
            "send vs 1",
        ],
        rows,
    )
    over = run_to_exit(f"--count={MAX + 1}", "--plugin_dir=/nonexistent")
    accepted = run_to_exit(f"--count={MAX}", "--plugin_dir=/nonexistent")
    limit = {
        "largest_accepted": MAX,
        "largest_snapshot_bytes": tokens.snapshot_bytes(MAX),
        "kubelet_limit_bytes": tokens.KUBELET_MAX_MESSAGE_BYTES,
        "one_above_exit_code": over.returncode,
        "one_above_message": next(
            (line.strip() for line in over.stderr.splitlines() if "too large" in line), over.stderr.strip()[-300:]
        ),
        "max_passes_validation": "does not exist" in accepted.stderr,
    }
    table(
        "Largest count",
        ["count", "result"],
        [
            [
                f"{MAX:,}",
                f"accepted; snapshot {limit['largest_snapshot_bytes']:,} B "
                f"of the kubelet's {limit['kubelet_limit_bytes']:,}",
            ],
            [f"{MAX + 1:,}", f"exit {over.returncode}: {limit['one_above_message']}"],
        ],
    )
    return {"counts": {str(k): v for k, v in out.items()}, "limit": limit}


# Main ------------------------------------------------------------------------------------------


def machine() -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="+", choices=["all", "allocate", "startup", "recovery", "idle", "scale"])
    workspace = os.environ.get("BUILD_WORKSPACE_DIRECTORY")
    default_json = (
        os.path.join(workspace, "bench", "results.json")
        if workspace
        else os.path.join(tempfile.gettempdir(), "token-resource-bench.json")
    )
    parser.add_argument("--json", default=default_json, help=f"where to write the figures (default {default_json})")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--trials", type=int, default=100, help="kubelet restarts for recovery (default 100)")
    args = parser.parse_args()
    chosen = ["allocate", "startup", "recovery", "idle", "scale"] if "all" in args.what else args.what

    results = {}
    if os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            results = json.load(f)
    results["machine"] = machine()
    print(f"token-resource benchmarks on {results['machine']}")
    runners = {
        "allocate": lambda: bench_allocate(args.repeats),
        "startup": lambda: bench_startup(max(args.repeats, 10)),
        "recovery": lambda: bench_recovery(args.trials),
        "idle": lambda: bench_idle(max(3, args.repeats // 2 + 1)),
        "scale": lambda: bench_scale(args.repeats),
    }
    for name in chosen:
        started = time.monotonic()
        results[name] = runners[name]()
        results[name]["elapsed_s"] = time.monotonic() - started
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
