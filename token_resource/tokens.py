"""The token policy: N interchangeable, always-healthy tokens of one extended resource.

Token IDs are item-0 ... item-<N-1>, the same IDs as the original Go plugin, so they stay valid
in the kubelet's checkpoint across restarts and across a swap of the binary. Everything here is
pure; the kubelet-facing machinery (device_plugin, lifecycle) calls it through policy.DevicePolicy.
"""

import collections
import re
from collections.abc import Collection, Sequence

from deviceplugin.v1beta1 import api_pb2
from token_resource.policy import AllocationError

HEALTHY = "Healthy"
ID_PREFIX = "item-"
# The kubelet's gRPC client refuses any message above gRPC-Go's default receive limit.
KUBELET_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

OPTIONS = api_pb2.DevicePluginOptions(
    pre_start_required=False,  # nothing to prepare per container; saves the kubelet an RPC
    get_preferred_allocation_available=True,
)


def token_id(index: int) -> str:
    return f"{ID_PREFIX}{index}"


def token_index(token: str) -> int | None:
    """The index of a well-formed token ID (no sign, no leading zero), else None."""
    digits = token[len(ID_PREFIX) :] if token.startswith(ID_PREFIX) else ""
    if digits == "0" or re.fullmatch(r"[1-9][0-9]*", digits):
        return int(digits)
    return None


def _quote(token: str, limit: int = 64) -> str:
    """A token ID for a message: quoted, and cut short (a status message must stay small)."""
    return '"' + (token if len(token) <= limit else token[:limit] + "...") + '"'


def _order(token: str) -> int:
    """Sort key for IDs already checked to be well formed."""
    return token_index(token) or 0


def snapshot(count: int) -> api_pb2.ListAndWatchResponse:
    return api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(ID=token_id(i), health=HEALTHY) for i in range(count)])


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def snapshot_bytes(count: int) -> int:
    """Encoded size of snapshot(count), computed without building it.

    Each device is field 1 of the response holding a Device with ID (field 1) and health
    (field 2): tag + length + body for each.
    """
    total = 0
    digits, first = 1, 0
    while first < count:
        last = min(count, 10**digits)  # IDs first..last-1 have `digits` digits
        id_len = len(ID_PREFIX) + digits
        device = (1 + _varint_size(id_len) + id_len) + (1 + 1 + len(HEALTHY))
        total += (last - first) * (1 + _varint_size(device) + device)
        first, digits = last, digits + 1
    return total


def max_count(limit: int = KUBELET_MAX_MESSAGE_BYTES) -> int:
    """The largest count whose snapshot the kubelet can receive."""
    low, high = 0, limit  # every device takes more than one byte
    while low < high:
        middle = (low + high + 1) // 2
        if snapshot_bytes(middle) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def env_name(resource: str) -> str:
    """The environment variable that lists a container's tokens: example.com/token ->
    EXAMPLE_COM_TOKEN (letters, digits and underscores; never starting with a digit)."""
    name = re.sub(r"[^A-Z0-9]", "_", resource.upper())
    return "_" + name if name[0].isdigit() else name


class TokenPolicy:
    """Serves `count` tokens of `resource`; immutable, so one value is always (count, snapshot).

    A count change is a new policy from reconfigured(). Tokens that stay keep their IDs, and a
    smaller count drops the highest IDs first. The kubelet may still pick a dropped ID until it
    has read the new snapshot, and refusing it would fail that pod's admission, so a policy keeps
    accepting the IDs of the snapshot it replaced (`accepted`); GetPreferredAllocation never
    suggests them.
    """

    def __init__(self, resource: str, count: int, accepted: int | None = None) -> None:
        self._resource = resource
        self.count = count
        self.accepted = max(count, accepted or 0)
        # Built once per policy: at the largest counts a snapshot takes ~0.4 s to build.
        self._snapshot = snapshot(count)

    @property
    def resource(self) -> str:
        return self._resource

    def reconfigured(self, count: int) -> "TokenPolicy":
        """The policy for a new count, still accepting this one's IDs (see the class doc)."""
        return TokenPolicy(self._resource, count, accepted=self.count)

    def options(self) -> api_pb2.DevicePluginOptions:
        return OPTIONS

    def devices(self) -> api_pb2.ListAndWatchResponse:
        return self._snapshot

    def _check_ids(self, ids: Collection[str], what: str, below: int) -> None:
        for token in ids:
            if not self._has(token, below):
                raise AllocationError(
                    f"{what}: unknown token ID {_quote(token)} for {self.resource}: this node has "
                    f"{token_id(0)} to {token_id(self.accepted - 1)}"
                )

    def allocate(self, ids: Sequence[str]) -> api_pb2.ContainerAllocateResponse:
        """Tells the container which tokens it holds. Stateless, hence idempotent: the kubelet
        never says when tokens are freed, and may repeat an Allocate for the same IDs."""
        if not ids:
            raise AllocationError(f"Allocate: a container request for {self.resource} has no token IDs")
        if len(set(ids)) != len(ids):
            duplicates = sorted(token for token, seen in collections.Counter(ids).items() if seen > 1)
            shown = ", ".join(_quote(token) for token in duplicates[:3])
            more = f" and {len(duplicates) - 3} more" if len(duplicates) > 3 else ""
            raise AllocationError(f"Allocate: duplicate token IDs {shown}{more}")
        self._check_ids(ids, "Allocate", self.accepted)
        held = ",".join(sorted(ids, key=_order))
        return api_pb2.ContainerAllocateResponse(
            envs={env_name(self.resource): held},
            annotations={self.resource: held},
        )

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        """Packs: the must-include tokens, then the lowest-numbered available ones, `size` in all.

        The answer is advice the kubelet intersects with its own free set, while a refusal
        would fail the pod's admission. So IDs this node does not have (a count just lowered,
        say) are skipped, and an impossible size gets as close as the offer allows.
        """
        chosen = [token for token in dict.fromkeys(must_include) if self._has(token, self.count)]
        rest = sorted({token for token in available if self._has(token, self.count)} - set(chosen), key=_order)
        return chosen + rest[: max(0, size - len(chosen))]

    @staticmethod
    def _has(token: str, below: int) -> bool:
        index = token_index(token)
        return index is not None and index < below
