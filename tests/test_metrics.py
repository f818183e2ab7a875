"""token_resource.metrics writes what prometheus_client would for the same metrics, and a
Prometheus scraper reads it (prometheus_client's own parser, a test-only dependency)."""

import re
import threading
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from token_resource import metrics

RESOURCE = "example.com/token"
ODD = 'a"b\\c\nd é'  # every character the format escapes, and one beyond ASCII


def exercise(m: Any) -> None:
    """The same updates, on token_resource.metrics or on an equivalent prometheus_client set."""
    m.TOKENS.labels(RESOURCE).set(2)
    m.TOKENS.labels("big").set(1.5e10)
    m.REGISTERED.labels(RESOURCE).set(1)
    m.REGISTRATIONS.labels(RESOURCE).inc()
    m.CALLS.labels(RESOURCE, "Allocate").inc()
    m.CALLS.labels(RESOURCE, "ListAndWatch").inc(3)
    m.CALL_ERRORS.labels(ODD, "Allocate").inc(2)
    m.CONFIG_RELOADS.labels("ok").inc()
    m.CONFIG_GENERATION.set(3)
    m.CONFIG_LAST_RELOAD_OK.set(1)


class Reference:
    """The metrics as metrics.py declared them with prometheus_client, before it wrote its own."""

    def __init__(self) -> None:
        r = self.registry = prometheus_client.CollectorRegistry()
        g, c = prometheus_client.Gauge, prometheus_client.Counter
        res, calls = ["resource"], ["resource", "method"]
        self.TOKENS = g("token_resource_tokens", "Tokens advertised to the kubelet.", res, registry=r)
        self.REGISTERED = g(
            "token_resource_registered",
            "1 while the resource is registered and the kubelet holds a ListAndWatch stream.",
            res,
            registry=r,
        )
        self.REGISTRATIONS = c(
            "token_resource_registrations", "Successful Register calls to the kubelet.", res, registry=r
        )
        self.REGISTRATION_FAILURES = c(
            "token_resource_registration_failures", "Failed Register calls to the kubelet.", res, registry=r
        )
        self.KUBELET_RESTARTS = c(
            "token_resource_kubelet_restarts",
            "Kubelet starts seen: the kubelet deleted the plugin's socket (it does so at every start).",
            res,
            registry=r,
        )
        self.CALLS = c("token_resource_calls", "DevicePlugin calls from the kubelet, by method.", calls, registry=r)
        self.CALL_ERRORS = c("token_resource_call_errors", "DevicePlugin calls refused, by method.", calls, registry=r)
        self.CONFIG_RELOADS = c(
            "token_resource_config_reloads", "Configuration reloads, by result (ok or failed).", ["result"], registry=r
        )
        self.CONFIG_GENERATION = g(
            "token_resource_config_generation", "Generation of the configuration in force (1 at start).", registry=r
        )
        self.CONFIG_LAST_RELOAD_OK = g(
            "token_resource_config_last_reload_ok", "1 unless the latest reload was rejected.", registry=r
        )


def without_times(text: str) -> str:
    """The exposition with each `_created` sample's value (a creation time) blanked."""
    return re.sub(r"^(\w+_created(?:\{.*\})?) \S+$", r"\1 T", text, flags=re.M)


def test_the_exposition_is_what_prometheus_client_wrote() -> None:
    registry = metrics.enable()
    assert metrics.enable() is registry
    exercise(metrics)
    reference = Reference()
    exercise(reference)
    ours = registry.expose().decode()
    assert without_times(ours) == without_times(prometheus_client.generate_latest(reference.registry).decode())
    assert metrics.CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"

    families = {f.name: f for f in text_string_to_metric_families(ours)}
    assert families["token_resource_calls"].type == "counter"
    assert families["token_resource_tokens"].type == "gauge"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("token_resource_call_errors_total", (("method", "Allocate"), ("resource", ODD)))] == 2
    assert samples[("token_resource_calls_total", (("method", "ListAndWatch"), ("resource", RESOURCE)))] == 3
    assert samples[("token_resource_tokens", (("resource", "big"),))] == 1.5e10
    assert samples[("token_resource_config_generation", ())] == 3

    metrics.forget(RESOURCE)
    metrics.forget("never-seen")
    left = registry.expose().decode()
    assert RESOURCE not in left
    assert 'resource="big"' in left and "call_errors_total" in left


def test_increments_from_many_threads_are_all_counted() -> None:
    registry = metrics.Registry()
    counter = metrics.Counter(registry, "hits", "Hits.", ("resource",))
    gauge = metrics.Gauge(registry, "level", "Level.")

    def work() -> None:
        for _ in range(20_000):
            counter.labels("r").inc()
            gauge.inc()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = registry.expose().decode()
    assert 'hits_total{resource="r"} 160000.0\n' in text
    assert "level 160000.0\n" in text


def test_counters_only_go_up_and_labels_must_match() -> None:
    registry = metrics.Registry()
    counter = metrics.Counter(registry, "hits", "Hits.", ("resource", "method"))
    with pytest.raises(ValueError):
        counter.labels("r", "m").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("r")
    assert registry.expose().startswith(
        b'# HELP hits_total Hits.\n# TYPE hits_total counter\nhits_total{method="m",resource="r"} 0.0\n'
    )
