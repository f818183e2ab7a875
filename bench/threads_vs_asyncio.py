"""Threads or asyncio (issue 10): the daemon as it is (sync grpcio, worker pool) against the same
serving path on grpc.aio (bench/aio_plugin.py), beside the bare sync no-op server, in one run.

    tools/bazel run //bench:threads_vs_asyncio                    # compare + workers, ~2.5 min
    tools/bazel run //bench:threads_vs_asyncio -- compare --repeats=5
    tools/bazel run //bench:threads_vs_asyncio -- workers         # SERVER_THREADS at 4, 8, 16
    cd /work/main && PYTHONPATH=.:bazel-bin/proto /opt/trvenv/bin/python bench/threads_vs_asyncio.py

All three servers are started the same way (`python <script>`, no py_binary launcher), each
plugin registered with its own fake kubelet (1.25+ mode, which holds one ListAndWatch stream).
Every repeat starts fresh processes in alternating order and measures each case for each design
back to back (alternating order too), so machine noise falls on all designs alike; each figure is
the median of the per-repeat figures with their [min..max]. The 1-minute load average is sampled
at every repeat: the machine is shared. Writes JSON (default: bench/threads_vs_asyncio.json in
the workspace under `bazel run`). See "Threads or asyncio" in BENCHMARKS.md.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator

# Keep gRPC's C-core INFO lines ("Got goaway ...") out of the tables; inherited by the servers spawned.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import harness  # bench/harness.py: starting servers, statistics, tables
from harness import percentile, summary

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests import procfs
from token_resource import device_plugin, plugin_server, tokens
from tokenresource.handoff.v1 import api_pb2 as handoff_pb2
from tokenresource.handoff.v1 import api_pb2_grpc as handoff_pb2_grpc

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {
    "threads": os.path.join(HERE, "threads_plugin.py"),
    "asyncio": os.path.join(HERE, "aio_plugin.py"),
    "no-op": os.path.join(HERE, "noop_server.py"),
}
PLUGINS = ("threads", "asyncio")
COUNT = 1000
RESOURCES = ("example.com/token", "example.com/token-b", "example.com/token-c")
CALLS = 2000  # per case and repeat, after a warm-up of 200
EXTRA_STREAMS = device_plugin.MAX_STREAMS - 1  # with the kubelet's own: the daemon's cap
STARVED_TIMEOUT_S = 2.0


def _allocate_one() -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["item-0"])])


def _canned(directory: str) -> str:
    """The daemon's Allocate[1] answer, for the no-op server to return byte for byte."""
    answer = api_pb2.AllocateResponse(
        container_responses=[tokens.TokenPolicy(RESOURCES[0], COUNT).allocate(["item-0"])]
    ).SerializeToString()
    path = os.path.join(directory, "canned.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"Allocate": {"1": answer.hex()}}, f)
    return path


def _config(directory: str, resources: int) -> str:
    path = os.path.join(directory, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("resources:\n" + "".join(f"  - name: {r}\n    count: {COUNT}\n" for r in RESOURCES[:resources]))
    return path


def footprint(pid: int) -> dict[str, int]:
    s = procfs.status(pid)
    kib = lambda key: int(s[key].split()[0]) * 1024  # noqa: E731
    return {
        "rss": kib("VmRSS"),
        "anon": kib("RssAnon"),
        "file": kib("RssFile"),
        "threads": int(s["Threads"]),
        "fds": procfs.fds(pid),
    }


class Server:
    """One server process of a design, with a channel to its (first resource's) socket;
    `startup_s` from spawn to the first snapshot at the fake kubelet for every resource
    (plugins) or to the first answered call (no-op)."""

    def __init__(self, served: harness.Server) -> None:
        self.pid = served.pid
        self.startup_s = served.startup_s
        self.socket = served.socket(RESOURCES[0])
        self.channel = served.channels[0] if served.kubelet is None else served.connect(RESOURCES[0])
        self.stub = api_pb2_grpc.DevicePluginStub(self.channel)

    def footprint(self) -> dict[str, int]:
        harness.settle(self.pid)
        return footprint(self.pid)


@contextlib.contextmanager
def started(design: str, resources: int = 1, server_threads: int | None = None) -> Iterator[Server]:
    """A server of `design` ("threads", "asyncio" or "no-op") run as `python <script>`, its log in
    its directory; stopped afterwards."""

    def start(directory: str) -> contextlib.AbstractContextManager[int]:
        args = [sys.executable, SCRIPTS[design]]
        if design == "no-op":
            args += [f"--socket={os.path.join(directory, harness.NOOP_SOCKET)}", f"--responses={_canned(directory)}"]
        else:
            args += [f"--plugin_dir={directory}", f"--config={_config(directory, resources)}", "--logtostderr"]
            if server_threads is not None:
                args.append(f"--server_threads={server_threads}")
        return harness.spawn(args, env=harness.python_env(), log=os.path.join(directory, "log"))

    with harness.serving(start, RESOURCES[:resources], baseline=design == "no-op", timeout=30) as served:
        yield Server(served)


@contextlib.contextmanager
def streams_open(server: Server, n: int, handoff: bool = False) -> Iterator[None]:
    """`n` more ListAndWatch streams (a second client), each past its first snapshot; or `n`
    Handoff.Watch streams (what an older instance opens on a newer one), each past its first state."""
    channel = harness.connect(server.socket)
    if handoff:
        watch = handoff_pb2_grpc.HandoffStub(channel).Watch
        calls = [watch(handoff_pb2.WatchRequest(resource=RESOURCES[0])) for _ in range(n)]
    else:
        calls = [api_pb2_grpc.DevicePluginStub(channel).ListAndWatch(api_pb2.Empty()) for _ in range(n)]
    for call in calls:
        next(call)
    try:
        yield
    finally:
        for call in calls:
            call.cancel()
        channel.close()


def sequential(server: Server, calls: int = CALLS) -> list[float]:
    request = _allocate_one()
    harness.latencies(server.stub.Allocate, request, 200)  # warm-up
    return harness.latencies(server.stub.Allocate, request, calls)


def concurrent(server: Server, callers: int, calls: int = CALLS, timeout: float = 30.0) -> dict:
    """`callers` threads calling Allocate[1] back to back on one channel (as the kubelet's one
    connection to a plugin), `calls` in all: latencies, throughput and calls that timed out."""
    request = _allocate_one()
    try:
        server.stub.Allocate(request, timeout=STARVED_TIMEOUT_S)
    except grpc.RpcError as error:
        if error.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        return {"latencies": [], "per_s": 0.0, "timeouts": calls, "starved": True}
    harness.latencies(server.stub.Allocate, request, 200)  # warm-up
    latencies: list[float] = []
    timeouts = [0]
    lock = threading.Lock()
    start = threading.Barrier(callers + 1)

    def caller(n: int) -> None:
        mine, late = [], 0
        start.wait()
        for _ in range(n):
            t = time.perf_counter()
            try:
                server.stub.Allocate(request, timeout=timeout)
            except grpc.RpcError:
                late += 1
                continue
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)
            timeouts[0] += late

    workers = [threading.Thread(target=caller, args=(calls // callers,)) for _ in range(callers)]
    for w in workers:
        w.start()
    start.wait()
    t = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t
    return {"latencies": latencies, "per_s": len(latencies) / elapsed, "timeouts": timeouts[0], "starved": False}


def _ordered(items: tuple[str, ...], r: int) -> tuple[str, ...]:
    return items if r % 2 == 0 else items[::-1]


# compare --------------------------------------------------------------------------------------

CASES = {
    "seq": "Allocate[1], 1 caller",
    "c4": "Allocate[1], 4 concurrent callers",
    "c16": "Allocate[1], 16 concurrent callers",
    "streams": f"Allocate[1], 1 caller, {device_plugin.MAX_STREAMS} ListAndWatch streams open",
}


def bench_compare(repeats: int, loads: list[float]) -> dict:
    designs = (*PLUGINS, "no-op")
    runs: dict[str, dict[str, list[float]]] = {d: {} for d in designs}

    def note(design: str, key: str, value: float) -> None:
        runs[design].setdefault(key, []).append(value)

    for r in range(repeats):
        loads.append(harness.loadavg())
        with contextlib.ExitStack() as stack:
            servers: dict[str, Server] = {}
            for d in _ordered(designs, r):
                servers[d] = stack.enter_context(started(d))
                note(d, "startup_s", servers[d].startup_s)
            for d in _ordered(designs, r):
                for key, value in servers[d].footprint().items():
                    note(d, f"idle1_{key}", value)
            for case in CASES:
                for d in _ordered(designs, r):
                    if case == "streams" and d == "no-op":
                        continue  # no ListAndWatch there
                    s = servers[d]
                    if case == "seq":
                        lat = sequential(s)
                    elif case == "streams":
                        with streams_open(s, EXTRA_STREAMS):
                            lat = sequential(s)
                    else:
                        result = concurrent(s, 4 if case == "c4" else 16)
                        lat = result["latencies"]
                        note(d, f"{case}_per_s", result["per_s"])
                    note(d, f"{case}_p50", percentile(lat, 50))
                    note(d, f"{case}_p99", percentile(lat, 99))
            for d in designs:
                for key, value in footprint(servers[d].pid).items():
                    note(d, f"loaded1_{key}", value)
        for d in _ordered(PLUGINS, r):
            with started(d, resources=3) as s:
                note(d, "startup3_s", s.startup_s)
                for key, value in s.footprint().items():
                    note(d, f"idle3_{key}", value)
        print(f"  repeat {r + 1}/{repeats} done (load {loads[-1]:.2f})", flush=True)

    out = {d: {k: summary(v) for k, v in runs[d].items()} for d in designs}
    rows = []

    def row(label: str, key: str, unit: str, scale: float, digits: int) -> None:
        cells = [label]
        for d in designs:
            cells.append(harness.fmt(out[d][key], unit, scale, digits) if key in out[d] else "-")
        t, a = out["threads"][key]["median"], out["asyncio"][key]["median"]
        cells.append(f"{a / t:.2f}" if t else "-")
        rows.append(cells)

    for case, label in CASES.items():
        row(f"{label}: p50", f"{case}_p50", "ms", 1e3, 3)
        row(f"{label}: p99", f"{case}_p99", "ms", 1e3, 3)
        if case in ("c4", "c16"):
            row(f"{label}: calls/s", f"{case}_per_s", "/s", 1, 0)
    row("start -> first ListAndWatch snapshot, 1 resource", "startup_s", "ms", 1e3, 0)
    row("start -> first snapshots, 3 resources", "startup3_s", "ms", 1e3, 0)
    for n in ("1", "3"):
        row(f"idle RSS, {n} resource(s)", f"idle{n}_rss", "MiB", 2**-20, 1)
        row(f"  anon / file, {n} resource(s)", f"idle{n}_anon", "MiB", 2**-20, 1)
        row("", f"idle{n}_file", "MiB", 2**-20, 1)
        row(f"idle threads, {n} resource(s)", f"idle{n}_threads", "", 1, 0)
        row(f"idle fds, {n} resource(s)", f"idle{n}_fds", "", 1, 0)
    row("after the load above: RSS, 1 resource", "loaded1_rss", "MiB", 2**-20, 1)
    row("after the load above: threads, 1 resource", "loaded1_threads", "", 1, 0)
    harness.table(
        f"Threads vs asyncio (median [min..max] of {repeats} repeats; {CALLS} calls per case and repeat)",
        ["figure", "threads (the daemon)", "asyncio (aio_plugin)", "no-op sync server", "asyncio / threads"],
        rows,
    )
    return out


# workers -------------------------------------------------------------------------------------

WORKERS = (4, 8, 16)


def bench_workers(repeats: int, loads: list[float]) -> dict:
    """The daemon at several SERVER_THREADS, with MAX_STREAMS streams open (the kubelet's and
    EXTRA_STREAMS more) and 16 concurrent Allocate callers; then threads and RSS. The asyncio
    design under the same load for reference; and the Handoff streams, which no cap bounds."""
    variants = (*(f"threads/{w}" for w in WORKERS), "asyncio")
    runs: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    probe: dict[str, str] = {}
    for r in range(repeats):
        loads.append(harness.loadavg())
        for v in _ordered(variants, r):
            design, _, workers = v.partition("/")
            with started(design, server_threads=int(workers) if workers else None) as s:
                with streams_open(s, EXTRA_STREAMS):
                    result = concurrent(s, 16, CALLS // 2, timeout=10.0)
                    after = footprint(s.pid)
                for key, value in after.items():
                    runs[v].setdefault(key, []).append(value)
                if result["starved"]:
                    runs[v].setdefault("starved", []).append(1)
                else:
                    for q in (50, 99):
                        runs[v].setdefault(f"p{q}", []).append(percentile(result["latencies"], q))
                    runs[v].setdefault("per_s", []).append(result["per_s"])
                if r == 0 and v in ("threads/16", "asyncio"):
                    # Handoff.Watch is not counted against MAX_STREAMS: enough of them take every worker.
                    n = plugin_server.SERVER_THREADS - 1
                    with streams_open(s, n, handoff=True):
                        try:
                            s.stub.Allocate(_allocate_one(), timeout=STARVED_TIMEOUT_S)
                            probe[v] = f"{n} Handoff.Watch streams + the kubelet's: Allocate answered"
                        except grpc.RpcError as error:
                            probe[v] = f"{n} Handoff.Watch streams + the kubelet's: Allocate {error.code().name}"
        print(f"  repeat {r + 1}/{repeats} done (load {loads[-1]:.2f})", flush=True)
    out: dict = {}
    rows = []
    for v in variants:
        o = {k: summary(vals) for k, vals in runs[v].items()}
        out[v] = o
        if "p50" in o:
            cells = [harness.fmt(o["p50"]), harness.fmt(o["p99"]), harness.fmt(o["per_s"], "/s", 1, 0)]
        else:
            cells = [f"starved: DEADLINE_EXCEEDED after {STARVED_TIMEOUT_S:.0f} s"] + ["-"] * 2
        rows.append(
            [
                v,
                *cells,
                harness.fmt(o["threads"], "", 1, 0),
                harness.fmt(o["rss"], "MiB", 2**-20, 1),
                harness.fmt(o["fds"], "", 1, 0),
            ]
        )
    out["handoff_probe"] = probe
    harness.table(
        f"SERVER_THREADS with {device_plugin.MAX_STREAMS} ListAndWatch streams + 16 concurrent Allocate[1] callers "
        f"(median [min..max] of {repeats} repeats, {CALLS // 2} calls each)",
        ["design/workers", "p50", "p99", "calls/s", "threads after", "RSS after", "fds after"],
        rows,
    )
    for v, text in probe.items():
        print(f"  {v}: {text}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", default="all", choices=["all", "compare", "workers"])
    default_json = harness.default_json("threads_vs_asyncio.json", "threads-vs-asyncio.json")
    parser.add_argument("--json", default=default_json, help=f"where to write the figures (default {default_json})")
    parser.add_argument("--repeats", type=int, default=5, help="repeats for compare (default 5; workers: 3)")
    args = parser.parse_args()
    chosen = ["compare", "workers"] if "all" in args.what else args.what
    results: dict = {"machine": harness.machine()}
    print(f"threads vs asyncio on {results['machine']}")
    runners: dict[str, Callable[[list[float]], dict]] = {
        "compare": lambda loads: bench_compare(args.repeats, loads),
        "workers": lambda loads: bench_workers(max(1, args.repeats * 3 // 5), loads),
    }
    started = time.monotonic()
    for name in chosen:
        loads: list[float] = []
        t = time.monotonic()
        results[name] = runners[name](loads)
        loads.append(harness.loadavg())
        results[name]["elapsed_s"] = time.monotonic() - t
        results[name]["loadavg_1m"] = summary(loads)
        load = harness.fmt(results[name]["loadavg_1m"], "", 1, 2)
        print(f"  {name}: {results[name]['elapsed_s']:.0f} s, 1-min load average {load}")
    results["elapsed_s"] = time.monotonic() - started
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(f"\nJSON: {args.json} ({results['elapsed_s']:.0f} s; median load {statistics.median(loads):.2f})")


if __name__ == "__main__":
    main()
