"""Memory and start-up of the daemon as the shipped DaemonSet runs it, beside the bare grpcio server.

    tools/bazel run //bench:footprint                   # ~3 minutes; needs root, podman (runc) and unshare
    tools/bazel run //bench:footprint -- --repeats=9 --json=/tmp/f.json

Everything runs the linux/amd64 image built by Bazel (//:image_index): its Debian python3.11,
its wheels, its .pyc files and its environment, with the DaemonSet's arguments
(`--config` holding the ConfigMap's resources, `--http_port`).

- memory: in podman (runc; read-only root, no capabilities, no network, like
  tests/image/test_runtime.py), the daemon with 1 resource (the ConfigMap) and with 3, and the
  bare grpcio server (bench/noop_server.py run by the image's interpreter on the image's wheels,
  the default way: without the image's MALLOC_ARENA_MAX and PYTHONOPTIMIZE), interleaved. Read
  once registered, /healthz, /readyz and /metrics scraped once, RSS settled:
  /proc/<pid>/smaps_rollup (total, anonymous, file-backed), the mappings by kind, threads, and
  the container's memory cgroup (usage, and its anonymous part).
- start-up: the image's layers unpacked into a directory and its entrypoint run there (chroot,
  with /dev and /proc, as a container has them, without the container engine's own start-up):
  start -> the first ListAndWatch snapshot at the fake kubelet, beside `python3.11 -c "import
  grpc"` run the same way but the default way (without PYTHONOPTIMIZE; with it, for reference),
  interleaved; the Bazel py_binary launcher (//token_resource) with the same arguments, and
  plain flags (--count=2), for reference.
- imports: what each module the DaemonSet's flags load adds to RSS and to start-up, in the
  order the daemon loads them (python -X importtime's view, with memory), in the same directory.

Figures are medians over --repeats runs with [min..max]; the JSON goes under "footprint" in
bench/results.json (a run updates only that section).
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import harness  # bench/harness.py: starting servers, statistics, tables
from harness import fmt, loadavg_text, summary, table

from tests.daemon import binary_path, short_tempdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PODMAN = ["podman", "--runtime", "runc"]
RUN_FLAGS = ["--ulimit", "nofile=1024:20000", "--ulimit", "nproc=4096:4096", "--network", "none"]
# The ConfigMap of k8s/base/token-resource.yaml, and the same with the commented-out second
# resource and a third.
CONFIGS = {
    1: "resources:\n  - name: example.com/token\n    count: 2\n",
    3: "resources:\n  - name: example.com/token\n    count: 2\n  - name: example.com/licence\n    count: 4\n"
    "  - name: example.com/seat\n    count: 8\n",
}
DAEMONSET_ARGS = ["--config=/etc/token-resource/config.yaml", "--http_port=8080"]
# What the DaemonSet's flags load, each row what it adds to what the rows above loaded.
IMPORT_STEPS = [
    ("grpc", "grpc"),
    ("absl (flags, logging)", "absl.flags absl.logging"),
    ("generated DevicePlugin API (protobuf)", "deviceplugin.v1beta1.api_pb2_grpc"),
    ("inotify_simple (ctypes)", "inotify_simple"),
    ("yaml (--config)", "yaml"),
    ("http.server (--http_port)", "http.server"),
    (
        "token_resource's modules, Handoff API (and its own /metrics writer)",
        "token_resource.supervisor token_resource.main",
    ),
    ("token_resource.status (--http_port)", "token_resource.status"),
    ("kubeapi, drain (in a pod with a ServiceAccount token)", "token_resource.kubeapi token_resource.drain"),
]
# A pod's ServiceAccount token and API server address, so the drain on stop is on as in the
# DaemonSet; the address refuses at once (the daemons run without network or on the host's).
POD_ENV = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "1", "NODE_NAME": "node-a"}
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The daemon's module run directly: token_resource/__main__.py (the image's entry point) turns the
# garbage collector off for the start, token_resource.main alone does not.
COLLECTOR_ON = ["/usr/bin/python3.11", "-m", "token_resource.main"]
IMPORT_PROBE = """
import importlib, json, sys, time
def rss():
    with open("/proc/self/status") as f:
        st = dict(line.split(":", 1) for line in f)
    return int(st["RssAnon"].split()[0]), int(st["RssFile"].split()[0])
