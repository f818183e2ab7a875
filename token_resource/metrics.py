"""The daemon's Prometheus metrics, in a registry of its own (served on /metrics).

Counters are labelled by resource; the machinery that sees an event counts it.
"""

import contextlib

import prometheus_client as prom

REGISTRY = prom.CollectorRegistry()

TOKENS = prom.Gauge("token_resource_tokens", "Tokens advertised to the kubelet.", ["resource"], registry=REGISTRY)
REGISTERED = prom.Gauge(
    "token_resource_registered",
    "1 while the resource is registered and the kubelet holds a ListAndWatch stream.",
    ["resource"],
    registry=REGISTRY,
)
REGISTRATIONS = prom.Counter(
    "token_resource_registrations", "Successful Register calls to the kubelet.", ["resource"], registry=REGISTRY
)
REGISTRATION_FAILURES = prom.Counter(
    "token_resource_registration_failures", "Failed Register calls to the kubelet.", ["resource"], registry=REGISTRY
)
KUBELET_RESTARTS = prom.Counter(
    "token_resource_kubelet_restarts",
    "Kubelet starts seen: the kubelet deleted the plugin's socket (it does so at every start).",
    ["resource"],
    registry=REGISTRY,
)
CALLS = prom.Counter(
    "token_resource_calls", "DevicePlugin calls from the kubelet, by method.", ["resource", "method"], registry=REGISTRY
)
CALL_ERRORS = prom.Counter(
    "token_resource_call_errors", "DevicePlugin calls refused, by method.", ["resource", "method"], registry=REGISTRY
)
CONFIG_RELOADS = prom.Counter(
    "token_resource_config_reloads", "Configuration reloads, by result (ok or failed).", ["result"], registry=REGISTRY
)
CONFIG_GENERATION = prom.Gauge(
    "token_resource_config_generation", "Generation of the configuration in force (1 at start).", registry=REGISTRY
)
CONFIG_LAST_RELOAD_OK = prom.Gauge(
    "token_resource_config_last_reload_ok", "1 unless the latest reload was rejected.", registry=REGISTRY
)


METHODS = ("GetDevicePluginOptions", "ListAndWatch", "GetPreferredAllocation", "Allocate", "PreStartContainer")


def forget(resource: str) -> None:
    """Drops a withdrawn resource's series."""
    for metric in (TOKENS, REGISTERED, REGISTRATIONS, REGISTRATION_FAILURES, KUBELET_RESTARTS):
        with contextlib.suppress(KeyError):  # never set for this resource
            metric.remove(resource)
    for calls in (CALLS, CALL_ERRORS):
        for method in METHODS:
            with contextlib.suppress(KeyError):
                calls.remove(resource, method)
