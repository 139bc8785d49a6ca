"""Reading Prometheus text exposition in tests, and metric deltas between two scrapes."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` in Prometheus text whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def histogram_buckets(text: str, name: str, **labels: str) -> dict[float, float]:
    """{le: cumulative count} of a histogram."""
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket" and all(sample.labels.get(k) == v for k, v in labels.items()):
                le = float(sample.labels["le"])
                out[le] = out.get(le, 0.0) + sample.value
    return out


def metric_delta(before: str, after: str | Callable[[], str]) -> Callable[..., float]:
    """``delta(name, **labels)``: how much a metric grew from the scrape ``before`` to ``after`` (a scrape,
    or a function that scrapes anew on every call, for waiting until a value arrives)."""

    def delta(name: str, **labels: str) -> float:
        now = after() if callable(after) else after
        return metric(now, name, **labels) - metric(before, name, **labels)

    return delta
