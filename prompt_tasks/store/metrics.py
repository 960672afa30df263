"""Fleet metrics kept in Redis, exposed to Prometheus by the intake process.

Observations come from many processes (prefork pool children, gevent greenlets, the
dispatcher), so they are aggregated where all of them already write: Redis. A histogram is one
hash of cumulative-free bucket counts plus ``sum`` and ``count``; a counter is one hash field.
Recording costs one pipelined round trip. :class:`RedisCollector` turns the hashes, the broker
queue depths and the live workers into Prometheus metric families at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from prompt_tasks.store.keys import counter_key, histogram_key

if TYPE_CHECKING:
    import redis

__all__ = [
    "LATENCY_BUCKETS",
    "RedisCollector",
    "count",
    "observe",
    "read_counters",
    "read_histogram",
]

#: Upper bounds (s) of the latency histograms: 10 ms to 10 min.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)



def _labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def _parse_labels(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def observe(client: redis.Redis, name: str, value: float, **labels: str) -> None:
    """Add one observation ``value`` (seconds) to histogram ``name``."""
    index = bisect.bisect_left(LATENCY_BUCKETS, value)
    bucket = str(LATENCY_BUCKETS[index]) if index < len(LATENCY_BUCKETS) else "+Inf"
    key = histogram_key(name)
    lbl = _labels_text(labels)
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(key, f"{lbl}|b|{bucket}", 1)
    pipe.hincrby(key, f"{lbl}|count", 1)
    pipe.hincrbyfloat(key, f"{lbl}|sum", value)
    pipe.execute()


def count(client: redis.Redis, name: str, amount: int = 1, **labels: str) -> None:
    """Increase counter ``name`` by ``amount``."""
    client.hincrby(counter_key(name), _labels_text(labels), amount)


def read_counters(client: redis.Redis, name: str) -> dict[str, int]:
    """Counter ``name`` per label set (label text → value)."""
    raw = client.hgetall(counter_key(name))
    return {_decode(k): int(v) for k, v in raw.items()}


def read_histogram(client: redis.Redis, name: str) -> dict[str, dict[str, float]]:
    """Histogram ``name`` per label set: bucket bound → count, plus ``sum`` and ``count``."""
    out: dict[str, dict[str, float]] = {}
    for field, value in client.hgetall(histogram_key(name)).items():
        lbl, _, rest = _decode(field).partition("|")
        entry = out.setdefault(lbl, {})
        kind, _, bound = rest.partition("|")
        entry[bound if kind == "b" else kind] = float(value)
    return out


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _cumulative(entry: Mapping[str, float]) -> list[tuple[str, float]]:
    running = 0.0
    buckets = []
    for bound in (*LATENCY_BUCKETS, "+Inf"):
        running += entry.get(str(bound), 0.0)
        buckets.append((str(bound), running))
    return buckets


class RedisCollector(Collector):
    """Prometheus collector reading the fleet's metrics from Redis at scrape time.

    Parameters
    ----------
    client
        The events/ledger Redis.
    histograms, counters
        Names of the histograms and counters to expose.
    queue_depth
        Callable returning ``{queue: depth}`` (broker-specific), or None.
    """

    def __init__(
        self,
        client: redis.Redis,
        histograms: Iterable[str],
        counters: Iterable[str],
        queue_depth: object | None = None,
    ) -> None:
        self.client = client
        self.histograms = tuple(histograms)
        self.counters = tuple(counters)
        self.queue_depth = queue_depth

    def collect(self) -> Iterator[object]:
        for name in self.histograms:
            data = read_histogram(self.client, name)
            label_names = sorted({k for lbl in data for k in _parse_labels(lbl)})
            family = HistogramMetricFamily(
                f"prompt_tasks_{name}_seconds", f"{name} latency", labels=label_names
            )
            for lbl, entry in data.items():
                labels = _parse_labels(lbl)
                family.add_metric(
                    [labels.get(k, "") for k in label_names],
                    _cumulative(entry),
                    sum_value=entry.get("sum", 0.0),
                )
            yield family
        for name in self.counters:
            data = read_counters(self.client, name)
            label_names = sorted({k for lbl in data for k in _parse_labels(lbl)})
            family = CounterMetricFamily(f"prompt_tasks_{name}", f"{name} count", labels=label_names)
            for lbl, value in data.items():
                labels = _parse_labels(lbl)
                family.add_metric([labels.get(k, "") for k in label_names], value)
            yield family
        if callable(self.queue_depth):
            gauge = GaugeMetricFamily("prompt_tasks_queue_depth", "messages waiting", labels=["queue"])
            for queue, depth in sorted(self.queue_depth().items()):
                gauge.add_metric([queue], depth)
            yield gauge