out, last, t0 = [], rss(), time.perf_counter()
out.append(("python", last[0], last[1], 0.0))
for name, modules in json.loads(sys.argv[1]):
    t = time.perf_counter()
    for m in modules.split():
        importlib.import_module(m)
    now = rss()
    out.append((name, now[0] - last[0], now[1] - last[1], time.perf_counter() - t))
    last = now
print(json.dumps(out))
"""


# The image -----------------------------------------------------------------------------------


class Image:
    """The linux/amd64 image of //:image_index: unpacked for chroot, and loaded into podman."""

    def __init__(self, layout: str, loaded: str | None = None) -> None:
        self.layout = layout
        index = self._json(os.path.join(layout, "index.json"))
        top = self._json(self._blob(index["manifests"][0]["digest"]))
        manifests = top.get("manifests", [])
        if manifests:  # an index: pick linux/amd64
            chosen = next(m for m in manifests if m.get("platform", {}).get("architecture") == "amd64")
            self.manifest = self._json(self._blob(chosen["digest"]))
        else:
            self.manifest = top
        config = self._json(self._blob(self.manifest["config"]["digest"]))["config"]
        self.entrypoint: list[str] = config["Entrypoint"]
        self.env: dict[str, str] = dict(e.split("=", 1) for e in config["Env"])
        self.root = tempfile.mkdtemp(prefix="tr-rootfs-", dir="/tmp")
        for layer in self.manifest["layers"]:
            subprocess.run(["tar", "-xf", self._blob(layer["digest"]), "-C", self.root], check=True)
        for directory in ("dev", "proc", "etc/token-resource", "dp", SERVICE_ACCOUNT_DIR.lstrip("/")):
            os.makedirs(os.path.join(self.root, directory), exist_ok=True)
        self.service_account = os.path.join(self.root, SERVICE_ACCOUNT_DIR.lstrip("/"))
        if not os.path.realpath(self.service_account).startswith(self.root + "/"):
            raise SystemExit(f"footprint: {SERVICE_ACCOUNT_DIR} leads out of the unpacked image")
        for name in ("token", "ca.crt"):
            with open(os.path.join(self.service_account, name), "w", encoding="ascii") as f:
                f.write("not a real one\n")
        self._loaded_here = loaded is None
        self.tag = loaded or f"localhost/token-resource:footprint-{os.getpid()}"
        if self._loaded_here:
            from bazel.oci import load

            load.main(["--image", layout, "--tag", self.tag, "--engine", "podman", "--platform", "linux/amd64"])

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._loaded_here:
            subprocess.run([*PODMAN, "rmi", "--force", self.tag], capture_output=True, check=False)

    def _blob(self, digest: str) -> str:
        return os.path.join(self.layout, "blobs", *digest.split(":", 1))

    @staticmethod
    def _json(path: str) -> dict:
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def chroot(self, argv: list[str]) -> list[str]:
        """argv run in the unpacked image with /dev and /proc (in a mount namespace of its own)."""
        script = (
            f'mount --rbind /dev {self.root}/dev && mount -t proc proc {self.root}/proc && exec chroot {self.root} "$@"'
        )
        return ["unshare", "--mount", "/bin/sh", "-c", script, "sh", *argv]

    def chroot_env(self) -> dict[str, str]:
        return dict(self.env, PATH="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin") | POD_ENV


# Reading a process ---------------------------------------------------------------------------


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup in bytes (Rss, Anonymous, ...), plus RssFile and Threads from status."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        status = dict(line.split(":", 1) for line in f)
    out["RssFile"] = int(status["RssFile"].split()[0]) * 1024
    out["Threads"] = int(status["Threads"])
    return out


