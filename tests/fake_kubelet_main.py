"""Runs the fake kubelet by hand, to try the daemon without a cluster.

    tools/bazel run //tests:fake_kubelet -- --dir=/tmp/dp
    tools/bazel run //token_resource -- --plugin_dir=/tmp/dp --count=3     # another terminal

With the plugin watcher (a 1.20 kubelet that also watches a plugins_registry directory):

    tools/bazel run //tests:fake_kubelet -- --dir=/tmp/dp --mode=watcher --registry_dir=/tmp/pr
    tools/bazel run //token_resource -- --plugin_dir=/tmp/dp --registration=plugin_watcher \
        --plugins_registry_dir=/tmp/pr --socket=token.sock

Type `r` and Enter to restart the kubelet (it deletes the plugin's socket, as a real one
does), `a` to admit a pod asking for one token, `q` to quit. Each state change is printed.
"""

import os
import sys
import threading

from absl import app, flags

from tests.fake_kubelet import AdmissionError, FakeKubelet, Mode

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

FLAGS = flags.FLAGS
flags.DEFINE_string("dir", "/tmp/token-resource-demo", "Device-plugin directory to serve kubelet.sock in.")
flags.DEFINE_enum(
    "mode",
    "E2",
    ["E1", "E2", "E3", "watcher"],
    "E1: kubelet 1.20-1.24 behaviour; E2: 1.25-1.36; E3: 1.37+ (per-socket instances); "
    "watcher: E1 plus the 1.20 plugin watcher on --registry_dir.",
)
flags.DEFINE_string(
    "registry_dir",
    "/tmp/token-resource-demo-registry",
    "The plugin watcher's directory (plugins_registry), with --mode=watcher; never wiped at a restart.",
)


def describe(kubelet: FakeKubelet) -> str:
    return kubelet.describe().replace("; violations []", "")


def report_changes(kubelet: FakeKubelet, stop: threading.Event) -> None:
    last = describe(kubelet)
    print(f"[kubelet] {last}", flush=True)
    while not stop.is_set():

        def changed(k: FakeKubelet, seen: str = last) -> bool:
            return describe(k) != seen or stop.is_set()

        try:
            kubelet.wait_until(changed, timeout=3600)
        except TimeoutError:
            continue
        if not stop.is_set():
            last = describe(kubelet)
            print(f"[kubelet] {last}", flush=True)


def main(argv: list[str]) -> None:
    if FLAGS.mode == "watcher":
        kubelet = FakeKubelet(FLAGS.dir, Mode.E1, registry_dir=FLAGS.registry_dir)
        where = f"{kubelet.socket_path}, watching {FLAGS.registry_dir}"
    else:
        kubelet = FakeKubelet(FLAGS.dir, Mode[FLAGS.mode])
        where = kubelet.socket_path
    kubelet.start()
    print(f"fake kubelet ({FLAGS.mode}) listening on {where}; r = restart, a = admit a pod, q = quit")
    stop = threading.Event()
    reporter = threading.Thread(target=report_changes, args=(kubelet, stop), daemon=True)
    reporter.start()
    pods = 0
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "q":
                break
            if command == "r":
                kubelet.restart()
                print("[kubelet] restarted: sockets deleted, kubelet.sock re-created", flush=True)
            elif command == "a":
                pods += 1
                for resource in list(kubelet.resources):
                    try:
                        allocation = kubelet.admit(f"pod-{pods}", "app", resource, 1)
                        print(f"[kubelet] pod-{pods} admitted: {dict(allocation.response.envs)}", flush=True)
                    except AdmissionError as error:
                        print(f"[kubelet] pod-{pods} rejected: {error}", flush=True)
    finally:
        stop.set()
        kubelet.stop()


if __name__ == "__main__":
    app.run(main)
