"""A planned stop, or a lower count, without failed pods: lower the scheduler's view of this node first.

When the plugin's ListAndWatch stream ends, the kubelet marks its devices unhealthy at once and
refuses every pod that reaches it asking for them (`UnexpectedAdmissionError`), while the node
status the scheduler reads still shows them until the kubelet's next status update (every 10 s).
On 1.20 a successor cannot help: the DaemonSet controller creates it only once the old pod is
gone. So on SIGTERM, while it still serves, the daemon calls

    NodeDrain(kubeapi.in_cluster(), node_name, timeout_s=drain_timeout).withhold({resource: 0, ...})

and only then stops serving. withhold() sets allocatable of each resource to its quantity ("0"
here) in the node's status (the scheduler then leaves new pods `Pending`), waits until the pods
already bound to this node that request one of the resources have been admitted by the kubelet
(they get their tokens from this still-registered plugin), and returns. It never raises: without
API access or RBAC it logs one line and returns a result saying it was skipped, and the daemon
stops as before. Once the stream has ended, `seal(quantities)` re-applies the patch once: a
write-back by the kubelet in the moment between withhold() returning and the stream's end would
otherwise show the count to the scheduler for up to 10 s more.

A lower count is the same window in small: the new snapshot lowers the kubelet's view at once,
the scheduler's 10 s later, and pods bound meanwhile fail admission. So before it publishes a
lower count (ConfigMap 4 -> 2), the supervisor calls withhold({resource: 2}): allocatable "2"
for the scheduler while the kubelet still has 4 devices for the pods already bound, then it
publishes, then seal({resource: 2}) (the kubelet's view is 2 by then, so it holds). Pods running
beyond the new count keep their tokens; the scheduler, which counts them against "2", sends no
new one until they end. A resource removed from the configuration is a stop for that resource
(quantity 0). While withholding a quantity, only a write-back above it is re-applied: a lower
value is the kubelet's own view (devices gone), not ours to raise.

What the 1.20 kubelet does with the patch (pkg/kubelet/kubelet_node_status.go, nodestatus/setters.go,
lifecycle/predicate.go, cm/devicemanager/manager.go), and as seen on a real 1.20.2 node (realk8s,
2026-11-30, a plugin on the host registering 2 x example.org/drain-test):
- Every 10 s tryUpdateNodeStatus GETs the node, recomputes the status from its own view
  (MachineInfo: allocatable of a device-plugin resource = its healthy devices) and, if that
  differs from what it read, patches the difference. While the plugin is registered its view is
  the full count, so it writes the count back within ≤10 s of our patch: the patch has to be
  watched and re-applied for as long as we withhold. Once the plugin's stream has ended its view
  is 0 too, the views agree and nothing is reverted: hence withhold() first, then stop serving.
  Seen: a patch to "0" was written back to "2" by the kubelet 9.3 s later (managedFields:
  kubelet), and during a 25 s withhold() at +9.5 s and +19.5 s, each re-applied 60-130 ms later;
  after the plugin's SIGTERM, allocatable stayed "0" (capacity "2") for the 25 s watched.
- The kubelet's own admission reads allocatable from the API's node object (getNodeAnyWay, the
  node informer), so a 0 there could refuse the pods we wait for (`OutOf...`). It does not: the
  device manager's admit handler runs first and allocates from the plugin's healthy devices, and
  then sanitizeNodeAllocatable raises the allocatable the predicate sees to at least the devices
  allocated, the new pod's included. A pod bound to the node while allocatable is "0" is admitted
  as long as the plugin still serves. Seen: a pod created with spec.nodeName during withhold()
  ran; one left to the scheduler stayed Pending (`Insufficient example.org/drain-test`).
- When the next plugin instance registers, the kubelet's view is the count again and its next
  status update writes it back: that is the wanted end state, so nothing here runs after
  withhold() returns. Seen: "2" again 2 s after the plugin was restarted, and the Pending pod
  was scheduled and ran.
- A quantity other than 0 is the same: the kubelet writes the old count back until its view
  is the new one, and then agrees with the patch (its update patches only what differs from
  the node it read). Seen (realk8s, 2026-11-30, the disruption suite's count-decrease, 2 -> 1
  while both tokens are in use under a churn of token pods, 5 repeats): patch to "1", 1.1-1.2 s
  of withholding (the settle time; no bound pod left to wait for), then the new snapshot; no
  failed pod (5 in the run before this), no pod started beyond the count in force.
- What is left: the kubelet's status update GETs the node (from the API server's cache), sets
  its status from its own view and patches the difference. An update that read its device view
  before the new snapshot arrived and patches after the seal writes the old count back, and it
  stands until the next update (10 s): pods the scheduler binds then fail. That takes the
  kubelet's GET-to-PATCH (milliseconds) to straddle the publish, once per 10 s.

RBAC (a ClusterRole bound to the plugin's ServiceAccount; a DaemonSet cannot name its node):
    nodes/status: patch     the withholding itself
    nodes: watch            to see the kubelet write the count back, and re-apply the patch
    pods: list              the pods bound to this node that are still waiting for admission
Without `watch` on nodes it re-applies the patch blindly every second instead; without `list` on
pods it waits only the settle time.
"""