def mappings(pid: int) -> dict[str, int]:
    """Resident bytes by kind of mapping: the main heap, malloc's per-thread arenas, thread
    stacks, other anonymous memory (pymalloc's arenas, large objects, gRPC's allocations), and
    the file-backed ones by file."""
    maps: list[dict] = []
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
            if head:
                start, end = int(head.group(1), 16), int(head.group(2), 16)
                maps.append({"start": start, "end": end, "perm": head.group(3), "name": head.group(4), "rss": 0})
            elif line.startswith("Rss:"):
                maps[-1]["rss"] = int(line.split()[1]) * 1024
    kinds: dict[str, int] = {}
    for i, m in enumerate(maps):
        name = m["name"]
        after = maps[i + 1] if i + 1 < len(maps) else None
        before = maps[i - 1] if i else None
        if name == "[heap]":
            kind = "anonymous: main heap (brk)"
        elif name in ("[stack]", "[vvar]", "[vdso]", "[vsyscall]"):
            kind = "anonymous: main stack, vdso"
        elif name:
            base = name.rsplit("/", 1)[-1]
            kind = "file: " + (re.sub(r"\.cpython-311.*|\.so[.0-9]*$|\.abi3\.so$", "", base) if ".so" in base else base)
        elif m["perm"] == "---p":
            continue
        elif (
            m["start"] % (64 << 20) == 0
            and after is not None
            and after["perm"] == "---p"
            and after["start"] == m["end"]
        ):
            kind = "anonymous: malloc arenas of threads"
        elif (
            before is not None
            and before["perm"] == "---p"
            and before["end"] == m["start"]
            and before["end"] - before["start"] == 4096
        ):
            kind = "anonymous: thread stacks"
        else:
            kind = "anonymous: other (pymalloc arenas, large objects, gRPC core)"
        kinds[kind] = kinds.get(kind, 0) + m["rss"]
    return kinds


def cgroup_memory(pid: int) -> dict[str, int]:
    """The memory cgroup of `pid`: usage, and its anonymous part (v1 or v2)."""
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as f:
        lines = [line.strip().split(":", 2) for line in f]
    v1 = next((path for _, controllers, path in lines if "memory" in controllers.split(",")), None)
    if v1 is not None:
        base = f"/sys/fs/cgroup/memory{v1}"
        usage = "memory.usage_in_bytes"
        anon_key = "total_rss"
    else:
        base = "/sys/fs/cgroup" + next(path for hierarchy, _, path in lines if hierarchy == "0")
        usage = "memory.current"
        anon_key = "anon"
    with open(os.path.join(base, usage), encoding="ascii") as f:
        out = {"usage": int(f.read())}
    with open(os.path.join(base, "memory.stat"), encoding="ascii") as f:
        stat = dict(line.split() for line in f)
    out["anon"] = int(stat[anon_key])
    out["file"] = int(stat.get("total_cache", stat.get("file", 0)))
    return out


def resources(count: int) -> list[str]:
    return re.findall(r"name: (\S+)", CONFIGS[count])


# Memory, in podman ---------------------------------------------------------------------------


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=120, check=check)


@contextlib.contextmanager
def container(name: str, args: list[str]) -> Iterator[int]:
    """A detached container `name` (podman run `args`, read-only, no capabilities) and its pid;
    removed afterwards."""
    podman("run", "--detach", "--name", name, *RUN_FLAGS, "--read-only", "--cap-drop=ALL", *args)
    try:
        yield int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
    finally:
        podman("rm", "--force", "--time", "20", name, check=False)


SCRAPE = """
import urllib.error, urllib.request
for path in ("/healthz", "/readyz", "/metrics"):
    try:
        urllib.request.urlopen("http://127.0.0.1:8080" + path, timeout=10).read()
    except urllib.error.HTTPError:
        pass
"""


