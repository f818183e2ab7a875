#!/usr/bin/env python3
"""The original plugin's acceptance scenario, on a real cluster.

Given KUBECONFIG (or --kubeconfig) and the token-resource image already available to the nodes,
it installs k8s/ (kubectl apply -k), and checks, step by step:

  1. the DaemonSet rolls out and every node advertises capacity = allocatable = 2 example.com/token;
  2. a busybox pod holding a token sees it in EXAMPLE_COM_TOKEN;
  3. the 10-replica test Deployment (k8s/token-resource-test.yaml) runs exactly 2 pods per node,
     the rest stay Pending with "Insufficient example.com/token";
  4. after a kubelet restart (--restart_kubelet) the node advertises 2 again, with the same plugin
     pod (never restarted) and still exactly 2 test pods per node;
  5. editing the count in the ConfigMap (2 -> 3) reaches every node without a restart, and one
     more test pod per node runs (skip with --skip_reconfigure: the kubelet refreshes ConfigMap
     volumes only about once a minute);
  6. deleting the namespace takes the tokens off the node (allocatable 0).

It prints a timeline and, on failure, the state, the events and the plugin's and (with
--kubelet_logs) the kubelet's logs. Only the Python standard library and kubectl are needed:

  KUBECONFIG=... tests/e2e/acceptance.py --restart_kubelet='docker exec {node} systemctl restart kubelet'

tests/e2e/realk8s.sh runs it on the local realk8s cluster (that is what .ci/run does).
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from kube import CheckFailedError, Kubectl, poll

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
NAMESPACE = "token-resource"
RESOURCE = "example.com/token"
ENV_VAR = "EXAMPLE_COM_TOKEN"
COUNT = 2
REPLICAS = 10
DAEMONSET = "token-resource"
DEPLOYMENT = "token-resource-test"
PLUGIN_SELECTOR = "app.kubernetes.io/name=token-resource"
TEST_SELECTOR = "app.kubernetes.io/name=token-resource-test"
DEFAULT_IMAGE = "token-resource:latest"
DEFAULT_WORKLOAD_IMAGE = "registry.k8s.io/pause:3.2"
# What the daemon logs when it notices the kubelet go (lifecycle.py).
LOSS_SIGNS = r"ListAndWatch stream ended|plugin socket removed|kubelet\.sock created|plugin watcher found"


def _absl_time(line: str) -> float | None:
    """Seconds since the start of the year of an absl log line (`I1126 23:45:13.123456 ...`)."""
    match = re.match(r"[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) ", line)
    if not match:
        return None
    month, day, hour, minute, second = match.groups()
    days = (int(month) - 1) * 31 + int(day)
    return ((days * 24 + int(hour)) * 60 + int(minute)) * 60 + float(second)


def _when(seconds: float | None) -> str:
    return f"{seconds:6.1f}s" if seconds is not None else " " * 7


class Acceptance:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.kubectl = Kubectl(args.kubectl, args.kubeconfig)
        self.timeline: list[tuple[str, float | None]] = []
        self.passed: list[str] = []
        self.nodes: list[str] = []
        self.plugin_pods: dict[str, str] = {}

    # -- helpers ----------------------------------------------------------------------------

    def mark(self, event: str, seconds: float | None) -> None:
        """A timeline entry: seconds since the start of the step (None: the event has its own)."""
        self.timeline.append((event, seconds))
        print(f"  {_when(seconds)}  {event}", flush=True)

    def node_tokens(self) -> dict[str, tuple[str, str]]:
        """{node: (capacity, allocatable)} of the resource, "0" where absent."""
        nodes = self.kubectl.json("get", "nodes")["items"]
        return {
            n["metadata"]["name"]: (
                n["status"].get("capacity", {}).get(RESOURCE, "0"),
                n["status"].get("allocatable", {}).get(RESOURCE, "0"),
            )
            for n in nodes
            if n["metadata"]["name"] in self.nodes
        }

    def heartbeats(self) -> dict[str, str]:
        nodes = self.kubectl.json("get", "nodes")["items"]
        return {
            n["metadata"]["name"]: next(
                (c["lastHeartbeatTime"] for c in n["status"]["conditions"] if c["type"] == "Ready"), "none"
            )
            for n in nodes
            if n["metadata"]["name"] in self.nodes
        }

    def pods(self, selector: str) -> list[dict]:
        return self.kubectl.json("get", "pods", "-n", NAMESPACE, "-l", selector)["items"]

    def apply_rendered(self, text: str, placeholder: str, image: str) -> None:
        if image != placeholder:
            if text.count(f"image: {placeholder}") != 1:
                raise CheckFailedError(f"expected exactly one 'image: {placeholder}' in the manifests")
            text = text.replace(f"image: {placeholder}", f"image: {image}")
        self.kubectl.run("apply", "-f", "-", stdin=text)

    def namespace_exists(self) -> bool:
        out = self.kubectl.run("get", "namespace", NAMESPACE, "--ignore-not-found", "-o", "name")
        return bool(out.strip())

    # -- steps ------------------------------------------------------------------------------

    def preflight(self) -> None:
        nodes = self.kubectl.json("get", "nodes")["items"]
        self.nodes = sorted(
            n["metadata"]["name"]
            for n in nodes
            if n["metadata"].get("labels", {}).get("kubernetes.io/os") == "linux"
            and not n["spec"].get("unschedulable", False)
        )
        if not self.nodes:
            raise CheckFailedError("no schedulable Linux node")
        print(f"nodes: {', '.join(self.nodes)}", flush=True)
        if self.namespace_exists():
            print(f"namespace {NAMESPACE} exists (an earlier run): deleting it first", flush=True)
            self.kubectl.run("delete", "namespace", NAMESPACE, "--wait=false")
            poll(f"namespace {NAMESPACE} to go", 300, lambda: (not self.namespace_exists(), "still there"), 2)
        # A plugin of an earlier run may have just stopped: its node reports that within seconds.
        poll(
            f"no node to advertise {RESOURCE} before the install (is another plugin serving it?)",
            self.args.timeout,
            lambda: (all(t[1] == "0" for t in self.node_tokens().values()), self.node_tokens()),
        )

    def step_install(self) -> None:
        start = time.monotonic()
        if self.args.image == DEFAULT_IMAGE:
            self.kubectl.run("apply", "-k", str(self.args.install or self.args.manifests))
        else:
            rendered = self.kubectl.run("kustomize", str(self.args.install or self.args.manifests))
            self.apply_rendered(rendered, DEFAULT_IMAGE, self.args.image)
        self.mark("kubectl apply -k k8s/ done", time.monotonic() - start)

        def rolled_out() -> tuple[bool, dict[str, Any]]:
            ds = self.kubectl.json("get", "daemonset", "-n", NAMESPACE, DAEMONSET)
            status = ds.get("status", {})
            want = status.get("desiredNumberScheduled", 0)
            done = (
                want == len(self.nodes)
                and status.get("observedGeneration") == ds["metadata"]["generation"]
                and status.get("updatedNumberScheduled") == want
                and status.get("numberReady") == want
            )
            return done, status

        poll("the DaemonSet to roll out (every pod Ready: registered, per /readyz)", self.args.timeout, rolled_out)
        self.mark(f"DaemonSet rolled out: {len(self.nodes)} pod(s) Ready", time.monotonic() - start)

        def advertised() -> tuple[bool, dict[str, tuple[str, str]]]:
            tokens = self.node_tokens()
            return all(t == (str(COUNT), str(COUNT)) for t in tokens.values()), tokens

        poll(f"capacity = allocatable = {COUNT} {RESOURCE} on every node", self.args.timeout, advertised)
        self.mark(f"allocatable {RESOURCE} = {COUNT} on every node", time.monotonic() - start)
        self.plugin_pods = {p["metadata"]["name"]: p["metadata"]["uid"] for p in self.pods(PLUGIN_SELECTOR)}

    def step_token_in_environment(self) -> None:
        start = time.monotonic()
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "token-env", "namespace": NAMESPACE},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "serviceAccountName": "token-resource",
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "env",
                        "image": self.args.busybox_image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["sh", "-c", f'echo "{ENV_VAR}=${ENV_VAR}"'],
                        "resources": {"limits": {RESOURCE: 1}},
                    }
                ],
            },
        }
        self.kubectl.run("apply", "-f", "-", stdin=json.dumps(pod))

        def finished() -> tuple[str | bool, dict[str, Any]]:
            status = self.kubectl.json("get", "pod", "-n", NAMESPACE, "token-env").get("status", {})
            return status.get("phase") in ("Succeeded", "Failed") and status["phase"], status

        phase = poll("the busybox pod holding a token to finish", self.args.timeout, finished)
        log = self.kubectl.run("logs", "-n", NAMESPACE, "token-env").strip()
        if phase != "Succeeded" or not re.fullmatch(rf"{ENV_VAR}=item-[0-{COUNT - 1}]", log):
            raise CheckFailedError(
                f"busybox pod ended {phase}, printed {log!r}; expected {ENV_VAR}=item-N with N < {COUNT}"
            )
        self.mark(f"busybox pod holding a token printed {log}", time.monotonic() - start)
        # A finished pod holds nothing: neither the scheduler nor the kubelet counts it any more.
        self.kubectl.run("delete", "pod", "-n", NAMESPACE, "token-env", "--wait=false")

    def deployment_state(self, count: int = COUNT) -> tuple[bool, str]:
        pods = self.pods(TEST_SELECTOR)
        running: dict[str, int] = {}
        pending_insufficient = 0
        other = []
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                other.append(f"{pod['metadata']['name']}: terminating")
                continue
            phase = pod["status"].get("phase")
            conditions = {c["type"]: c for c in pod["status"].get("conditions", [])}
            scheduled = conditions.get("PodScheduled", {})
            if phase == "Running":
                running[pod["spec"]["nodeName"]] = running.get(pod["spec"]["nodeName"], 0) + 1
            elif (
                phase == "Pending"
                and scheduled.get("status") == "False"
                and f"Insufficient {RESOURCE}" in scheduled.get("message", "")
            ):
                pending_insufficient += 1
            else:
                other.append(f"{pod['metadata']['name']}: {phase} {scheduled.get('message', '')}".strip())
        want_running = min(REPLICAS, count * len(self.nodes))
        done = (
            len(pods) == REPLICAS
            and sum(running.values()) == want_running
            and all(n <= count for n in running.values())
            and pending_insufficient == REPLICAS - want_running
            and not other
        )
        detail = (
            f"{len(pods)} pods; Running per node {running}; Pending (Insufficient {RESOURCE}) {pending_insufficient}"
        )
        return done, detail + (f"; other: {other}" if other else "")

    def step_deployment(self) -> None:
        start = time.monotonic()
        text = (self.args.manifests / "token-resource-test.yaml").read_text()
        self.apply_rendered(text, DEFAULT_WORKLOAD_IMAGE, self.args.workload_image)
        want = min(REPLICAS, COUNT * len(self.nodes))

        def settled() -> tuple[str | bool, str]:
            done, detail = self.deployment_state()
            return done and detail, detail

        state = poll(
            f"{want} test pods Running ({COUNT} per node), {REPLICAS - want} Pending with Insufficient {RESOURCE}",
            self.args.timeout,
            settled,
        )
        self.mark(f"test Deployment settled: {state}", time.monotonic() - start)
        print(self.kubectl.run("get", "pods", "-n", NAMESPACE, "-l", TEST_SELECTOR, "-o", "wide"), flush=True)

    def step_kubelet_restart(self) -> None:
        before = self.heartbeats()
        for node in self.nodes:
            command = self.args.restart_kubelet.format(node=node)
            print(f"restarting the kubelet on {node}: {command}", flush=True)
            start = time.monotonic()
            result = subprocess.run(command, shell=True, cwd=REPO, timeout=180, check=False)
            if result.returncode != 0:
                raise CheckFailedError(f"kubelet restart command exited {result.returncode}: {command}")
            self.mark(f"{node}: kubelet restart command returned", time.monotonic() - start)

            def re_registered(node: str = node) -> tuple[bool, str]:
                beat = self.heartbeats()[node]
                tokens = self.node_tokens()[node]
                # A status posted by the new kubelet, which has the plugin registered again.
                return beat != before[node] and tokens == (str(COUNT), str(COUNT)), f"heartbeat {beat}, {tokens}"

            poll(f"{node}: a fresh node status with allocatable {COUNT} again", self.args.timeout, re_registered)
            self.mark(f"{node}: plugin re-registered, allocatable {RESOURCE} = {COUNT} again", time.monotonic() - start)
            self.report_reregistration(node)
        self.check_plugin_untouched("the kubelet restart")
        poll(
            "the test Deployment to stay at 2 Running per node after the kubelet restart",
            self.args.timeout,
            self.deployment_state,
        )

    def report_reregistration(self, node: str) -> None:
        """Adds the daemon's own view to the timeline: from noticing the kubelet go to registering
        with the new one (this includes the kubelet's start-up until kubelet.sock exists)."""
        pods = [p for p in self.pods(PLUGIN_SELECTOR) if p["spec"].get("nodeName") == node]
        if len(pods) != 1:
            raise CheckFailedError(f"{node}: expected one plugin pod, found {[p['metadata']['name'] for p in pods]}")
        log = self.kubectl.run("logs", "-n", NAMESPACE, pods[0]["metadata"]["name"]).splitlines()
        read = [(_absl_time(line), line) for line in log]
        stamped = [(t, line) for t, line in read if t is not None]
        opened = [i for i, (_, line) in enumerate(stamped) if "kubelet opened ListAndWatch" in line]
        registered = [i for i, (_, line) in enumerate(stamped) if "registered with the kubelet" in line]
        if len(opened) < 2 or len(registered) < 2:
            raise CheckFailedError(f"{node}: the plugin's log shows no second registration:\n" + "\n".join(log[-20:]))
        # The first sign of the kubelet going that the daemon logs, whichever comes first: its stream
        # ending, its socket deleted, a new kubelet.sock (kubelet.sock mode), or a new GetInfo.
        first_loss = next((t for t, line in stamped[opened[-2] + 1 :] if re.search(LOSS_SIGNS, line)), None)
        if first_loss is None:
            raise CheckFailedError(
                f"{node}: the plugin's log shows no sign of the kubelet going:\n" + "\n".join(log[-20:])
            )
        self.mark(
            f"{node}: daemon saw the kubelet go, registered again {stamped[registered[-1]][0] - first_loss:.1f}s "
            f"later, ListAndWatch open after {stamped[opened[-1]][0] - first_loss:.1f}s",
            None,
        )

    def step_reconfigure(self) -> None:
        """Count 2 -> 3 by editing the ConfigMap: the daemon re-reads the mounted file (the kubelet
        refreshes ConfigMap volumes about once a minute) and one more test pod per node runs."""
        start = time.monotonic()
        configmap = self.kubectl.json("get", "configmap", "-n", NAMESPACE, "token-resource-config")
        text = configmap["data"]["config.yaml"]
        edited, changed = re.subn(rf"(?m)^(\s+)count: {COUNT}$", rf"\g<1>count: {COUNT + 1}", text)
        if changed != 1:
            raise CheckFailedError(f"expected one 'count: {COUNT}' line in the ConfigMap's config.yaml:\n{text}")
        patch = {"data": {"config.yaml": edited}}
        self.kubectl.run(
            "patch", "configmap", "-n", NAMESPACE, "token-resource-config", "--type=merge", "-p", json.dumps(patch)
        )

        def advertised() -> tuple[bool, dict[str, tuple[str, str]]]:
            tokens = self.node_tokens()
            return all(t == (str(COUNT + 1),) * 2 for t in tokens.values()), tokens

        poll(f"allocatable {COUNT + 1} after the ConfigMap edit", max(self.args.timeout, 180), advertised)
        self.mark(
            f"ConfigMap count {COUNT} -> {COUNT + 1}: allocatable {COUNT + 1} on every node", time.monotonic() - start
        )

        def settled() -> tuple[str | bool, str]:
            done, detail = self.deployment_state(COUNT + 1)
            return done and detail, detail

        state = poll(f"{COUNT + 1} test pods Running per node", self.args.timeout, settled)
        self.mark(f"test Deployment settled again: {state}", time.monotonic() - start)
        self.check_plugin_untouched("the reconfiguration")

    def check_plugin_untouched(self, during: str) -> None:
        now = {p["metadata"]["name"]: p for p in self.pods(PLUGIN_SELECTOR)}
        if {name: p["metadata"]["uid"] for name, p in now.items()} != self.plugin_pods:
            raise CheckFailedError(f"plugin pods changed across {during}: {self.plugin_pods} -> {list(now)}")
        restarts = {name: p["status"]["containerStatuses"][0]["restartCount"] for name, p in now.items()}
        if any(restarts.values()):
            raise CheckFailedError(f"plugin container restarted across {during}: {restarts}")
        print(f"  same plugin pod(s) as installed, never restarted, after {during}", flush=True)

    def step_uninstall(self) -> None:
        start = time.monotonic()
        self.kubectl.run("delete", "namespace", NAMESPACE, "--wait=false")

        def withdrawn() -> tuple[bool, dict[str, tuple[str, str]]]:
            tokens = self.node_tokens()
            return all(t[1] == "0" for t in tokens.values()), tokens

        poll(f"allocatable {RESOURCE} to drop to 0 after the namespace is deleted", self.args.timeout * 2, withdrawn)
        self.mark(f"namespace deleted: allocatable {RESOURCE} = 0 on every node", time.monotonic() - start)

    # -- diagnostics ------------------------------------------------------------------------

    def diagnose(self) -> None:
        print("\n==== diagnostics", flush=True)
        for title, args in [
            ("nodes", ["get", "nodes", "-o", "wide"]),
            (
                "node resources",
                [
                    "get",
                    "nodes",
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.name}: capacity "
                    "{.status.capacity} allocatable {.status.allocatable}{'\\n'}{end}",
                ],
            ),
            (f"namespace {NAMESPACE}", ["get", "all,configmap", "-n", NAMESPACE, "-o", "wide"]),
            ("events", ["get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"]),
            ("plugin logs", ["logs", "-n", NAMESPACE, "-l", PLUGIN_SELECTOR, "--tail=200", "--prefix"]),
            (
                "plugin logs (previous container)",
                ["logs", "-n", NAMESPACE, "-l", PLUGIN_SELECTOR, "--previous", "--tail=100", "--prefix"],
            ),
        ]:
            print(f"---- {title}: kubectl {' '.join(args)}", flush=True)
            result = subprocess.run([*self.kubectl.base, *args], capture_output=True, text=True, check=False)
            print((result.stdout + result.stderr).rstrip(), flush=True)
        if self.args.kubelet_logs:
            for node in self.nodes or ["?"]:
                command = self.args.kubelet_logs.format(node=node)
                print(f"---- kubelet logs of {node}: {command}", flush=True)
                subprocess.run(command, shell=True, cwd=REPO, check=False)

    def run(self) -> int:
        steps: list[tuple[str, Callable[[], None] | None]] = [
            ("preflight: nodes, no leftovers", self.preflight),
            ("install: DaemonSet Ready, capacity = allocatable = 2 on every node", self.step_install),
            ("a pod holding a token sees it in its environment", self.step_token_in_environment),
            ("10 replicas: exactly 2 Running per node, the rest Pending (Insufficient)", self.step_deployment),
        ]
        restart = self.step_kubelet_restart if self.args.restart_kubelet else None
        steps.append(("kubelet restart: allocatable back to 2, plugin pod untouched", restart))
        reconfigure = None if self.args.skip_reconfigure else self.step_reconfigure
        steps.append(("ConfigMap count 2 -> 3: allocatable 3, one more pod per node, no restart", reconfigure))
        steps.append(("uninstall: namespace deleted, allocatable 0", self.step_uninstall))
        failed = None
        for title, step in steps:
            print(f"\n== {title}", flush=True)
            if step is None:
                print("skipped (--restart_kubelet not given, or --skip_reconfigure)", flush=True)
                continue
            try:
                step()
            except (CheckFailedError, subprocess.TimeoutExpired) as error:
                failed = title
                print(f"FAILED: {title}: {error}", flush=True)
                break
            except Exception:  # a harness bug: still print the timeline and the diagnostics
                failed = title
                print(f"FAILED: {title}: the harness itself raised:", flush=True)
                traceback.print_exc()
                break
            self.passed.append(title)
            print(f"ok: {title}", flush=True)
        print("\n== timeline (seconds from the start of each step)")
        for event, seconds in self.timeline:
            print(f"  {_when(seconds)}  {event}")
        if failed:
            self.diagnose()
        skipped = len(steps) - len(self.passed) - (1 if failed else 0)
        print(
            f"\ne2e: {len(self.passed)} passed, {1 if failed else 0} failed"
            + (f", {skipped} skipped" if skipped else "")
        )
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: $KUBECONFIG")
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--manifests", type=pathlib.Path, default=REPO / "k8s", help="the k8s/ directory")
    parser.add_argument(
        "--install",
        type=pathlib.Path,
        help="the kustomization to install (default: --manifests), e.g. k8s/plugin-watcher",
    )
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"plugin image (default: {DEFAULT_IMAGE}, as in k8s/)")
    parser.add_argument("--workload_image", default=DEFAULT_WORKLOAD_IMAGE, help="test Deployment's image")
    parser.add_argument("--busybox_image", default="busybox:1.36", help="image with sh for the environment check")
    parser.add_argument(
        "--restart_kubelet",
        help="shell command restarting the kubelet of node {node} and returning when it runs again, e.g. "
        "'docker exec {node} systemctl restart kubelet' (kind); without it that step is skipped",
    )
    parser.add_argument(
        "--skip_reconfigure", action="store_true", help="skip the ConfigMap edit (it waits up to a minute)"
    )
    parser.add_argument("--kubelet_logs", help="shell command printing node {node}'s kubelet log, run on failure")
    parser.add_argument("--timeout", type=float, default=120, help="seconds allowed for each wait (default 120)")
    args = parser.parse_args(argv)
    return Acceptance(args).run()


if __name__ == "__main__":
    sys.exit(main())
