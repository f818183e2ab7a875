"""Registration through the kubelet's plugin watcher (`plugins_registry`), instead of Register
on kubelet.sock.

The plugin serves `pluginregistration.Registration` on a socket in the registry directory; the
kubelet finds it there (also after its own restart, since it never wipes that directory), asks
GetInfo (1 s deadline), dials the DevicePlugin endpoint (empty: this same socket), calls
GetDevicePluginOptions, opens ListAndWatch, and says how it went with
NotifyRegistrationStatus. A failure after GetInfo is not retried by the kubelet (the plugin
counts as registered, kubernetes#127457): the runner re-creates the socket to be found again.
"""

from typing import Protocol

import grpc

from pluginregistration.v1 import api_pb2, api_pb2_grpc
from token_resource.kubelet import API_VERSION

PLUGIN_TYPE = "DevicePlugin"


class RegistrationListener(Protocol):
    def info_requested(self) -> None: ...

    def registration_status(self, registered: bool, error: str) -> None: ...


class RegistrationService(api_pb2_grpc.RegistrationServicer):
    def __init__(self, resource: str, listener: RegistrationListener) -> None:
        self._resource = resource
        self._listener = listener

    def add_to_server(self, server: grpc.Server) -> None:
        api_pb2_grpc.add_RegistrationServicer_to_server(self, server)

    def GetInfo(self, request: api_pb2.InfoRequest, context: grpc.ServicerContext) -> api_pb2.PluginInfo:
        self._listener.info_requested()
        # An empty endpoint: this socket serves the DevicePlugin service too, so the path the
        # kubelet dials is the one it found, valid in its own mount namespace.
        return api_pb2.PluginInfo(type=PLUGIN_TYPE, name=self._resource, endpoint="", supported_versions=[API_VERSION])

    def NotifyRegistrationStatus(
        self, request: api_pb2.RegistrationStatus, context: grpc.ServicerContext
    ) -> api_pb2.RegistrationStatusResponse:
        self._listener.registration_status(request.plugin_registered, request.error)
        return api_pb2.RegistrationStatusResponse()