def measure(pid: int) -> dict:
    harness.settle(pid, timeout=6.0, read=lambda p: rollup(p)["Rss"])
    figures: dict = rollup(pid)
    figures["mappings"] = mappings(pid)
    figures["cgroup"] = cgroup_memory(pid)
    return figures


def daemon_memory(image: Image, count: int) -> dict:
    config_dir = short_tempdir("tr-fpc-")
    with open(os.path.join(config_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(CONFIGS[count])
    name = f"tr-footprint-{os.getpid()}-{time.monotonic_ns()}"

    def start(plugin_dir: str) -> contextlib.AbstractContextManager[int]:
        volumes = [
            "--volume",
            f"{plugin_dir}:/var/lib/kubelet/device-plugins",
            "--volume",
            f"{config_dir}:/etc/token-resource:ro",
            "--volume",
            f"{image.service_account}:{SERVICE_ACCOUNT_DIR}:ro",
            *(f"--env={k}={v}" for k, v in POD_ENV.items()),
        ]
        return container(name, [*volumes, image.tag, *DAEMONSET_ARGS])

    try:
        with harness.serving(start, resources(count)) as server:
            # The probes and one Prometheus scrape, from inside the container (it has no network).
            podman("exec", name, "/usr/bin/python3.11", "-c", SCRAPE)
            return measure(server.pid)
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)


def noop_memory(image: Image) -> dict:
    script = os.path.join(ROOT, "bench", "noop_server.py")
    name = f"tr-footprint-{os.getpid()}-{time.monotonic_ns()}"

    def start(directory: str) -> contextlib.AbstractContextManager[int]:
        args = [
            "--unsetenv",
            "MALLOC_ARENA_MAX",
            "--unsetenv",
            "PYTHONOPTIMIZE",
            "--entrypoint",
            "/usr/bin/python3.11",
            "--volume",
            f"{script}:/bench/noop_server.py:ro",
            "--volume",
            f"{directory}:/run/noop",
            image.tag,
            "/bench/noop_server.py",
            f"--socket=/run/noop/{harness.NOOP_SOCKET}",
        ]
        return container(name, args)

    with harness.serving(start, baseline=True) as server:  # one call answered, its channel open
        return measure(server.pid)


def bench_memory(image: Image, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"daemon1": [], "daemon3": [], "noop": []}
    for r in range(repeats):
        order = ["daemon1", "noop", "daemon3"]
        for what in order if r % 2 == 0 else order[::-1]:
            runs[what].append(noop_memory(image) if what == "noop" else daemon_memory(image, int(what[-1])))
    keys = [
        ("RSS total", lambda f: f["Rss"]),
        ("  anonymous", lambda f: f["Anonymous"]),
        ("  file-backed", lambda f: f["RssFile"]),
        ("cgroup usage", lambda f: f["cgroup"]["usage"]),
        ("  cgroup anonymous", lambda f: f["cgroup"]["anon"]),
        ("threads", lambda f: f["Threads"]),
    ]
    out: dict = {"runs": runs}
    rows = []
    for label, get in keys:
        s = {what: summary([get(f) for f in figures]) for what, figures in runs.items()}
        scale, digits = (1.0, 0) if label == "threads" else (2**-20, 1)
        out[label.strip()] = s
        rows.append(
            [
                label,
                fmt(s["daemon1"], "", scale, digits),
                fmt(s["noop"], "", scale, digits),
                f"{s['daemon1']['median'] / s['noop']['median']:.2f}",
                fmt(s["daemon3"], "", scale, digits),
                f"{s['daemon3']['median'] / s['noop']['median']:.2f}",
            ]
        )
    table(
        f"Idle memory in podman, MiB (median [min..max] of {repeats}; loadavg {loadavg_text()})",
        ["figure", "daemon, 1 resource", "bare grpcio server", "ratio", "daemon, 3 resources", "ratio"],
        rows,
    )
    kinds = sorted({k for f in runs["daemon1"] + runs["noop"] for k in f["mappings"]})
    by_kind = []
    for kind in kinds:
        d = statistics.median(f["mappings"].get(kind, 0) for f in runs["daemon1"]) / 2**20
        n = statistics.median(f["mappings"].get(kind, 0) for f in runs["noop"]) / 2**20
        if abs(d - n) >= 0.05:
            by_kind.append([kind, f"{d:.2f}", f"{n:.2f}", f"{d - n:+.2f}"])
    by_kind.sort(key=lambda row: -abs(float(row[3])))
    total_d = statistics.median(f["Rss"] for f in runs["daemon1"]) / 2**20
    total_n = statistics.median(f["Rss"] for f in runs["noop"]) / 2**20
    by_kind.append(["RSS (all mappings)", f"{total_d:.2f}", f"{total_n:.2f}", f"{total_d - total_n:+.2f}"])
    out["mappings"] = by_kind
    table(
        "Resident memory by mapping, MiB (medians)",
        ["mapping", "daemon, 1 resource", "bare server", "difference"],
        by_kind,
    )
    return out


# Start-up, in the unpacked image --------------------------------------------------------------


def chroot_daemon_start(image: Image, args: list[str], names: list[str], entrypoint: list[str] | None = None) -> float:
    plugin_dir = os.path.join(image.root, "dp")
    command = image.chroot([*(entrypoint or image.entrypoint), "--plugin_dir=/dp", *args])
    try:
        with harness.serving(
            lambda _: harness.spawn(command, env=image.chroot_env()), names, directory=plugin_dir
        ) as ran:
            return ran.startup_s
    finally:
        for name in os.listdir(plugin_dir):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(plugin_dir, name))