import dataclasses
import threading
import time
from collections.abc import Collection, Mapping
from typing import Any

from absl import logging

from token_resource.kubeapi import REQUEST_TIMEOUT_S, KubeAPI, KubeAPIError

POLL_S = 0.25
# The scheduler binds asynchronously: a pod it assumed on this node just before it saw the patch
# is bound a moment later. Pods are looked for at least this long after the patch.
SETTLE_S = 1.0
# The longest wait for bound pods (the daemon's --drain_timeout).
TIMEOUT_S = 10.0
# A re-patch runs while withhold() waits to return, so it gets a short timeout.
REPATCH_TIMEOUT_S = 2.0
BLIND_REPATCH_S = 1.0
WATCH_S = 60.0
_RETRY_S = 0.5
# Written only by the kubelet, on the first status it posts for a pod it has admitted
# (generateAPIPodStatus); the scheduler writes PodScheduled only.
_KUBELET_CONDITIONS = frozenset({"Initialized", "ContainersReady", "Ready"})
# Terminal pods need nothing from the plugin; the field selector leaves them out on the server.
_LIVE_PODS = "spec.nodeName={},status.phase!=Succeeded,status.phase!=Failed"


@dataclasses.dataclass(frozen=True)
class DrainResult:
    patched: bool  # allocatable was set to the quantities on the node
    pods: tuple[str, ...] = ()  # namespace/name of the bound pods that were waited for
    unadmitted: tuple[str, ...] = ()  # of those, the ones still not admitted when time ran out
    repatches: int = 0  # times the kubelet wrote the count back and it was withheld again
    seconds: float = 0.0
    skipped: str | None = None  # why it did nothing, or less than all of it


def requests_any(pod: Mapping[str, Any], resources: Collection[str]) -> bool:
    spec = pod.get("spec") or {}
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        amounts = container.get("resources") or {}
        for kind in ("requests", "limits"):  # extended resources may be given as limits only
            for name, quantity in (amounts.get(kind) or {}).items():
                if name in resources and not _is_zero(quantity):
                    return True
    return False


