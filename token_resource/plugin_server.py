"""One plugin socket and the gRPC server behind it.

A `PluginServer` claims its socket file (a stale one left by a dead process is removed, a live
one is never taken over), serves the DevicePlugin and Handoff services on it (and the plugin
watcher's Registration service, in that mode), and when stopped
removes the socket only if the path still names the file it created: never the kubelet's, and
never a newer instance's.
"""

import concurrent.futures
import contextlib
import os
import socket
import stat
from typing import TYPE_CHECKING

import grpc
from absl import logging

from token_resource.device_plugin import MAX_STREAMS, DevicePluginServicer
from token_resource.handoff import MAX_WATCHES, HandoffService
from token_resource.kubelet import staging_name

if TYPE_CHECKING:  # the runner imports it only in plugin-watcher mode
    from token_resource.plugin_watcher import RegistrationService

# Each stream pins a worker: the kubelet's ListAndWatch streams (capped at MAX_STREAMS) and an
# older instance's Handoff.Watch (capped at MAX_WATCHES). The rest are for the unary calls, which
# the kubelet makes one at a time and without a deadline: they must never queue behind streams.
# 4 free workers serve 16 concurrent Allocate callers as fast as 12 did (bench/threads_vs_asyncio.py).
SERVER_THREADS = MAX_STREAMS + MAX_WATCHES + 4
# Clients (benchmarks, fuzzers) may send large requests; the kubelet's own are small.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024


class CannotServeError(Exception):
    """The plugin cannot serve (now); the message says why and what to do."""


def inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def is_live(path: str) -> bool:
    """Whether a process accepts connections on the unix socket `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:  # refused (stale), missing, or not a socket
        return False
    finally:
        probe.close()
    return True


def remove_if_stale(path: str) -> bool:
    """Removes the socket `path` if no process serves on it; True if it was removed."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode) or is_live(path):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


class PluginServer:
    def __init__(
        self,
        path: str,
        servicer: DevicePluginServicer,
        handoff: HandoffService,
        registration: "RegistrationService | None" = None,
    ) -> None:
        self.path = path
        self.servicer = servicer
        self.handoff = handoff
        directory = os.path.dirname(path)
        _check_directory(directory)
        _claim_socket(path)
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)],
        )
        servicer.add_to_server(self._server)
        handoff.add_to_server(self._server)
        if registration is not None:
            registration.add_to_server(self._server)
        staging = os.path.join(directory, staging_name(os.path.basename(path)))
        try:
            self._server.add_insecure_port(f"unix:{staging}")
            self._server.start()
            os.rename(staging, path)
        except (RuntimeError, OSError):
            self._server.stop(grace=None)
            _check_directory(directory)  # it may have gone meanwhile: say so rather than guess
            raise CannotServeError(f"cannot create the socket {path}: is {directory} writable?") from None
        # None if the kubelet deleted the socket at once (it was starting): the owner serves again.
        self.inode = inode(path)

    def owns_socket(self) -> bool:
        return self.inode is not None and inode(self.path) == self.inode

    def stop(self) -> None:
        """Ends the streams (the kubelet sees an error, never a stream that ended OK), stops
        serving and removes the socket if it is still ours."""
        self.servicer.close()
        self._server.stop(grace=None)
        if self.owns_socket():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _check_directory(directory: str) -> None:
    if not os.path.isdir(directory):
        raise CannotServeError(
            f"the directory {directory} does not exist (is the kubelet's directory mounted? "
            "see --plugin_dir and --plugins_registry_dir)"
        )


def _claim_socket(path: str) -> None:
    """Removes a stale socket left by a crashed run; refuses to take over a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise CannotServeError(f"{path} exists and is not a socket; remove it or choose another --socket")
    if remove_if_stale(path):
        logging.info("removed stale socket %s left by an earlier run", path)
        return
    raise CannotServeError(
        f"another process is serving on {path}; waiting for it to stop (or give this one another --socket)"
    )