def chroot_python(image: Image, code: str, optimize: bool = False) -> float:
    """`python3.11 -c code` in the unpacked image, in its environment but (unless `optimize`)
    without its PYTHONOPTIMIZE: a baseline run the default way."""
    env = image.chroot_env()
    if not optimize:
        env.pop("PYTHONOPTIMIZE", None)
    started = time.perf_counter()
    subprocess.run(image.chroot(["/usr/bin/python3.11", "-c", code]), env=env, check=True)
    return time.perf_counter() - started


def launcher_start(binary: str, args: list[str], names: list[str]) -> float:
    # Run as a script by the launcher, main.py's directory comes first on sys.path, where
    # token_resource/handoff.py shadows the generated `handoff` package and the daemon cannot
    # start; PYTHONSAFEPATH (3.11) keeps that directory off sys.path and costs nothing.
    env = dict(os.environ, PYTHONSAFEPATH="1")
    with harness.serving(lambda d: harness.spawn([binary, f"--plugin_dir={d}", *args], env=env), names) as server:
        return server.startup_s


def bench_startup(image: Image, repeats: int, launcher: str) -> dict:
    with open(os.path.join(image.root, "etc/token-resource/config.yaml"), "w", encoding="utf-8") as f:
        f.write(CONFIGS[1])
    host_config = os.path.join(image.root, "etc/token-resource/config.yaml")
    deployed = ["--config=/etc/token-resource/config.yaml", "--http_port=0"]
    names = resources(1)
    trials: dict[str, Callable[[], float]] = {
        "image": lambda: chroot_daemon_start(image, deployed, names),
        "collector_on": lambda: chroot_daemon_start(image, deployed, names, COLLECTOR_ON),
        "import_grpc": lambda: chroot_python(image, "import grpc"),
        "import_grpc_oo": lambda: chroot_python(image, "import grpc", optimize=True),
        "plain": lambda: chroot_daemon_start(image, ["--count=2", "--resource=example.com/token"], names),
        "launcher": lambda: launcher_start(launcher, [f"--config={host_config}", "--http_port=0"], names),
        "python": lambda: chroot_python(image, "pass"),
    }
    if not os.path.exists(launcher):  # run outside Bazel without --launcher
        del trials["launcher"]
    runs: dict[str, list[float]] = {k: [] for k in trials}
    for _ in range(repeats):
        for name, trial in trials.items():
            runs[name].append(trial())
    s = {k: summary(v) for k, v in runs.items()}
    base = s["import_grpc"]["median"]
    labels = {
        "image": "daemon as the image runs it (--config, --http_port): start -> first snapshot",
        "collector_on": "the same through token_resource.main, with the garbage collector on at start",
        "import_grpc": 'baseline: python3.11 -c "import grpc", the same way (without PYTHONOPTIMIZE)',
        "import_grpc_oo": "reference: the same with the image's PYTHONOPTIMIZE=2",
        "plain": "the same, plain flags (--count=2, no --config or --http_port)",
        "launcher": "the same as the first, through the Bazel py_binary launcher",
        "python": 'reference: python3.11 -c "pass", the same way',
    }
    rows = [[labels[k], fmt(v, "", 1e3, 0), f"{v['median'] / base:.2f}"] for k, v in s.items()]
    table(
        f"Start-up, ms (median [min..max] of {repeats}; loadavg {loadavg_text()})",
        ["what", "time", "/ import grpc"],
        rows,
    )
    return {k: {**v, "ratio_to_import_grpc": v["median"] / base} for k, v in s.items()}


