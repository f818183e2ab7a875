"""The other instances of the same resource on this node, seen through their sockets.

With per-instance sockets (kubelet.Endpoint.per_instance) every process of the plugin serves
`<stem>.<instance>.sock`, so the directory itself lists the instances. An instance follows the
newest live one newer than itself (its Handoff.Watch, handoff.SuccessorWatch); the newest
removes the sockets of dead older ones, only after a probe shows nobody serves there.
"""

import os
from collections.abc import Callable

from absl import logging

from token_resource.handoff import SuccessorWatch
from token_resource.kubelet import Endpoint
from token_resource.plugin_server import is_live, remove_if_stale


class Siblings:
    def __init__(
        self,
        endpoint: Endpoint,
        instance: int,
        on_state: Callable[[int, bool], None],
        on_gone: Callable[[int], None],
    ) -> None:
        self._endpoint = endpoint
        self._instance = instance
        self._on_state = on_state
        self._on_gone = on_gone
        self.successor: SuccessorWatch | None = None  # the newer instance followed
        self.successor_registered = False  # as it last said

    def follows(self, instance: int) -> bool:
        return self.successor is not None and self.successor.instance == instance

    def follow_newest(self) -> None:
        """Follows the newest live instance newer than this one, if any."""
        for instance, path in self._listed():
            if instance <= self._instance:
                break
            if self.successor is not None and self.successor.instance >= instance:
                return
            if is_live(path):
                self.unfollow()
                logging.info("%s: a newer instance serves on %s; following its registration", self._resource, path)
                self.successor = SuccessorWatch(path, self._resource, instance, self._on_state, self._on_gone)
                return

    def unfollow(self) -> None:
        if self.successor is not None:
            self.successor.close()
            self.successor = None
        self.successor_registered = False

    def remove_dead(self) -> None:
        """Sockets of instances that died without cleaning up (SIGKILL): the newest instance
        removes them."""
        for instance, path in self._listed():
            if instance > self._instance:
                return
            if remove_if_stale(path):
                logging.info("%s: removed the socket of a dead instance: %s", self._resource, path)

    @property
    def _resource(self) -> str:
        return self._endpoint.resource

    def _listed(self) -> list[tuple[int, str]]:
        """(instance, path) of every other instance's socket for this resource, newest first."""
        try:
            names = os.listdir(self._endpoint.plugin_dir)
        except OSError:
            return []
        found = []
        for name in names:
            instance = self._endpoint.instance_of(name)
            if instance is not None and instance != self._instance:
                found.append((instance, os.path.join(self._endpoint.plugin_dir, name)))
        return sorted(found, reverse=True)
