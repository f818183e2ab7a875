"""What a device plugin serves, as the kubelet-facing machinery sees it.

`device_plugin` and `lifecycle` drive any `DevicePolicy`; `tokens` is one. A policy is an
immutable value: a change (a new count, say) is a new policy that the runner owning the
resource swaps in as a whole, so a gRPC thread never sees half of a change.
"""

from collections.abc import Sequence
from typing import Protocol

from deviceplugin.v1beta1 import api_pb2


class AllocationError(Exception):
    """A request the policy refuses; answered with INVALID_ARGUMENT and this message."""


class DevicePolicy(Protocol):
    @property
    def resource(self) -> str: ...

    def options(self) -> api_pb2.DevicePluginOptions: ...

    def devices(self) -> api_pb2.ListAndWatchResponse: ...

    def allocate(self, ids: Sequence[str]) -> api_pb2.ContainerAllocateResponse: ...

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]: ...