def bench_imports(image: Image, repeats: int) -> dict:
    runs: list[list] = []
    for _ in range(repeats):
        result = subprocess.run(
            image.chroot(["/usr/bin/python3.11", "-c", IMPORT_PROBE, json.dumps([[n, m] for n, m in IMPORT_STEPS])]),
            env=image.chroot_env(),
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(result.stdout))
    rows, out = [], []
    for i, (name, *_) in enumerate(runs[0]):
        anon = statistics.median(r[i][1] for r in runs) / 1024
        file = statistics.median(r[i][2] for r in runs) / 1024
        ms = statistics.median(r[i][3] for r in runs) * 1e3
        out.append({"what": name, "anon_mib": anon, "file_mib": file, "ms": ms})
        rows.append([name, f"{anon:+.2f}", f"{file:+.2f}", f"{ms:.1f}"])
    table(
        f"What each import adds, as the DaemonSet's flags load them (median of {repeats}; loadavg {loadavg_text()})",
        ["import", "anonymous MiB", "file-backed MiB", "ms"],
        rows,
    )
    return {"steps": out}


# Main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", help="memory, startup, imports (default: all three)")
    default_json = harness.default_json("results.json", "token-resource-footprint.json")
    parser.add_argument("--json", default=default_json, help=f"where to write the figures (default {default_json})")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (default 5; 10 for start-up)")
    parser.add_argument("--image", default=os.path.join(ROOT, "image_index"), help="the OCI layout to run")
    parser.add_argument("--launcher", default=binary_path(), help="the py_binary //token_resource to time")
    parser.add_argument("--loaded", help="the same image already in podman under this tag (not loaded again)")
    args = parser.parse_args()
    args.what = args.what or ["memory", "startup", "imports"]
    if set(args.what) - {"memory", "startup", "imports"}:
        parser.error(f"unknown: {' '.join(sorted(set(args.what) - {'memory', 'startup', 'imports'}))}")
    if os.geteuid() != 0:
        raise SystemExit("footprint: needs root (podman with runc, and unshare/chroot for the unpacked image)")
    image = Image(args.image, args.loaded)
    results: dict = {"loadavg_start": loadavg_text(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        if "memory" in args.what:
            results["memory"] = bench_memory(image, args.repeats)
        if "startup" in args.what:
            results["startup"] = bench_startup(image, max(10, args.repeats), args.launcher)
        if "imports" in args.what:
            results["imports"] = bench_imports(image, args.repeats)
    finally:
        image.close()
    results["loadavg_end"] = loadavg_text()
    previous: dict = {}
    if os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            previous = json.load(f)
    previous["footprint"] = previous.get("footprint", {}) | results
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(previous, f, indent=1, sort_keys=True)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
