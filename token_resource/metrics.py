"""The daemon's Prometheus metrics, in a registry of its own (served on /metrics).

Counters are labelled by resource; the machinery that sees an event counts it. Only a process
that serves /metrics (--http_port) calls enable(): until then every metric is a stand-in that
records nothing. Read the metrics through this module's attributes at the time of use
(`metrics.CALLS.labels(...)`), never by importing them by name.

The text exposition format (0.0.4) is written here rather than by prometheus_client, whose
import (with the HTTP, URL and WSGI modules it brings, and hashlib's libcrypto) cost ~1.9 MiB
and ~20 ms of start-up for ten labelled counters and gauges (BENCHMARKS.md, "Memory and
start-up"). The output is what prometheus_client 0.2x writes for the same metrics: a counter
`x` is exposed as `x_total` samples, and the time each labelled series began as a `x_created`
gauge; label names in sorted order, values as Go formats floats.
"""

import contextlib
import math
import threading
import time

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

METHODS = ("GetDevicePluginOptions", "ListAndWatch", "GetPreferredAllocation", "Allocate", "PreStartContainer")


class _Series:
    """One labelled series: its value, and when it began (a counter's `_created`)."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()


class _Metric:
    """A metric family: series by label values, updated under one lock."""

    kind = ""

    def __init__(self, registry: "Registry", name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {} if labelnames else {(): _Series()}
        registry.metrics.append(self)

    def _get(self, values: tuple[str, ...]) -> _Series:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, not {values!r}")
        series = self._series.get(values)
        if series is None:
            with self._lock:
                series = self._series.setdefault(values, _Series())
        return series

    def _add(self, series: _Series, amount: float) -> None:
        with self._lock:
            series.value += amount

    def _set(self, series: _Series, value: float) -> None:
        with self._lock:
            series.value = float(value)

    def remove(self, *values: str) -> None:
        """Drops a series; KeyError if it never was set."""
        with self._lock:
            del self._series[tuple(values)]

    def write(self, out: list[str]) -> None:
        with self._lock:
            series = [(values, s.value, s.created) for values, s in self._series.items()]
        name = self.name + "_total" if self.kind == "counter" else self.name
        out.append(f"# HELP {name} {_escape_help(self.documentation)}\n# TYPE {name} {self.kind}\n")
        out.extend(f"{name}{self._labels(values)} {_go_float(value)}\n" for values, value, _ in series)
        if self.kind == "counter" and series:
            name = self.name + "_created"
            out.append(f"# HELP {name} {_escape_help(self.documentation)}\n# TYPE {name} gauge\n")
            out.extend(f"{name}{self._labels(values)} {_go_float(created)}\n" for values, _, created in series)

    def _labels(self, values: tuple[str, ...]) -> str:
        if not values:
            return ""
        pairs = sorted(zip(self.labelnames, values, strict=True))
        return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"


class _CounterSeries:
    __slots__ = ("_metric", "_series")

    def __init__(self, metric: _Metric, series: _Series) -> None:
        self._metric, self._series = metric, series

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self._metric.name}: a counter only goes up, not by {amount}")
        self._metric._add(self._series, amount)


class _GaugeSeries(_CounterSeries):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        self._metric._add(self._series, amount)

    def set(self, value: float) -> None:
        self._metric._set(self._series, value)


class Counter(_Metric):
    kind = "counter"

    def labels(self, *values: str) -> _CounterSeries:
        return _CounterSeries(self, self._get(values))

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


class Gauge(_Metric):
    kind = "gauge"

    def labels(self, *values: str) -> _GaugeSeries:
        return _GaugeSeries(self, self._get(values))

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def expose(self) -> bytes:
        """Every metric in the text exposition format 0.0.4 (CONTENT_TYPE)."""
        out: list[str] = []
        for metric in self.metrics:
            metric.write(out)
        return "".join(out).encode("utf-8")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _go_float(value: float) -> str:
    """A sample value as Go (and prometheus_client) writes it: 2.0, 1.7e+09, +Inf, NaN."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


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


_UNSERVED = _Unserved()

REGISTRY: Registry | None = None
TOKENS: Gauge | _Unserved = _UNSERVED
REGISTERED: Gauge | _Unserved = _UNSERVED
REGISTRATIONS: Counter | _Unserved = _UNSERVED
REGISTRATION_FAILURES: Counter | _Unserved = _UNSERVED
KUBELET_RESTARTS: Counter | _Unserved = _UNSERVED
CALLS: Counter | _Unserved = _UNSERVED
CALL_ERRORS: Counter | _Unserved = _UNSERVED
CONFIG_RELOADS: Counter | _Unserved = _UNSERVED
CONFIG_GENERATION: Gauge | _Unserved = _UNSERVED
CONFIG_LAST_RELOAD_OK: Gauge | _Unserved = _UNSERVED


def enable() -> Registry:
    """Creates the metrics (once) and returns their registry. Call before anything is counted:
    updates made to the stand-ins are lost."""
    global REGISTRY, TOKENS, REGISTERED, REGISTRATIONS, REGISTRATION_FAILURES, KUBELET_RESTARTS
    global CALLS, CALL_ERRORS, CONFIG_RELOADS, CONFIG_GENERATION, CONFIG_LAST_RELOAD_OK
    if REGISTRY is not None:
        return REGISTRY
    registry = Registry()
    resource = ("resource",)
    TOKENS = Gauge(registry, "token_resource_tokens", "Tokens advertised to the kubelet.", resource)
    REGISTERED = Gauge(
        registry,
        "token_resource_registered",
        "1 while the resource is registered and the kubelet holds a ListAndWatch stream.",
        resource,
    )
    REGISTRATIONS = Counter(
        registry, "token_resource_registrations", "Successful Register calls to the kubelet.", resource
    )
    REGISTRATION_FAILURES = Counter(
        registry, "token_resource_registration_failures", "Failed Register calls to the kubelet.", resource
    )
    KUBELET_RESTARTS = Counter(
        registry,
        "token_resource_kubelet_restarts",
        "Kubelet starts seen: the kubelet deleted the plugin's socket (it does so at every start).",
        resource,
    )
    CALLS = Counter(
        registry, "token_resource_calls", "DevicePlugin calls from the kubelet, by method.", ("resource", "method")
    )
    CALL_ERRORS = Counter(
        registry, "token_resource_call_errors", "DevicePlugin calls refused, by method.", ("resource", "method")
    )
    CONFIG_RELOADS = Counter(
        registry, "token_resource_config_reloads", "Configuration reloads, by result (ok or failed).", ("result",)
    )
    CONFIG_GENERATION = Gauge(
        registry, "token_resource_config_generation", "Generation of the configuration in force (1 at start)."
    )
    CONFIG_LAST_RELOAD_OK = Gauge(
        registry, "token_resource_config_last_reload_ok", "1 unless the latest reload was rejected."
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
