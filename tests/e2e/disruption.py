#!/usr/bin/env python3
"""The disruption suite: does any pod fail while the plugin is disrupted under load? (issue 9)

Given KUBECONFIG (or --kubeconfig) and the token-resource image on the node, it installs k8s/
(count 2), and for each disruption in turn runs a fresh churn Job (busybox `sleep 1` pods with
`limits: example.com/token: 1`, parallelism 4) until it is warm, disrupts the plugin, waits until
the plugin is back (plugin pod Ready, and a node status posted since then with the count in
force), lets the churn run on until every pod bound in the window is settled, and records:

  - failed pods by reason: UnexpectedAdmissionError, OutOf<resource>, other; pods that a reboot
    killed while running are counted apart;
  - exposure: pods bound to the node during the window (disruption start to plugin back);
  - the longest time a pod waited from creation to its container starting;
  - when the node's allocatable came back (or that it never dropped in a posted status);
  - that no token pod started beyond the count in force: from the containers' start/end times
    (the CRI log's nanosecond timestamps when --pod_log_dir is given, else `kubectl logs
    --timestamps`) and the token IDs each pod got (EXAMPLE_COM_TOKEN): no ID held by two running
    pods at once, no pod started after a decrease with an ID beyond the new count, and never more
    pods running than the count in force plus the pods that held tokens before the decrease.

Disruptions (--disruptions, in this order by default):

  baseline          nothing happens (the window ends after 10 pods succeeded)
  container-kill    the plugin container SIGKILLed (--kill_container), restarted in place
  pod-delete        kubectl delete pod (the DaemonSet creates a new one once the old is gone)
  rolling-update    kubectl rollout restart ds (1.20: no surge, the old pod goes first)
  kubelet-restart   --restart_kubelet
  node-reboot       --reboot: kubelet stopped, every container killed, kubelet started again,
                    while 2 pods hold tokens
  count-decrease    ConfigMap count 2 -> 1 while 2 tokens are in use
  count-increase    ConfigMap count 1 -> 2
  surge             a second DaemonSet beside the first (what maxSurge: 1 does on 1.22+); once
                    its pod is Ready (or after --surge_ready_timeout), the first DaemonSet is
                    deleted. The next surge goes back the other way.

ConfigMap changes: the kubelet 1.20 refreshes a mounted ConfigMap at its next sync of the pod,
about once a minute. The suite makes the sync happen at once by changing an annotation of the
plugin pod (`tests.token-resource/resync`): any change to a pod's annotations makes the kubelet
sync it, which remounts its ConfigMap volumes from its watch-based cache. That is an ordinary API
update, nothing privileged; the daemon then sees the `..data` swap as on any cluster.

Exit status: 1 when a disruption that must be clean (pod-delete, rolling-update, surge,
count-decrease, count-increase; and baseline) has a failed pod in any repeat, when a token pod ever started beyond
the count in force, or when the plugin did not come back; the other disruptions' failures are
reported. --full runs 10 repeats of each; the default (CI) size runs one.

  KUBECONFIG=... tests/e2e/disruption.py --image=localhost/token-resource:dev \\
      --restart_kubelet=... --reboot=... --kill_container='... {id}'

tests/e2e/realk8s.sh runs it on the local realk8s cluster after the acceptance test.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterable
from typing import TypeVar

from kube import CheckFailedError, Kubectl, Watch, cri_log_lines, parse_time, poll

T = TypeVar("T")

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
NAMESPACE = "token-resource"
CHURN_NAMESPACE = "token-resource-churn"
RESOURCE = "example.com/token"
ENV_VAR = "EXAMPLE_COM_TOKEN"
COUNT = 2
CONFIGMAP = "token-resource-config"
DAEMONSETS = ("token-resource", "token-resource-surge")
PLUGIN_SELECTOR = "app.kubernetes.io/name=token-resource"
CHURN_LABEL = "token-resource-churn"
DEFAULT_IMAGE = "token-resource:latest"
RESYNC_ANNOTATION = "tests.token-resource/resync"

DISRUPTIONS = (
    "baseline",
    "container-kill",
    "pod-delete",
    "rolling-update",
    "kubelet-restart",
    "node-reboot",
    "count-decrease",
    "count-increase",
    "surge",
)
# Issue 9: these must never fail a pod. (The count decrease since the daemon withholds a lower count
# before publishing it: 0 failed in 16 repeats; what could still fail one is in drain.py.)
MUST_BE_CLEAN = {"baseline", "pod-delete", "rolling-update", "surge", "count-decrease", "count-increase"}
# A container can start up to this long after the kubelet admitted its pod (sandbox, image, runc):
# a pod admitted under the old count may start this long after a decrease took effect.
ADMISSION_SLACK = 3.0


@dataclasses.dataclass
class PodRecord:
    uid: str
    name: str
    job: str
    created: float  # first seen by the watch (our clock), else creationTimestamp
    obj: dict
    bound: float | None = None  # first seen with spec.nodeName
    deleted: float | None = None
    # From the container's log: precise start/end and the token IDs it got.
    log_start: float | None = None
    log_end: float | None = None
    tokens: tuple[str, ...] | None = None
    log_read: bool = False

    @property
    def phase(self) -> str:
        return self.obj.get("status", {}).get("phase", "")

    def container_state(self) -> dict:
        statuses = self.obj.get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("state", {})

    @property
    def started(self) -> float | None:
        if self.log_start is not None:
            return self.log_start
        state = self.container_state()
        for key in ("running", "terminated"):
            started = parse_time(state.get(key, {}).get("startedAt"))
            # A container that failed to start (StartError) reports the epoch.
            if started and started > 1e9:
                return started
        return None

    @property
    def finished(self) -> float | None:
        if self.log_end is not None:
            return self.log_end
        terminated = self.container_state().get("terminated", {})
        return parse_time(terminated.get("finishedAt"))


@dataclasses.dataclass
class Result:
    disruption: str
    repeat: int
    window: float = 0.0
    exposure: int = 0
    pods: int = 0
    failed: dict[str, int] = dataclasses.field(default_factory=dict)  # admission, outof, other, reboot
    failure_reasons: list[str] = dataclasses.field(default_factory=list)
    longest_wait: float = 0.0
    allocatable_back: float | None = None  # seconds from the start; None: never dropped
    allocatable_low: str = ""
    plugin_back: float | None = None
    action_done: float | None = None  # seconds from the start until the disruption's command returned
    violations: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def failed_admission(self) -> int:
        return self.failed.get("admission", 0) + self.failed.get("outof", 0) + self.failed.get("other", 0)


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.kubectl = Kubectl(args.kubectl, args.kubeconfig)
        self.node = ""
        self.changed = threading.Condition()
        self.lock = threading.Lock()
        self.churn: dict[str, PodRecord] = {}
        self.plugins: dict[str, PodRecord] = {}
        self.node_events: list[tuple[float, str, str]] = []  # (seen, allocatable, heartbeat)
        self.watches: list[Watch] = []
        self.daemonset = DAEMONSETS[0]
        self.count = COUNT
        # (effective from, count): the count the kubelet was told, for the count check.
        self.count_changes: list[tuple[float, int]] = [(0.0, COUNT)]
        self.results: list[Result] = []
        self.job_serial = 0

    # -- watches ----------------------------------------------------------------------------

    def _on_pod(self, table: dict[str, PodRecord], seen: float, kind: str, obj: dict) -> None:
        meta = obj["metadata"]
        with self.lock:
            record = table.get(meta["uid"])
            if record is None:
                created = parse_time(meta.get("creationTimestamp")) or seen
                record = table[meta["uid"]] = PodRecord(
                    uid=meta["uid"],
                    name=meta["name"],
                    job=meta.get("labels", {}).get("job-name", ""),
                    created=max(created, seen) if kind == "ADDED" and seen - created < 2 else created,
                    obj=obj,
                )
            record.obj = obj
            if record.bound is None and obj.get("spec", {}).get("nodeName"):
                record.bound = seen
            if kind == "DELETED":
                record.deleted = seen

    def _on_node(self, seen: float, kind: str, obj: dict) -> None:
        status = obj.get("status", {})
        beat = next((c.get("lastHeartbeatTime", "") for c in status.get("conditions", []) if c["type"] == "Ready"), "")
        with self.lock:
            self.node_events.append((seen, status.get("allocatable", {}).get(RESOURCE, "0"), beat))

    def start_watches(self) -> None:
        self.watches = [
            Watch(
                self.kubectl,
                ["pods", "-n", CHURN_NAMESPACE, "-l", f"app.kubernetes.io/name={CHURN_LABEL}"],
                lambda seen, kind, obj: self._on_pod(self.churn, seen, kind, obj),
                self.changed,
            ),
            Watch(
                self.kubectl,
                ["pods", "-n", NAMESPACE, "-l", PLUGIN_SELECTOR],
                lambda seen, kind, obj: self._on_pod(self.plugins, seen, kind, obj),
                self.changed,
            ),
            Watch(self.kubectl, ["node", self.node], self._on_node, self.changed),
        ]

    def wait(self, what: str, timeout: float, probe: Callable[[], tuple[T | None, object]]) -> T:
        return self.watches[0].wait_for(what, timeout, probe)

    # -- state ------------------------------------------------------------------------------

    def plugin_pod(self) -> PodRecord | None:
        """The live plugin pod on the node (not deleted, not terminating), the newest if several."""
        with self.lock:
            live = [
                r
                for r in self.plugins.values()
                if r.deleted is None
                and not r.obj["metadata"].get("deletionTimestamp")
                and r.obj.get("spec", {}).get("nodeName") == self.node
            ]
        return max(live, key=lambda r: r.created) if live else None

    @staticmethod
    def ready(record: PodRecord | None) -> bool:
        if record is None:
            return False
        conditions = {c["type"]: c["status"] for c in record.obj.get("status", {}).get("conditions", [])}
        return conditions.get("Ready") == "True"

    @staticmethod
    def restarts(record: PodRecord) -> int:
        statuses = record.obj.get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("restartCount", 0)

    @staticmethod
    def stopped(record: PodRecord) -> bool:
        """The plugin pod's container no longer runs (or the pod is gone)."""
        if record.deleted is not None or record.phase in ("Succeeded", "Failed"):
            return True
        statuses = record.obj.get("status", {}).get("containerStatuses") or [{}]
        return "running" not in statuses[0].get("state", {})

    def allocatable(self) -> str:
        """The node's allocatable tokens in its latest status. The kubelet posts a status when it
        changed (checked every 10 s), so an outage shorter than that may never show here."""
        with self.lock:
            return self.node_events[-1][1] if self.node_events else "?"

    def job_pods(self, job: str) -> list[PodRecord]:
        with self.lock:
            return [r for r in self.churn.values() if r.job == job]

    # -- setup ------------------------------------------------------------------------------

    def preflight(self) -> None:
        nodes = self.kubectl.json("get", "nodes")["items"]
        names = sorted(
            n["metadata"]["name"]
            for n in nodes
            if n["metadata"].get("labels", {}).get("kubernetes.io/os") == "linux"
            and not n["spec"].get("unschedulable", False)
        )
        if self.args.node:
            if self.args.node not in names:
                raise CheckFailedError(f"node {self.args.node} is not a schedulable Linux node: {names}")
            self.node = self.args.node
        elif len(names) == 1:
            self.node = names[0]
        else:
            raise CheckFailedError(f"several nodes {names}: choose one with --node")
        print(f"node: {self.node}", flush=True)
        # A namespace still being deleted (the acceptance test's, say) must go first.
        for namespace in (NAMESPACE, CHURN_NAMESPACE):
            phase = self.kubectl.run(
                "get", "namespace", namespace, "--ignore-not-found", "-o", "jsonpath={.status.phase}"
            )
            if phase == "Terminating":
                print(f"namespace {namespace} is being deleted: waiting for it to go", flush=True)

                def gone(ns: str = namespace) -> tuple[bool, str]:
                    return not self.kubectl.run("get", "namespace", ns, "--ignore-not-found").strip(), ""

                poll(f"namespace {namespace} to go", 300, gone, 2)
        # Token pods that are not ours would make the count check meaningless.
        pods = self.kubectl.json("get", "pods", "-A", "--field-selector", f"spec.nodeName={self.node}")["items"]
        others = [
            f"{p['metadata']['namespace']}/{p['metadata']['name']}"
            for p in pods
            if p["metadata"]["namespace"] != CHURN_NAMESPACE
            and p["status"].get("phase") not in ("Succeeded", "Failed")
            and any(RESOURCE in (c.get("resources", {}).get("limits") or {}) for c in p["spec"]["containers"])
        ]
        if others:
            raise CheckFailedError(f"other pods on {self.node} hold {RESOURCE}: {others}")

    def install(self) -> None:
        start = time.monotonic()
        rendered = self.kubectl.run("kustomize", str(self.args.manifests))
        if self.args.image != DEFAULT_IMAGE:
            if rendered.count(f"image: {DEFAULT_IMAGE}") != 1:
                raise CheckFailedError(f"expected exactly one 'image: {DEFAULT_IMAGE}' in the manifests")
            rendered = rendered.replace(f"image: {DEFAULT_IMAGE}", f"image: {self.args.image}")
        existed = [
            name.split("/", 1)[-1]
            for name in self.kubectl.run(
                "get", "daemonset", "-n", NAMESPACE, "--ignore-not-found", "-o", "name", check=False
            ).split()
        ]
        self.kubectl.run("create", "namespace", CHURN_NAMESPACE, check=False)
        self.kubectl.run("delete", "jobs", "-n", CHURN_NAMESPACE, "--all", "--wait=false")
        poll(
            f"the ServiceAccount default in {CHURN_NAMESPACE}",
            60,
            lambda: (self.kubectl.run("get", "sa", "-n", CHURN_NAMESPACE, "default", check=False).strip(), ""),
        )
        self.start_watches()
        if DAEMONSETS[1] in existed:
            # A surge copy left by an earlier run goes first: the one DaemonSet is the manifest's.
            self.kubectl.run("delete", "daemonset", "-n", NAMESPACE, DAEMONSETS[1], "--wait=false")
            self.wait(
                f"the pods of {DAEMONSETS[1]} to stop",
                self.args.timeout * 2,
                lambda: (not self.plugin_pod(), "still there"),
            )
        self.kubectl.run("apply", "-f", "-", stdin=rendered)
        if DAEMONSETS[0] in existed:
            # An earlier run's plugin pod may run another image under the same name, or hold a
            # count that the kubelet has not refreshed yet: start from a new pod.
            old = self.wait("the earlier plugin pod", self.args.timeout, lambda: (self.plugin_pod(), "none"))
            self.kubectl.run("rollout", "restart", "daemonset", "-n", NAMESPACE, self.daemonset)
            self.wait("the earlier plugin pod replaced", self.args.timeout * 2, lambda: self.replaced(old))
        self.wait_plugin_ready("the plugin to be installed", self.args.timeout)
        print(f"installed ({self.args.image}) in {time.monotonic() - start:.1f}s", flush=True)

    def wait_plugin_ready(self, what: str, timeout: float, count: int | None = None) -> None:
        """Waits until the node's plugin pod is Ready and the node's latest status has
        allocatable == count."""
        count = self.count if count is None else count

        def back() -> tuple[bool, str]:
            pod = self.plugin_pod()
            if not self.ready(pod):
                return False, f"plugin pod {pod.name if pod else None} not Ready; allocatable {self.allocatable()}"
            return self.allocatable() == str(count), f"plugin pod Ready; allocatable {self.allocatable()}, not {count}"

        self.wait(what, timeout, back)

    # -- churn ------------------------------------------------------------------------------

    def start_job(self, disruption: str) -> str:
        self.job_serial += 1
        name = f"churn-{self.job_serial}-{disruption}"
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": CHURN_NAMESPACE, "labels": {"app.kubernetes.io/name": CHURN_LABEL}},
            "spec": {
                "parallelism": self.args.parallelism,
                "completions": 100000,
                "backoffLimit": 100000,
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/name": CHURN_LABEL}},
                    "spec": {
                        "restartPolicy": "Never",
                        "nodeSelector": {"kubernetes.io/hostname": self.node},
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "terminationGracePeriodSeconds": 1,
                        "containers": [
                            {
                                "name": "churn",
                                "image": self.args.busybox_image,
                                "imagePullPolicy": "IfNotPresent",
                                "command": ["sh", "-c", f'echo "start ${ENV_VAR}"; sleep 1; echo end'],
                                "resources": {"limits": {RESOURCE: 1}},
                            }
                        ],
                    },
                },
            },
        }
        self.kubectl.run("create", "-f", "-", stdin=json.dumps(job))
        return name

    def succeeded_after(self, job: str, since: float) -> int:
        return sum(1 for r in self.job_pods(job) if r.phase == "Succeeded" and (r.started or 0) > since)

    def wait_warm(self, job: str) -> None:
        self.wait(
            f"job {job}: 2 pods succeeded",
            self.args.timeout,
            lambda: (self.succeeded_after(job, 0) >= 2, f"{self.succeeded_after(job, 0)} succeeded"),
        )

    @staticmethod
    def holds_tokens(record: PodRecord) -> bool:
        """Admitted by the kubelet (it wrote the pod's conditions) and not ended: its tokens are
        allocated. (A 1 s container often starts and ends between two status updates, so its
        running state is rarely seen.)"""
        conditions = {c["type"] for c in record.obj.get("status", {}).get("conditions", [])}
        return (
            "Initialized" in conditions
            and record.phase not in ("Succeeded", "Failed")
            and record.deleted is None
            and not record.obj["metadata"].get("deletionTimestamp")
        )

    def holding(self, job: str) -> list[PodRecord]:
        return [r for r in self.job_pods(job) if self.holds_tokens(r)]

    def settle(self, job: str, recovered: float) -> None:
        """Every pod bound before `recovered` has started or ended, and 2 pods started since then
        have succeeded (the churn goes on)."""

        def settled() -> tuple[bool, str]:
            unsettled = [
                r.name
                for r in self.job_pods(job)
                if r.bound is not None
                and r.bound <= recovered
                and r.started is None
                and r.phase not in ("Succeeded", "Failed")
                and r.deleted is None
            ]
            after = self.succeeded_after(job, recovered)
            return not unsettled and after >= 2, f"unsettled {unsettled}, {after} succeeded since"

        self.wait(f"job {job} to settle", self.args.timeout, settled)

    def read_logs(self, records: list[PodRecord]) -> None:
        for record in records:
            if record.log_read or record.started is None:
                continue
            text = ""
            if self.args.pod_log_dir:
                directory = (
                    pathlib.Path(self.args.pod_log_dir) / f"{CHURN_NAMESPACE}_{record.name}_{record.uid}" / "churn"
                )
                text = "".join(p.read_text(errors="replace") for p in sorted(directory.glob("*.log")))
            else:
                text = self.kubectl.run("logs", "-n", CHURN_NAMESPACE, record.name, "--timestamps", check=False)
            for when, message in cri_log_lines(text):
                if message.startswith("start"):
                    record.log_start = when
                    record.tokens = tuple(t for t in message[len("start") :].strip().split(",") if t)
                elif message == "end":
                    record.log_end = when
            record.log_read = record.phase in ("Succeeded", "Failed")

    # -- disruptions ------------------------------------------------------------------------

    def run_command(self, command: str, lines: int = 1, **fields: str) -> str:
        """Runs a disruption's shell command; returns the last lines it printed (its summary)."""
        command = command.format(**{k: shlex.quote(v) for k, v in fields.items()})
        result = subprocess.run(command, shell=True, cwd=REPO, timeout=300, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckFailedError(f"command exited {result.returncode}: {command}\n{result.stdout}{result.stderr}")
        return " / ".join((result.stdout.strip() or result.stderr.strip()).splitlines()[-lines:])

    def container_kill(self, result: Result, t0: float) -> None:
        pod = self.plugin_pod()
        assert pod is not None
        before = self.restarts(pod)
        container_id = pod.obj["status"]["containerStatuses"][0]["containerID"].split("://", 1)[-1]
        self.run_command(self.args.kill_container, id=container_id)
        self.wait(
            "the plugin container to be restarted",
            self.args.timeout,
            lambda: (self.restarts(self.plugin_pod() or pod) > before, f"restarts {self.restarts(pod)}"),
        )

    def replaced(self, old: PodRecord) -> tuple[bool, str]:
        pod = self.plugin_pod()
        new = pod is not None and pod.uid != old.uid
        return new and self.stopped(old), f"old {old.name} stopped={self.stopped(old)}, new {new}"

    def pod_delete(self, result: Result, t0: float) -> None:
        old = self.plugin_pod()
        assert old is not None
        self.kubectl.run("delete", "pod", "-n", NAMESPACE, old.name, "--wait=false")
        self.wait("a new plugin pod", self.args.timeout * 2, lambda: self.replaced(old))

    def rolling_update(self, result: Result, t0: float) -> None:
        old = self.plugin_pod()
        assert old is not None
        self.kubectl.run("rollout", "restart", "daemonset", "-n", NAMESPACE, self.daemonset)
        self.wait("the rolling update's new plugin pod", self.args.timeout * 2, lambda: self.replaced(old))

    def kubelet_restart(self, result: Result, t0: float) -> None:
        result.notes.append(self.run_command(self.args.restart_kubelet, node=self.node))

    def node_reboot(self, result: Result, t0: float) -> None:
        pod = self.plugin_pod()
        assert pod is not None
        before = self.restarts(pod)
        with self.lock:
            holding = [r.name for r in self.churn.values() if self.holds_tokens(r)]
        result.notes.append(f"{len(holding)} churn pod(s) held tokens when the node went down")
        result.notes.append(self.run_command(self.args.reboot, lines=2, node=self.node))
        self.wait(
            "the plugin container to run again after the reboot",
            self.args.timeout,
            lambda: (self.restarts(self.plugin_pod() or pod) > before, f"restarts {self.restarts(pod)}"),
        )

    def set_count(self, count: int, result: Result) -> None:
        configmap = self.kubectl.json("get", "configmap", "-n", NAMESPACE, CONFIGMAP)
        text = configmap["data"]["config.yaml"]
        edited, changed = re.subn(r"(?m)^(\s+)count: \d+$", rf"\g<1>count: {count}", text, count=1)
        if not changed:
            raise CheckFailedError(f"no 'count:' line in the ConfigMap's config.yaml:\n{text}")
        patched = time.time()
        self.kubectl.run(
            "patch",
            "configmap",
            "-n",
            NAMESPACE,
            CONFIGMAP,
            "--type=merge",
            "-p",
            json.dumps({"data": {"config.yaml": edited}}),
        )
        pod = self.plugin_pod()
        assert pod is not None
        # Any change to the pod's annotations makes the kubelet sync it, and a sync remounts its
        # ConfigMap volumes (instead of at the next periodic sync, about a minute away).
        self.kubectl.run(
            "annotate", "pod", "-n", NAMESPACE, pod.name, f"{RESYNC_ANNOTATION}={time.time():.3f}", "--overwrite"
        )
        old = self.count
        if count > old:
            # More is allowed from the edit on (a pod can start under the higher count only later).
            self.count_changes.append((patched, count))
        seen = self.wait_count_served(pod, count)
        if count < old:
            # The daemon serves the lower count from `seen` at the latest.
            self.count_changes.append((seen, count))
        self.count = count
        result.notes.append(f"count {old}->{count} served {seen - patched:.1f}s after the edit")

    def wait_count_served(self, pod: PodRecord, count: int) -> float:
        """When the plugin serves the new count: its token_resource_tokens metric (through the API
        server's pod proxy), else a node status with it."""
        path = f"/api/v1/namespaces/{NAMESPACE}/pods/{pod.name}:8080/proxy/metrics"

        def served() -> tuple[float | bool, str]:
            text = self.kubectl.run("get", "--raw", path, check=False, timeout=10)
            values = re.findall(rf'^token_resource_tokens\{{resource="{re.escape(RESOURCE)}"\}} (\S+)$', text, re.M)
            if values:
                return float(values[0]) == count and time.time(), f"token_resource_tokens {values[0]}"
            latest = self.allocatable()
            return latest == str(count) and time.time(), f"no metrics; allocatable {latest}"

        return poll(f"the plugin to serve count {count}", max(self.args.timeout, 120), served, 0.3)

    def count_decrease(self, result: Result, t0: float) -> None:
        self.set_count(COUNT - 1, result)

    def count_increase(self, result: Result, t0: float) -> None:
        self.set_count(COUNT, result)

    def surge(self, result: Result, t0: float) -> None:
        old_name = self.daemonset
        new_name = DAEMONSETS[1] if old_name == DAEMONSETS[0] else DAEMONSETS[0]
        old = self.plugin_pod()
        assert old is not None
        daemonset = self.kubectl.json("get", "daemonset", "-n", NAMESPACE, old_name)
        copy = {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": new_name, "namespace": NAMESPACE, "labels": daemonset["metadata"].get("labels", {})},
            "spec": daemonset["spec"],
        }
        for labels in (
            copy["spec"]["selector"]["matchLabels"],
            copy["spec"]["template"]["metadata"]["labels"],
        ):
            labels["app.kubernetes.io/instance"] = new_name
        copy["spec"]["template"]["metadata"].get("annotations", {}).pop("kubectl.kubernetes.io/restartedAt", None)
        self.kubectl.run("create", "-f", "-", stdin=json.dumps(copy))

        def second_ready() -> tuple[bool, list[tuple[str, int, str]]]:
            with self.lock:
                ours = [
                    r
                    for r in self.plugins.values()
                    if r.obj["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == new_name
                    and r.deleted is None
                ]
            return any(self.ready(r) for r in ours), [
                (r.name, self.restarts(r), self.container_state_reason(r)) for r in ours
            ]

        started = time.monotonic()
        try:
            self.wait("the second instance Ready", self.args.surge_ready_timeout, second_ready)
            result.notes.append(f"second instance Ready after {time.monotonic() - started:.1f}s")
        except CheckFailedError as error:
            result.notes.append(f"second instance never Ready: {str(error).split('last seen: ')[-1]}")
        self.kubectl.run("delete", "daemonset", "-n", NAMESPACE, old_name, "--wait=false")
        self.daemonset = new_name
        self.wait("the first instance to stop", self.args.timeout * 2, lambda: (self.stopped(old), old.name))

    @staticmethod
    def container_state_reason(record: PodRecord) -> str:
        state = record.container_state()
        for key, value in state.items():
            return f"{key} {value.get('reason', '')}".strip()
        return "?"

    ACTIONS: typing.ClassVar[dict[str, str]] = {
        "container-kill": "container_kill",
        "pod-delete": "pod_delete",
        "rolling-update": "rolling_update",
        "kubelet-restart": "kubelet_restart",
        "node-reboot": "node_reboot",
        "count-decrease": "count_decrease",
        "count-increase": "count_increase",
        "surge": "surge",
    }

    def measure(self, disruption: str, repeat: int) -> Result:
        result = Result(disruption, repeat)
        self.wait_plugin_ready("the plugin before the disruption", self.args.timeout)
        job = self.start_job(disruption)
        t0 = time.time()
        try:
            self.wait_warm(job)
            if disruption in ("count-decrease", "node-reboot"):
                # A decrease below the tokens in use; a reboot that kills pods holding tokens.
                self.wait(
                    f"{self.count} tokens in use",
                    self.args.timeout,
                    lambda: (len(self.holding(job)) >= self.count, f"{len(self.holding(job))} holding tokens"),
                )
            t0 = time.time()
            if disruption == "baseline":
                self.wait(
                    "10 pods to succeed",
                    self.args.timeout,
                    lambda: (self.succeeded_after(job, t0) >= 10, self.succeeded_after(job, t0)),
                )
            else:
                getattr(self, self.ACTIONS[disruption])(result, t0)
                result.action_done = time.time() - t0
                self.wait_plugin_ready(f"the plugin back after {disruption}", self.args.timeout * 2)
            recovered = time.time()
            pod = self.plugin_pod()
            result.plugin_back = recovered - t0
            result.window = recovered - t0
            self.settle(job, recovered)
            self.analyse(result, job, t0, recovered)
            if pod:
                result.notes.append(f"plugin pod {pod.name} restarts {self.restarts(pod)}")
        except (CheckFailedError, subprocess.TimeoutExpired) as error:
            result.error = str(error)
            self.analyse(result, job, t0, time.time())
        finally:
            self.kubectl.run("delete", "job", "-n", CHURN_NAMESPACE, job, "--wait=false", check=False)
        return result

    # -- analysis ---------------------------------------------------------------------------

    def count_allowed(self, at: float) -> int:
        """The highest count in force during [at - ADMISSION_SLACK, at]."""
        in_force = [c for when, c in self.count_changes if when <= at - ADMISSION_SLACK]
        allowed = in_force[-1] if in_force else COUNT
        return max([allowed] + [c for when, c in self.count_changes if at - ADMISSION_SLACK < when <= at])

    def analyse(self, result: Result, job: str, t0: float, recovered: float) -> None:
        now = time.time()
        pods = self.job_pods(job)
        self.read_logs(pods)
        result.pods = len(pods)
        result.exposure = sum(1 for r in pods if r.bound is not None and t0 <= r.bound <= recovered)
        # Failed pods by reason.
        for record in pods:
            if record.phase != "Failed":
                continue
            status = record.obj.get("status", {})
            reason = status.get("reason", "")
            terminated = record.container_state().get("terminated", {})
            started = record.started
            if reason == "UnexpectedAdmissionError":
                kind = "admission"
            elif reason.startswith("OutOf"):
                kind = "outof"
            elif (
                result.disruption == "node-reboot"
                and started is not None
                and started < t0 + (result.action_done or 0)
                and terminated.get("exitCode", 0) != 0
            ):
                # Its container ran when the node went down (the kubelet is back only once the
                # reboot command returned).
                kind = "reboot"
            else:
                kind = "other"
            result.failed[kind] = result.failed.get(kind, 0) + 1
            detail = reason or f"{terminated.get('reason', '?')} exit {terminated.get('exitCode', '?')}"
            message = (status.get("message") or terminated.get("message") or "").strip()
            result.failure_reasons.append(f"{record.name}: {kind}: {detail} {message}"[:240])
        # The longest wait from creation to the container's start (pods still waiting count too).
        waits = []
        for record in pods:
            if record.started is not None:
                waits.append(record.started - record.created)
            elif record.phase not in ("Succeeded", "Failed") and record.deleted is None:
                waits.append(now - record.created)
        result.longest_wait = max(waits, default=0.0)
        # Allocatable in the node statuses posted since t0.
        with self.lock:
            events = [(seen, a) for seen, a, _ in self.node_events if seen >= t0]
        target = str(self.count)
        dropped = [seen for seen, a in events if a != target]
        if dropped:
            result.allocatable_low = min((a for _, a in events), key=lambda a: int(a) if a.isdigit() else 0)
            back = [seen for seen, a in events if seen > dropped[-1] and a == target]
            result.allocatable_back = (back[0] - t0) if back else None
            if not back:
                result.notes.append(f"allocatable not back to {target} (last {events[-1][1]})")
        self.check_count(result, pods)

    @staticmethod
    def describe(record: PodRecord) -> str:
        """When it ran (log or API times), its tokens and how it ended, for a violation report."""

        def clock(when: float | None) -> str:
            return time.strftime("%H:%M:%S", time.gmtime(when)) + f"{when % 1:.2f}"[1:] if when else "?"

        source = "log" if record.log_start is not None else "api"
        state = record.container_state()
        ended = next(iter(state), "?") + (f" {state['terminated'].get('reason', '')}" if "terminated" in state else "")
        tokens = ",".join(record.tokens or ()) or "?"
        return f"[{clock(record.started)}-{clock(record.finished)} {source}, {tokens}, {record.phase} {ended}]"

    def check_count(self, result: Result, pods: list[PodRecord]) -> None:
        """No token pod started beyond the count in force (see the module docstring)."""
        with self.lock:
            everyone = [r for r in self.churn.values() if r.started is not None]
        decreases = [
            when for (when, c), (_, prev) in zip(self.count_changes[1:], self.count_changes, strict=False) if c < prev
        ]
        for record in pods:
            start = record.started
            if start is None:
                continue
            allowed = self.count_allowed(start)
            running = [
                r
                for r in everyone
                if r.uid != record.uid
                and r.started is not None
                and r.started <= start
                and (r.finished if r.finished is not None else float("inf")) > start
            ]
            last_decrease = max((d for d in decreases if d <= start), default=None)
            held_before = (
                [r for r in running if r.started is not None and r.started < last_decrease + ADMISSION_SLACK]
                if last_decrease is not None
                else []
            )
            if len(running) + 1 > allowed + len(held_before):
                result.violations.append(
                    f"{record.name} {self.describe(record)} started with {len(running)} others running, count "
                    f"{allowed}"
                    + (f" (+{len(held_before)} held before the decrease)" if held_before else "")
                    + ": "
                    + "; ".join(f"{r.name} {self.describe(r)}" for r in running)
                )
            if record.tokens:
                shared = [r.name for r in running if r.tokens and set(r.tokens) & set(record.tokens)]
                if shared:
                    result.violations.append(f"{record.name} got {record.tokens} that {shared} still held")
                ids = [int(t.rsplit("-", 1)[-1]) for t in record.tokens if t.rsplit("-", 1)[-1].isdigit()]
                if any(i >= allowed for i in ids):
                    result.violations.append(f"{record.name} got {record.tokens} while the count was {allowed}")

    # -- report -----------------------------------------------------------------------------

    def print_result(self, r: Result) -> None:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(r.failed.items())) or "none"
        back = (
            f"{r.allocatable_back:.1f}s (low {r.allocatable_low})"
            if r.allocatable_back is not None
            else "never dropped"
        )
        if r.allocatable_low and r.allocatable_back is None:
            back = f"not back (low {r.allocatable_low})"
        print(
            f"  {r.disruption} #{r.repeat}: window {r.window:.1f}s, {r.pods} pods, exposure {r.exposure}, "
            f"failed: {failed}; longest wait {r.longest_wait:.1f}s; allocatable back: {back}; "
            f"count check: {'ok' if not r.violations else 'EXCEEDED'}",
            flush=True,
        )
        for line in r.notes:
            print(f"      note: {line}", flush=True)
        for line in r.failure_reasons[:8]:
            print(f"      failed {line}", flush=True)
        if len(r.failure_reasons) > 8:
            print(f"      ... {len(r.failure_reasons) - 8} more", flush=True)
        for line in r.violations[:8]:
            print(f"      COUNT EXCEEDED: {line}", flush=True)
        if r.error:
            print(f"      ERROR: {r.error}", flush=True)

    def table(self) -> str:
        def per_run(values: Iterable[object]) -> str:
            return ", ".join(str(v) for v in values)

        rows = [
            "| disruption | runs | failed (admission + OutOf + other), per run | killed by reboot | "
            "exposure (pods bound in the window), per run | window, s | longest wait to start, s | "
            "allocatable back after, s | count exceeded |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for disruption in [d for d in DISRUPTIONS if any(r.disruption == d for r in self.results)]:
            runs = [r for r in self.results if r.disruption == disruption]
            reasons: dict[str, int] = {}
            for r in runs:
                for kind in ("admission", "outof", "other"):
                    if r.failed.get(kind):
                        reasons[kind] = reasons.get(kind, 0) + r.failed[kind]
            backs = [r.allocatable_back for r in runs if r.allocatable_back is not None]
            dropped_never = sum(1 for r in runs if not r.allocatable_low)
            back = f"{min(backs):.1f}-{max(backs):.1f}" if backs else ""
            if dropped_never:
                back = (back + "; " if back else "") + f"never dropped in {dropped_never}"
            failed = per_run(r.failed_admission for r in runs)
            if reasons:
                failed += " (" + ", ".join(f"{k} {v}" for k, v in reasons.items()) + ")"
            errors = sum(1 for r in runs if r.error)
            rows.append(
                f"| {disruption} | {len(runs)}{f' ({errors} errors)' if errors else ''} | {failed} | "
                f"{per_run(r.failed.get('reboot', 0) for r in runs) if disruption == 'node-reboot' else '-'} | "
                f"{per_run(r.exposure for r in runs)} | "
                f"{min(r.window for r in runs):.1f}-{max(r.window for r in runs):.1f} | "
                f"{max(r.longest_wait for r in runs):.1f} | {back} | "
                f"{sum(len(r.violations) for r in runs) or 'no'} |"
            )
        return "\n".join(rows)

    def run(self) -> int:
        started = time.monotonic()
        try:
            self.preflight()
            self.install()
            order = [d for d in DISRUPTIONS if d in self.args.disruptions]
            for repeat in range(1, self.args.repeats + 1):
                for disruption in order:
                    if disruption == "count-increase" and self.count == COUNT:
                        continue  # it follows a decrease
                    print(f"\n== {disruption} #{repeat}", flush=True)
                    result = self.measure(disruption, repeat)
                    self.results.append(result)
                    self.print_result(result)
                    if disruption == "count-decrease" and "count-increase" not in order and self.count != COUNT:
                        self.set_count(COUNT, Result("restore", repeat))
        except (CheckFailedError, subprocess.TimeoutExpired) as error:
            print(f"FAILED: {error}", flush=True)
            self.diagnose()
            return 1
        finally:
            for watch in self.watches:
                watch.stop()
            if not self.args.keep:
                self.kubectl.run("delete", "jobs", "-n", CHURN_NAMESPACE, "--all", "--wait=false", check=False)
        print(f"\n== disruptions ({self.args.image}, {time.monotonic() - started:.0f}s)\n{self.table()}", flush=True)
        bad = []
        for r in self.results:
            if r.disruption in MUST_BE_CLEAN and (r.failed_admission or r.failed.get("reboot")):
                bad.append(f"{r.disruption} #{r.repeat}: {r.failed_admission} failed pod(s)")
            if r.violations:
                bad.append(f"{r.disruption} #{r.repeat}: count exceeded: {r.violations[0]}")
            if r.error:
                bad.append(f"{r.disruption} #{r.repeat}: {r.error.splitlines()[0]}")
        for line in bad:
            print(f"FAIL: {line}", flush=True)
        if bad:
            self.diagnose()
        print(f"\ndisruption suite: {'FAILED' if bad else 'passed'}", flush=True)
        return 1 if bad else 0

    def diagnose(self) -> None:
        print("\n==== diagnostics", flush=True)
        for title, args in [
            ("plugin pods", ["get", "pods", "-n", NAMESPACE, "-o", "wide"]),
            ("events", ["get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"]),
            ("plugin logs", ["logs", "-n", NAMESPACE, "-l", PLUGIN_SELECTOR, "--tail=60", "--prefix"]),
        ]:
            print(f"---- {title}: kubectl {' '.join(args)}", flush=True)
            result = subprocess.run([*self.kubectl.base, *args], capture_output=True, text=True, check=False)
            print((result.stdout + result.stderr).rstrip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: $KUBECONFIG")
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--manifests", type=pathlib.Path, default=REPO / "k8s", help="the k8s/ directory")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"plugin image (default: {DEFAULT_IMAGE}, as in k8s/)")
    parser.add_argument("--busybox_image", default="busybox:1.36", help="image of the churn pods (sh, sleep)")
    parser.add_argument("--node", help="the node to disrupt (default: the only schedulable Linux node)")
    parser.add_argument("--full", action="store_true", help="10 repeats of each disruption (default 1)")
    parser.add_argument("--repeats", type=int, help="repeats of each disruption (overrides --full)")
    parser.add_argument(
        "--disruptions", default=",".join(DISRUPTIONS), help=f"comma-separated, of: {', '.join(DISRUPTIONS)}"
    )
    parser.add_argument("--parallelism", type=int, default=4, help="churn Job parallelism (default 4)")
    parser.add_argument(
        "--restart_kubelet", help="shell command restarting node {node}'s kubelet, returning once Ready"
    )
    parser.add_argument("--reboot", help="shell command: stop {node}'s kubelet, kill every container, start it again")
    parser.add_argument("--kill_container", help="shell command SIGKILLing the container {id} (containerd ID)")
    parser.add_argument("--pod_log_dir", help="the node's /var/log/pods, readable here: precise container times")
    parser.add_argument("--surge_ready_timeout", type=float, default=45, help="seconds to wait for the 2nd instance")
    parser.add_argument("--timeout", type=float, default=120, help="seconds allowed for each wait (default 120)")
    parser.add_argument("--keep", action="store_true", help="leave the last churn Job")
    args = parser.parse_args(argv)
    args.disruptions = [d.strip() for d in args.disruptions.split(",") if d.strip()]
    unknown = set(args.disruptions) - set(DISRUPTIONS)
    if unknown:
        parser.error(f"unknown disruptions {sorted(unknown)}")
    for disruption, needs in (
        ("kubelet-restart", "restart_kubelet"),
        ("node-reboot", "reboot"),
        ("container-kill", "kill_container"),
    ):
        if disruption in args.disruptions and not getattr(args, needs):
            print(f"skipping {disruption}: no --{needs}", file=sys.stderr)
            args.disruptions.remove(disruption)
    if "count-increase" in args.disruptions and "count-decrease" not in args.disruptions:
        parser.error("count-increase follows count-decrease: give both")
    args.repeats = args.repeats or (10 if args.full else 1)
    return Suite(args).run()


if __name__ == "__main__":
    sys.exit(main())
