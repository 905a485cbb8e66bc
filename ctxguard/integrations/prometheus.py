"""ctxguard's metrics as Prometheus shows them.

OpenTelemetry names reach Prometheus translated, the same way through the
OpenTelemetry Prometheus exporter, an OpenTelemetry Collector's Prometheus
exporters and Prometheus' own OTLP receiver: dots become underscores, a
counter gets ``_total``, a unit written in curly braces (``{error}``) is an
annotation and is dropped. The dashboard and the alerting rules shipped in
``deploy/`` are written with these names; the tests check them against the
telemetry contract through this module.
"""

from __future__ import annotations

from .. import telemetry

#: Monotonic instruments (``Counter`` and ``ObservableCounter``): ``<name>_total``.
COUNTERS = (
    telemetry.ERRORS,
    telemetry.LEAKS,
    telemetry.HEALED,
    telemetry.VIOLATIONS,
    telemetry.PUSHES,
    telemetry.POPS,
)
#: ``ObservableUpDownCounter``: a gauge, named as it is.
GAUGES = (telemetry.OPEN,)
#: Labels every series gets from the scrape (or from the resource, through OTLP).
TARGET_LABELS = ("job", "instance")


def metric(name: str) -> str:
    """The Prometheus name of one of ctxguard's metrics."""
    base = name.replace(".", "_")
    if name in COUNTERS:
        return base + "_total"
    if name in GAUGES:
        return base
    raise KeyError(f"not a ctxguard metric: {name!r}")


def label(attribute: str) -> str:
    """The Prometheus label name of an attribute."""
    return attribute.replace(".", "_")


def names() -> dict[str, tuple[str, ...]]:
    """Every Prometheus metric name, with the labels its series can have."""
    return {
        metric(name): TARGET_LABELS + tuple(label(a) for a in attributes)
        for name, attributes in telemetry.METRIC_ATTRIBUTES.items()
    }
