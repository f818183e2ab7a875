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
import statistics
import subprocess
import sys
import time

# Keep gRPC's C-core INFO lines ("Got goaway ...") out of the tables; inherited by the servers spawned.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import harness  # bench/harness.py: starting servers, statistics, tables
from harness import RESOURCE, fmt, ratio, summary, table

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests import procfs
from tests.daemon import binary_path, run_to_exit
from tests.fake_kubelet import FakeKubelet
from token_resource import tokens

SOCKET = "token-resource.sock"
MAX = tokens.max_count()
SIZES = (1, 100, 1000)
COUNTS = (1, 1_000, 10_000, 100_000, MAX)


def daemon(count: int) -> harness.Starter:
    """The daemon with `count` tokens of RESOURCE, serving SOCKET."""
    return harness.daemon(f"--socket={SOCKET}", f"--count={count}")


def _reconnected(kubelet: FakeKubelet, seen: int) -> bool:
    """Registered again (options known) and a snapshot beyond the first `seen` received."""
    resource = kubelet.resources[RESOURCE]
    return resource.options is not None and resource.connected and len(resource.snapshots) > seen


# Unary latency ------------------------------------------------------------------------------


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
    with harness.serving(daemon(max(SIZES)), timeout=30) as server:
        plugin = api_pb2_grpc.DevicePluginStub(server.connect())
        # The baseline returns the daemon's own answers, byte for byte, without computing them.
        canned: dict[str, dict[int, str]] = {"Allocate": {}, "GetPreferredAllocation": {}}
        for n in SIZES:
            canned["Allocate"][n] = plugin.Allocate(_allocate_request(n)).SerializeToString().hex()
            canned["GetPreferredAllocation"][n] = (
                plugin.GetPreferredAllocation(_preferred_request(n)).SerializeToString().hex()
            )
        responses = os.path.join(server.directory, "canned.json")
        with open(responses, "w", encoding="utf-8") as f:
            json.dump(canned, f)
        with harness.serving(harness.noop_server(f"--responses={responses}"), baseline=True) as noop:
            base = api_pb2_grpc.DevicePluginStub(noop.channels[0])
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
                        harness.latencies(call, request, min(200, calls // 4))  # warm-up
                        lat = harness.latencies(call, request, calls)
                        runs[name]["p50"].append(harness.percentile(lat, 50))
                        runs[name]["p99"].append(harness.percentile(lat, 99))
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
    return results


# Start-up ------------------------------------------------------------------------------------


def _time_process(args: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def startup_to_snapshot(count: int) -> float:
    """Process start -> the fake kubelet holds the first ListAndWatch snapshot."""
    with harness.serving(daemon(count)) as server:
        return server.startup_s


def bench_startup(repeats: int) -> dict:
    env = harness.python_env()
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
    register, snapshot = [], []
    with harness.serving(daemon(count)) as server:
        kubelet = server.kubelet
        assert kubelet is not None  # not a baseline
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
            with open(os.path.join(server.directory, "daemon.log"), encoding="utf-8", errors="replace") as f:
                print(f.read()[-20000:])
    # Baseline: the floor for any plugin, a process that is already connected-ready and needs
    # only to dial the new kubelet.sock and make one call (answered at once).
    floor = []
    with harness.kubelet() as kubelet:
        for _ in range(trials):
            kubelet.restart()
            t = kubelet.started_at
            ch = grpc.insecure_channel(f"unix://{kubelet.socket_path}")
            with contextlib.suppress(grpc.RpcError):  # the version is refused: that answer ends the round trip
                api_pb2_grpc.RegistrationStub(ch).Register(api_pb2.RegisterRequest(version="baseline"), timeout=10)
            floor.append(time.monotonic() - t)
            ch.close()

    def dist(values: list[float]) -> dict[str, float]:
        return {
            "min": min(values),
            "median": statistics.median(values),
            "p99": harness.percentile(values, 99),
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


def idle_footprint(server: harness.Server) -> dict[str, int]:
    harness.settle(server.pid)
    return {"rss": procfs.rss_bytes(server.pid), "threads": procfs.threads(server.pid), "fds": procfs.fds(server.pid)}


def bench_idle(repeats: int) -> dict:
    runs: dict[str, list[dict[str, int]]] = {"plugin": [], "baseline": []}
    for _ in range(repeats):
        with harness.serving(daemon(1)) as server:
            runs["plugin"].append(idle_footprint(server))
        with harness.serving(harness.noop_server(), baseline=True) as noop:  # one call answered, its channel open
            runs["baseline"].append(idle_footprint(noop))
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
    ch = harness.connect(path, receive_limit=None)
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
        with harness.serving(daemon(count)) as server:
            send = _first_snapshot_over_socket(server.socket(), repeats)
            rss = idle_footprint(server)["rss"]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="+", choices=["all", "allocate", "startup", "recovery", "idle", "scale"])
    default_json = harness.default_json("results.json", "token-resource-bench.json")
    parser.add_argument("--json", default=default_json, help=f"where to write the figures (default {default_json})")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--trials", type=int, default=100, help="kubelet restarts for recovery (default 100)")
    args = parser.parse_args()
    chosen = ["allocate", "startup", "recovery", "idle", "scale"] if "all" in args.what else args.what

    results = {}
    if os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            results = json.load(f)
    results["machine"] = harness.machine()
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
