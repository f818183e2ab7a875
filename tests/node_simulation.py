"""The original acceptance scenario, without a cluster.

Each simulated node is a fake kubelet in its own directory with a real token-resource daemon
registered to it. A Deployment's replicas, each limited to one token, are scheduled the way
kube-scheduler does for extended resources (a node fits while allocatable minus allocated
covers the request) and admitted through the node's kubelet (GetPreferredAllocation, then
Allocate). With 2 nodes at --count=2 and 10 replicas: 4 Running, 6 Pending.

    tools/bazel run //:demo -- --nodes=3 --count=2 --replicas=10
"""

import dataclasses
import os
import shutil
import time

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # keep gRPC's own connection chatter out of the demo

from absl import app, flags

from tests.daemon import Daemon, short_tempdir
from tests.fake_kubelet import FakeKubelet, Mode, advertising

RESOURCE = "example.com/token"


@dataclasses.dataclass
class Node:
    name: str
    kubelet: FakeKubelet
    daemon: Daemon

    def free(self) -> int:
        used = sum(len(a.ids) for a in self.kubelet.allocations if a.resource == RESOURCE)
        return self.kubelet.allocatable(RESOURCE) - used


@dataclasses.dataclass(frozen=True)
class Placement:
    pod: str
    node: str | None  # None: Pending
    detail: str


def start_nodes(nodes: int, count: int) -> list[Node]:
    started = []
    for index in range(nodes):
        directory = short_tempdir(f"node{index}-")
        kubelet = FakeKubelet(directory, Mode.E2)
        kubelet.start()
        daemon = Daemon(f"--plugin_dir={directory}", f"--count={count}", f"--resource={RESOURCE}")
        started.append(Node(f"node-{index}", kubelet, daemon))
    for node in started:
        node.kubelet.wait_until(advertising(RESOURCE, count))
    return started


def stop_nodes(nodes: list[Node]) -> None:
    for node in nodes:
        node.daemon.terminate()
        node.daemon.close()
        node.kubelet.stop()
        shutil.rmtree(node.kubelet.directory, ignore_errors=True)


def schedule(nodes: list[Node], replicas: int) -> list[Placement]:
    """Places each pod on the node with the most free tokens; Pending if none has one."""
    placements = []
    for index in range(replicas):
        pod = f"token-user-{index}"
        candidates = [n for n in nodes if n.free() >= 1]
        if not candidates:
            reason = f"0/{len(nodes)} nodes are available: {len(nodes)} Insufficient {RESOURCE}."
            placements.append(Placement(pod, None, reason))
            continue
        node = max(candidates, key=lambda n: (n.free(), -nodes.index(n)))
        allocation = node.kubelet.admit(pod, "app", RESOURCE, 1)
        env = ", ".join(f"{k}={v}" for k, v in allocation.response.envs.items())
        placements.append(Placement(pod, node.name, env))
    return placements


def restart_kubelet(node: Node, count: int) -> float:
    """Restarts a node's kubelet; returns seconds until the plugin's tokens are back."""
    started = time.monotonic()
    node.kubelet.restart()
    node.kubelet.wait_until(advertising(RESOURCE, count))
    return time.monotonic() - started


FLAGS = flags.FLAGS
flags.DEFINE_integer("nodes", 2, "Simulated nodes.")
flags.DEFINE_integer("count", 2, "Tokens per node (the daemon's --count).")
flags.DEFINE_integer("replicas", 10, "Pods, each limited to example.com/token: 1.")


def main(argv: list[str]) -> None:
    print(f"Starting {FLAGS.nodes} nodes, each with a fake kubelet and token-resource --count={FLAGS.count}")
    nodes = start_nodes(FLAGS.nodes, FLAGS.count)
    try:
        for node in nodes:
            print(f"  {node.name}: allocatable {RESOURCE} = {node.kubelet.allocatable(RESOURCE)}")
        print(f"\nScheduling a Deployment of {FLAGS.replicas} replicas, each limited to {RESOURCE}: 1")
        placements = schedule(nodes, FLAGS.replicas)
        for p in placements:
            print(f"  {p.pod:<14} {'Running on ' + p.node if p.node else 'Pending':<18} {p.detail}")
        running = sum(1 for p in placements if p.node)
        print(f"\n{running} Running, {len(placements) - running} Pending")
        print(f"\nRestarting the kubelet of {nodes[0].name} (it deletes the plugin's socket)...")
        seconds = restart_kubelet(nodes[0], FLAGS.count)
        print(f"  token-resource re-registered; allocatable back to {FLAGS.count} after {seconds:.3f} s")
    finally:
        stop_nodes(nodes)


if __name__ == "__main__":
    app.run(main)
