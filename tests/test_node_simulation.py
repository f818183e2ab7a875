from tests import node_simulation


def test_two_nodes_with_two_tokens_run_four_of_ten_pods() -> None:
    nodes = node_simulation.start_nodes(nodes=2, count=2)
    try:
        placements = node_simulation.schedule(nodes, replicas=10)
        running = [p for p in placements if p.node]
        pending = [p for p in placements if not p.node]
        assert len(running) == 4 and len(pending) == 6
        assert sorted(str(p.node) for p in running) == ["node-0", "node-0", "node-1", "node-1"]
        assert all(p.detail == "0/2 nodes are available: 2 Insufficient example.com/token." for p in pending)
        held = sorted(p.detail for p in running)
        assert held == ["EXAMPLE_COM_TOKEN=item-0"] * 2 + ["EXAMPLE_COM_TOKEN=item-1"] * 2
        for node in nodes:
            assert node.kubelet.violations == []
    finally:
        node_simulation.stop_nodes(nodes)


def test_tokens_come_back_after_a_kubelet_restart() -> None:
    nodes = node_simulation.start_nodes(nodes=1, count=2)
    try:
        node_simulation.restart_kubelet(nodes[0], count=2)
        assert nodes[0].kubelet.allocatable("example.com/token") == 2
        assert len(nodes[0].kubelet.register_requests) == 2
    finally:
        node_simulation.stop_nodes(nodes)
