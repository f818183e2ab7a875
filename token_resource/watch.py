"""Directory events from one inotify instance for the whole daemon, on one thread.

The kubelet's device-plugin directory (watched for every resource) and the configuration
directory share it: the kernel's default `max_user_instances` is 128 for all of root's
processes on a node (kubelet, runtime, other agents), so an instance per resource would run
out at a few dozen resources. Subscribers get (name, mask) for the events they asked for.
"""

import contextlib
import dataclasses
import os
import select
import threading
from collections.abc import Callable

import inotify_simple

flags = inotify_simple.flags

# Always reported by the kernel: the watched directory itself went away.
GONE = flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED


@dataclasses.dataclass(frozen=True, eq=False)
class Subscription:
    directory: str
    mask: int
    on_event: Callable[[str, int], None]


class Watcher:
    """Calls each subscription's on_event(name, mask) for its directory's events until close()."""

    def __init__(self) -> None:
        self._inotify = inotify_simple.INotify()
        self._lock = threading.Lock()
        self._watches: dict[int, list[Subscription]] = {}  # watch descriptor -> subscribers
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="inotify", daemon=True)
        self._thread.start()

    def subscribe(self, directory: str, mask: int, on_event: Callable[[str, int], None]) -> Subscription:
        """Raises OSError if the directory cannot be watched (missing, or the node's inotify
        watch limit)."""
        subscription = Subscription(directory, mask, on_event)
        with self._lock:
            wd = self._add_watch(directory, mask)
            self._watches.setdefault(wd, []).append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            for wd, subscribers in list(self._watches.items()):
                if subscription in subscribers:
                    subscribers.remove(subscription)
                    if not subscribers:
                        del self._watches[wd]
                        with contextlib.suppress(OSError):  # the kernel dropped it with the directory
                            self._inotify.rm_watch(wd)

    def close(self) -> None:
        os.write(self._wake_write, b"x")
        self._thread.join()
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)
        self._inotify.close()

    def _add_watch(self, directory: str, mask: int) -> int:
        # The kernel keeps one watch descriptor per inode; MASK_ADD widens its mask to the union
        # of the subscribers' (each subscriber is then given only the events it asked for).
        return self._inotify.add_watch(directory, mask | flags.MASK_ADD | flags.DELETE_SELF | flags.MOVE_SELF)

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._inotify.fileno(), self._wake_read], [], [])
            if self._wake_read in ready:
                return
            for event in self._inotify.read(timeout=0):
                with self._lock:
                    subscribers = list(self._watches.get(event.wd, ()))
                    if event.mask & flags.IGNORED:
                        self._watches.pop(event.wd, None)  # the kernel has removed this watch
                for subscription in subscribers:
                    if event.mask & (subscription.mask | GONE):
                        subscription.on_event(event.name, event.mask)
