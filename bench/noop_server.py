"""The baseline server: grpcio serving DevicePlugin methods that do nothing.

Same grpcio, same unix-socket transport, same thread pool as the daemon; each method decodes
its request (as any gRPC server must) and returns a canned response read at start-up, so the
messages on the wire have the daemon's sizes but no plugin code runs.

Usage: noop_server --socket=/tmp/x/noop.sock [--responses=canned.json] [--threads=16]
canned.json: {"Allocate": {"<number of IDs>": "<hex of AllocateResponse>"}, "GetPreferredAllocation": {...}}
"""

import concurrent.futures
import json
import signal
import sys
import threading
from typing import Any

import grpc
from absl import app, flags

from deviceplugin.v1beta1 import api_pb2

FLAGS = flags.FLAGS
flags.DEFINE_string("socket", None, "Unix socket path to serve on.", required=True)
flags.DEFINE_string("responses", None, "JSON file of canned responses by method and ID count.")
flags.DEFINE_integer("threads", 16, "Worker threads (the daemon uses 16).")

SERVICE = "v1beta1.DevicePlugin"


def _canned(path: str | None) -> dict[str, dict[int, bytes]]:
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return {method: {int(n): bytes.fromhex(h) for n, h in table.items()} for method, table in raw.items()}


def main(argv: list[str]) -> None:
    canned = _canned(FLAGS.responses)
    empty = api_pb2.AllocateResponse().SerializeToString()
    allocate = canned.get("Allocate", {})
    preferred = canned.get("GetPreferredAllocation", {})

    def allocate_handler(request: api_pb2.AllocateRequest, context: grpc.ServicerContext) -> bytes:
        ids = sum(len(c.devices_ids) for c in request.container_requests)
        return allocate.get(ids, empty)

    def preferred_handler(request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext) -> bytes:
        ids = sum(len(c.available_deviceIDs) for c in request.container_requests)
        return preferred.get(ids, empty)

    def options_handler(request: api_pb2.Empty, context: grpc.ServicerContext) -> bytes:
        return b""

    def identity(response: bytes) -> bytes:  # responses are already serialized
        return response

    handlers: dict[str, grpc.RpcMethodHandler[Any, bytes]] = {
        "Allocate": grpc.unary_unary_rpc_method_handler(
            allocate_handler, request_deserializer=api_pb2.AllocateRequest.FromString, response_serializer=identity
        ),
        "GetPreferredAllocation": grpc.unary_unary_rpc_method_handler(
            preferred_handler,
            request_deserializer=api_pb2.PreferredAllocationRequest.FromString,
            response_serializer=identity,
        ),
        "GetDevicePluginOptions": grpc.unary_unary_rpc_method_handler(
            options_handler, request_deserializer=api_pb2.Empty.FromString, response_serializer=identity
        ),
    }
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=FLAGS.threads),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.add_insecure_port(f"unix:{FLAGS.socket}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("serving", flush=True)
    done.wait()
    server.stop(None).wait()
    sys.exit(0)


if __name__ == "__main__":
    app.run(main)
