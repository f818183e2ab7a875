import pytest

from token_resource import tokens
from token_resource.policy import AllocationError


@pytest.mark.parametrize("count", [0, 1, 9, 10, 11, 99, 100, 101, 1000, 12345])
def test_snapshot_size_formula_matches_the_encoded_message(count: int) -> None:
    assert tokens.snapshot_bytes(count) == tokens.snapshot(count).ByteSize()


def test_max_count_is_the_largest_snapshot_under_4_mib() -> None:
    limit = tokens.max_count()
    assert tokens.snapshot(limit).ByteSize() <= 4 * 1024 * 1024
    assert tokens.snapshot(limit + 1).ByteSize() > 4 * 1024 * 1024


def test_snapshot_lists_stable_healthy_ids() -> None:
    devices = tokens.snapshot(3).devices
    assert [(d.ID, d.health) for d in devices] == [("item-0", "Healthy"), ("item-1", "Healthy"), ("item-2", "Healthy")]
    assert tokens.snapshot(3) == tokens.snapshot(3)


@pytest.mark.parametrize("token,index", [("item-0", 0), ("item-7", 7), ("item-10", 10)])
def test_token_index_parses_well_formed_ids(token: str, index: int) -> None:
    assert tokens.token_index(token) == index


@pytest.mark.parametrize("token", ["item-", "item-01", "item--1", "item-+1", "token-1", "item-1 ", "", "item-٣"])
def test_token_index_rejects_malformed_ids(token: str) -> None:
    assert tokens.token_index(token) is None


@pytest.mark.parametrize(
    "resource,name",
    [("example.com/token", "EXAMPLE_COM_TOKEN"), ("k8s.io/GPU_mem.v2", "K8S_IO_GPU_MEM_V2"), ("1x.io/y", "_1X_IO_Y")],
)
def test_env_name_derives_from_the_resource_name(resource: str, name: str) -> None:
    assert tokens.env_name(resource) == name


def test_allocate_tells_the_container_its_tokens() -> None:
    policy = tokens.TokenPolicy("example.com/token", 4)
    response = policy.allocate(["item-3", "item-1"])
    assert dict(response.envs) == {"EXAMPLE_COM_TOKEN": "item-1,item-3"}
    assert dict(response.annotations) == {"example.com/token": "item-1,item-3"}
    assert policy.allocate(["item-3", "item-1"]) == response  # idempotent


@pytest.mark.parametrize(
    "ids,message",
    [
        (["item-4"], 'unknown token ID "item-4"'),
        (["gpu-0"], 'unknown token ID "gpu-0"'),
        ([], "no token IDs"),
        (["item-1", "item-1"], 'duplicate token IDs "item-1"'),
    ],
)
def test_allocate_refuses_bad_ids_with_a_clear_message(ids: list[str], message: str) -> None:
    with pytest.raises(AllocationError, match=message):
        tokens.TokenPolicy("example.com/token", 4).allocate(ids)


def test_preferred_packs_lowest_ids_after_must_include() -> None:
    policy = tokens.TokenPolicy("example.com/token", 12)
    assert policy.preferred(["item-10", "item-2", "item-11", "item-9"], [], 2) == ["item-2", "item-9"]
    assert policy.preferred(["item-10", "item-2", "item-11"], ["item-11"], 2) == ["item-11", "item-2"]


def test_preferred_returns_everything_when_all_are_needed() -> None:
    policy = tokens.TokenPolicy("example.com/token", 3)
    assert sorted(policy.preferred(["item-2", "item-0", "item-1"], [], 3)) == ["item-0", "item-1", "item-2"]


def test_preferred_reserves_nothing() -> None:
    policy = tokens.TokenPolicy("example.com/token", 3)
    first = policy.preferred(["item-0", "item-1", "item-2"], [], 1)
    assert policy.preferred(["item-0", "item-1", "item-2"], [], 1) == first


@pytest.mark.parametrize(
    "available,must,size,answer",
    [
        (["item-0"], [], 2, ["item-0"]),  # fewer offered than asked: all of them
        (["item-0", "item-1"], ["item-1", "item-0"], 1, ["item-1", "item-0"]),  # must-include wins
        (["item-9", "item-2", "bogus", "item-1"], [], 2, ["item-1", "item-2"]),  # unknown IDs skipped
        (["item-0"], ["item-7"], 1, ["item-0"]),
        (["item-0"], [], -1, []),
    ],
)
def test_preferred_never_refuses_it_advises(
    available: list[str], must: list[str], size: int, answer: list[str]
) -> None:
    assert tokens.TokenPolicy("example.com/token", 3).preferred(available, must, size) == answer


def test_a_lowered_count_still_accepts_the_dropped_ids_but_never_suggests_them() -> None:
    # The kubelet may pick a dropped ID until it has read the new snapshot; refusing it would
    # fail that pod's admission.
    before = tokens.TokenPolicy("example.com/token", 3)
    after = before.reconfigured(1)
    assert (after.resource, after.count) == ("example.com/token", 1)
    assert [d.ID for d in after.devices().devices] == ["item-0"]
    assert dict(after.allocate(["item-2"]).envs) == {"EXAMPLE_COM_TOKEN": "item-2"}
    assert after.preferred(["item-2", "item-1", "item-0"], [], 2) == ["item-0"]
    assert after.preferred(["item-2", "item-1"], ["item-2"], 1) == []
    with pytest.raises(AllocationError) as raised:
        after.allocate(["item-3"])
    assert str(raised.value) == (
        'Allocate: unknown token ID "item-3" for example.com/token: this node has item-0 to item-2'
    )
    assert before.count == 3 and before.allocate(["item-2"])  # the policy in force is never changed


def test_only_the_count_just_replaced_stays_accepted() -> None:
    policy = tokens.TokenPolicy("example.com/token", 3).reconfigured(1).reconfigured(2)
    assert policy.allocate(["item-1"])
    with pytest.raises(AllocationError, match='unknown token ID "item-2"'):
        policy.allocate(["item-2"])


def test_a_raised_count_accepts_and_suggests_the_new_ids() -> None:
    policy = tokens.TokenPolicy("example.com/token", 1).reconfigured(3)
    assert policy.allocate(["item-2"])
    assert policy.preferred(["item-2", "item-1"], [], 2) == ["item-1", "item-2"]