def admitted(pod: Mapping[str, Any]) -> bool:
    """Whether the kubelet has admitted the pod (and so allocated its devices).

    The 1.20 kubelet posts no status for a pod before admission. A pod it refuses gets phase
    Failed (rejectPod). One it admits gets, from its first syncPod and before any container
    starts, the status generateAPIPodStatus makes: conditions Initialized, Ready and
    ContainersReady, and the status manager stamps startTime on the first status it posts.
    So either of those (or a phase past Pending) means the admission is over."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Running", "Succeeded", "Failed") or status.get("startTime"):
        return True
    return any(c.get("type") in _KUBELET_CONDITIONS for c in status.get("conditions") or [])


def pod_name(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


class NodeDrain:
    """Withholds device-plugin resources of one node from the scheduler, down to a quantity each
    (0 for a stop); see the module docstring. It is the supervisor's `Withholder`."""

    def __init__(
        self,
        api: KubeAPI,
        node_name: str,
        poll_s: float = POLL_S,
        settle_s: float = SETTLE_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._api = api
        self._node = node_name
        self._poll_s = poll_s
        self._settle_s = settle_s
        self._timeout_s = timeout_s

    def withhold(self, quantities: Mapping[str, int], timeout_s: float | None = None) -> DrainResult:
        """Sets allocatable of each resource to its quantity, waits at most timeout_s (default: the
        constructor's; plus one short re-patch) for the bound pods to be admitted, and returns.
        Never raises."""
        start = time.monotonic()
        wanted = dict(quantities)
        try:
            return self._withhold(wanted, start, start + (self._timeout_s if timeout_s is None else timeout_s))
        except Exception as error:  # a bug here must not keep the daemon from stopping
            logging.warning("withholding %s failed: %s: %s", _show(wanted), type(error).__name__, error)
            return DrainResult(False, seconds=time.monotonic() - start, skipped=f"{type(error).__name__}: {error}")

    def seal(self, quantities: Mapping[str, int], timeout_s: float = REPATCH_TIMEOUT_S) -> bool:
        """Re-applies the patch once, after the plugin stopped serving the higher count (its
        stream ended, or it published the lower count): the kubelet then agrees, so it holds.
        Only while no successor is registered yet. Returns whether it was applied; never raises."""
        try:
            self._api.patch_node_status(self._node, _body(quantities), timeout_s=timeout_s)
            return True
        except Exception as error:  # as in withhold(): never in the way of stopping
            logging.warning("sealing %s on node %s: %s", _show(quantities), self._node, error)
            return False

    def _withhold(self, quantities: dict[str, int], start: float, deadline: float) -> DrainResult:
        if not quantities:
            return DrainResult(False, skipped="no resources")
        names = ", ".join(quantities)
        resources = tuple(quantities)
        body = _body(quantities)
        try:
            node = self._api.patch_node_status(self._node, body, timeout_s=_remaining(deadline))
        except KubeAPIError as error:
            why = _why(error, "patch on nodes/status")
            logging.warning("not withholding %s from the scheduler: %s", names, why)
            return DrainResult(False, seconds=time.monotonic() - start, skipped=why)
        patched_at = time.monotonic()
        logging.info("withholding from the scheduler: allocatable %s on node %s", _show(quantities), self._node)
        guard = _Guard(self._api, self._node, body, quantities, _resource_version(node))
        try:
            pods, unadmitted, problem = self._wait(resources, patched_at + self._settle_s, deadline)
        finally:
            repatches, guard_problem = guard.stop()
        result = DrainResult(
            True, tuple(pods), tuple(unadmitted), repatches, time.monotonic() - start, problem or guard_problem
        )
        logging.info(
            "withheld %s for %.1fs: waited for %d bound pod(s)%s, re-applied %d time(s)",
            names,
            result.seconds,
            len(pods),
            f", {len(unadmitted)} still not admitted ({', '.join(unadmitted[:5])})" if unadmitted else "",
            repatches,
        )
        return result

    def _wait(
        self, resources: tuple[str, ...], not_before: float, deadline: float
    ) -> tuple[list[str], list[str], str | None]:
        """Polls the pods bound to the node until none that requests a resource awaits admission
        (and the settle time is over), or the deadline."""
        seen: dict[str, None] = {}  # insertion-ordered set
        last_error = ""
        while True:
            try:
                # From the API server's cache (indexed by node): a poll several times a second from
                # each draining node must not reach etcd, and a cache a moment behind only
                # makes the wait a poll longer.
                pods = self._api.list(
                    "/api/v1/pods",
                    _LIVE_PODS.format(self._node),
                    timeout_s=_remaining(deadline, self._poll_s),
                    resource_version="0",
                )
            except KubeAPIError as error:
                if error.status == 403:
                    why = _why(error, "list on pods")
                    logging.warning("not waiting for pods bound to %s: %s", self._node, why)
                    _sleep_until(min(not_before, deadline))
                    return list(seen), [], why
                if str(error) != last_error:  # once per distinct problem, not per poll
                    logging.warning("listing the pods bound to %s: %s", self._node, error)
                    last_error = str(error)
                waiting = None
            else:
                waiting = [
                    pod_name(p)
                    for p in pods
                    if requests_any(p, resources) and not admitted(p) and not p["metadata"].get("deletionTimestamp")
                ]
                seen.update(dict.fromkeys(waiting))
            now = time.monotonic()
            if waiting == [] and now >= not_before:
                return list(seen), [], None
            if now >= deadline:
                return list(seen), waiting or [], None if waiting is not None else f"listing pods: {last_error}"
            time.sleep(max(0.0, min(self._poll_s, deadline - now)))


class _Guard:
    """Watches the node from a thread and re-applies the patch whenever the kubelet writes a
    resource's count back (a value above the quantity withheld), until stop(), which returns
    only once no patch can follow."""

    def __init__(
        self, api: KubeAPI, node: str, body: Mapping[str, Any], quantities: Mapping[str, int], version: str | None
    ) -> None:
        self._api = api
        self._node = node
        self._body = body
        self._quantities = quantities
        self._version = version
        self._lock = threading.Lock()  # held by a re-patch; stop() takes it to know none follows
        self._stopped = threading.Event()
        self._watch: Any = None
        self._repatches = 0
        self._problem: str | None = None
        self._thread = threading.Thread(target=self._run, name="drain-guard", daemon=True)
        self._thread.start()

    def stop(self) -> tuple[int, str | None]:
        with self._lock:
            self._stopped.set()
            watch = self._watch
        if watch is not None:
            watch.close()
        self._thread.join(timeout=REPATCH_TIMEOUT_S)
        return self._repatches, self._problem

    def _run(self) -> None:
        last_error = ""
        while not self._stopped.is_set():
            try:
                self._watch_once()
            except KubeAPIError as error:
                if self._stopped.is_set():
                    return
                if error.status == 410:  # too old: watch again from the current state
                    self._version = None
                    continue
                if error.status == 403:
                    self._problem = _why(error, "watch on nodes")
                    logging.warning("re-applying the patch every %.0fs: %s", BLIND_REPATCH_S, self._problem)
                    self._blind()
                    return
                if str(error) != last_error:
                    logging.warning("watching node %s: %s", self._node, error)
                    last_error = str(error)
                self._stopped.wait(_RETRY_S)

    def _watch_once(self) -> None:
        watch = self._api.watch("/api/v1/nodes", f"metadata.name={self._node}", self._version, WATCH_S)
        with self._lock:
            if self._stopped.is_set():
                watch.close()
                return
            self._watch = watch
        for event in watch:
            self._version = _resource_version(event.object) or self._version
            if event.type in ("ADDED", "MODIFIED"):
                allocatable = (event.object.get("status") or {}).get("allocatable") or {}
                # A resource missing from allocatable was dropped by the kubelet, and one below the
                # quantity has lost devices: nothing to withhold.
                back = {
                    r: allocatable[r]
                    for r, q in self._quantities.items()
                    if r in allocatable and _above(allocatable[r], q)
                }
                if back:
                    self._repatch(back)

    def _blind(self) -> None:
        while not self._stopped.wait(BLIND_REPATCH_S):
            self._repatch({})

    def _repatch(self, back: Mapping[str, str]) -> None:
        """Withholds again the resources written back (all of them, blind): not the others, which
        may have dropped below their quantity meanwhile."""
        with self._lock:
            if self._stopped.is_set():
                return
            if back:
                logging.info(
                    "node %s: allocatable written back (%s); withholding again",
                    self._node,
                    ", ".join(f"{r}={q}" for r, q in back.items()),
                )
            try:
                body = _body({r: self._quantities[r] for r in back}) if back else self._body
                self._api.patch_node_status(self._node, body, timeout_s=REPATCH_TIMEOUT_S)
                self._repatches += 1 if back else 0
            except KubeAPIError as error:
                logging.warning("re-applying the patch on node %s: %s", self._node, error)


def _why(error: KubeAPIError, permission: str) -> str:
    if error.status == 403:
        return f"{error} (the ServiceAccount needs RBAC {permission})"
    if error.status is None:
        return f"API server unreachable: {error}"
    return str(error)


def _body(quantities: Mapping[str, int]) -> dict[str, Any]:
    return {"status": {"allocatable": {r: str(q) for r, q in quantities.items()}}}


def _show(quantities: Mapping[str, int]) -> str:
    return ", ".join(f"{r}={q}" for r, q in quantities.items())


def _above(quantity: object, limit: int) -> bool:
    """Whether an allocatable quantity from the API exceeds `limit`. A device count is a plain
    integer there; anything else (never seen) counts as above unless it reads as the limit."""
    text = str(quantity).strip()
    try:
        return int(text) > limit
    except ValueError:
        return text != str(limit) and not (limit == 0 and _is_zero(text))


def _is_zero(quantity: object) -> bool:
    # The API server writes a zero quantity as "0" whatever its unit.
    return str(quantity).strip() in ("0", "")


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


def _remaining(deadline: float, minimum: float = 0.1) -> float:
    """A request's timeout: what is left of the deadline, within bounds."""
    return max(minimum, min(REQUEST_TIMEOUT_S, deadline - time.monotonic()))


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))
