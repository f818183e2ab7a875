"""Directory events from inotify, delivered on a thread of their own.

The kubelet's device-plugin directory and a mounted configuration directory are both watched
this way: no polling, and a watch that ends at once when closed.
"""

import os
import select
import threading
from collections.abc import Callable

import inotify_simple

flags = inotify_simple.flags


class DirectoryEvents:
    """Calls on_event(name, mask) for each inotify event on `directory` until close()."""

    def __init__(self, directory: str, mask: int, on_event: Callable[[str, int], None], name: str) -> None:
        self._on_event = on_event
        self._inotify = inotify_simple.INotify()
        try:
            self._inotify.add_watch(directory, mask)
        except OSError:
            self._inotify.close()
            raise
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        os.write(self._wake_write, b"x")
        self._thread.join()
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)
        self._inotify.close()

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._inotify.fileno(), self._wake_read], [], [])
            if self._wake_read in ready:
                return
            for event in self._inotify.read(timeout=0):
                self._on_event(event.name, event.mask)
