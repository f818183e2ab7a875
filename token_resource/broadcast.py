"""A value that server-streaming calls send at first and again at each change.

ListAndWatch (the device list) and Handoff.Watch (whether this instance is registered) are both
this. Each open stream pins a gRPC server thread, so at most `limit` stay open: one more retires
the oldest, which ends with ABORTED at its next wake-up. That cap is what keeps a flood of
streams from leaving the unary calls without a thread (plugin_server.SERVER_THREADS).
"""

import functools
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

import grpc

T = TypeVar("T")


class Broadcast(Generic[T]):
    def __init__(self, value: T, limit: int, what: str) -> None:
        self._changed = threading.Condition()
        self._value = value
        self._generation = 0
        self._limit = limit
        self._what = what
        self._streams: list[int] = []  # ids of the open streams, oldest first
        self._next_stream = 0

    def publish(self, value: T) -> None:
        """Makes `value` the one every stream sends, unless it equals the one in force."""
        with self._changed:
            if value == self._value:
                return
            self._value = value
            self._generation += 1
            self._changed.notify_all()

    def __len__(self) -> int:
        with self._changed:
            return len(self._streams)

    def open(self, context: grpc.ServicerContext) -> int | None:
        """Admits a stream for the call `context`; None if the call has ended already."""
        if not context.add_callback(self._wake):
            return None
        with self._changed:
            stream = self._next_stream
            self._next_stream += 1
            self._streams.append(stream)
            if len(self._streams) > self._limit:
                self._streams.pop(0)
                self._changed.notify_all()
        return stream

    def values(self, stream: int, context: grpc.ServicerContext) -> Iterator[T]:
        """The value now, then each new one, until the call ends (the server's stop cancels it:
        a stream never ends OK by itself)."""
        try:
            sent = -1
            while True:
                with self._changed:
                    self._changed.wait_for(functools.partial(self._news_for, stream, context, sent))
                    if stream not in self._streams:
                        context.abort(grpc.StatusCode.ABORTED, f"superseded by a newer {self._what}")
                    if not context.is_active():
                        return
                    sent, value = self._generation, self._value
                yield value
        finally:
            with self._changed:
                if stream in self._streams:
                    self._streams.remove(stream)

    def _news_for(self, stream: int, context: grpc.ServicerContext, sent: int) -> bool:
        """Whether stream `stream`, which last sent generation `sent`, has something to do."""
        return stream not in self._streams or not context.is_active() or self._generation != sent

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()
