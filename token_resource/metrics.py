"""The daemon's Prometheus metrics, in a registry of its own (served on /metrics).

Counters are labelled by resource; the machinery that sees an event counts it. Only a process
that serves /metrics (--http_port) calls enable(): until then every metric is a stand-in that
records nothing, and prometheus_client (with the HTTP, URL and WSGI modules it imports, ~2 MB
and ~25 ms of start-up) is never loaded. Read the metrics through this module's attributes at
the time of use (`metrics.CALLS.labels(...)`), never by importing them by name.
"""

import contextlib
from typing import Any


class _Unserved:
    """A metric nobody can read: takes every update and keeps nothing."""

    def labels(self, *values: str) -> "_Unserved":
        return self

    def inc(self, amount: float = 1.0) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def remove(self, *values: str) -> None:
        pass


_UNSERVED: Any = _Unserved()

REGISTRY: Any = None  # a prometheus_client.CollectorRegistry once enabled
TOKENS: Any = _UNSERVED
REGISTERED: Any = _UNSERVED
REGISTRATIONS: Any = _UNSERVED
REGISTRATION_FAILURES: Any = _UNSERVED
KUBELET_RESTARTS: Any = _UNSERVED
CALLS: Any = _UNSERVED
CALL_ERRORS: Any = _UNSERVED
CONFIG_RELOADS: Any = _UNSERVED
CONFIG_GENERATION: Any = _UNSERVED
CONFIG_LAST_RELOAD_OK: Any = _UNSERVED

METHODS = ("GetDevicePluginOptions", "ListAndWatch", "GetPreferredAllocation", "Allocate", "PreStartContainer")


def enable() -> Any:
    """Creates the metrics (once) and returns their registry. Call before anything is counted:
    updates made to the stand-ins are lost."""
    global REGISTRY, TOKENS, REGISTERED, REGISTRATIONS, REGISTRATION_FAILURES, KUBELET_RESTARTS
    global CALLS, CALL_ERRORS, CONFIG_RELOADS, CONFIG_GENERATION, CONFIG_LAST_RELOAD_OK
    if REGISTRY is not None:
        return REGISTRY
    import prometheus_client as prom

    registry = prom.CollectorRegistry()
    TOKENS = prom.Gauge("token_resource_tokens", "Tokens advertised to the kubelet.", ["resource"], registry=registry)
    REGISTERED = prom.Gauge(
        "token_resource_registered",
        "1 while the resource is registered and the kubelet holds a ListAndWatch stream.",
        ["resource"],
        registry=registry,
    )
    REGISTRATIONS = prom.Counter(
        "token_resource_registrations", "Successful Register calls to the kubelet.", ["resource"], registry=registry
    )
    REGISTRATION_FAILURES = prom.Counter(
        "token_resource_registration_failures", "Failed Register calls to the kubelet.", ["resource"], registry=registry
    )
    KUBELET_RESTARTS = prom.Counter(
        "token_resource_kubelet_restarts",
        "Kubelet starts seen: the kubelet deleted the plugin's socket (it does so at every start).",
        ["resource"],
        registry=registry,
    )
    CALLS = prom.Counter(
        "token_resource_calls",
        "DevicePlugin calls from the kubelet, by method.",
        ["resource", "method"],
        registry=registry,
    )
    CALL_ERRORS = prom.Counter(
        "token_resource_call_errors",
        "DevicePlugin calls refused, by method.",
        ["resource", "method"],
        registry=registry,
    )
    CONFIG_RELOADS = prom.Counter(
        "token_resource_config_reloads",
        "Configuration reloads, by result (ok or failed).",
        ["result"],
        registry=registry,
    )
    CONFIG_GENERATION = prom.Gauge(
        "token_resource_config_generation", "Generation of the configuration in force (1 at start).", registry=registry
    )
    CONFIG_LAST_RELOAD_OK = prom.Gauge(
        "token_resource_config_last_reload_ok", "1 unless the latest reload was rejected.", registry=registry
    )
    REGISTRY = registry
    return registry


def forget(resource: str) -> None:
    """Drops a withdrawn resource's series."""
    for metric in (TOKENS, REGISTERED, REGISTRATIONS, REGISTRATION_FAILURES, KUBELET_RESTARTS):
        with contextlib.suppress(KeyError):  # never set for this resource
            metric.remove(resource)
    for calls in (CALLS, CALL_ERRORS):
        for method in METHODS:
            with contextlib.suppress(KeyError):
                calls.remove(resource, method)
