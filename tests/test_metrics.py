"""Fleet metrics in Redis and their Prometheus exposition."""

from __future__ import annotations

import redis
from prometheus_client import CollectorRegistry, generate_latest

from prompt_tasks.store.metrics import (
    RedisCollector,
    count,
    observe,
    read_counters,
    read_histogram,
)


def test_histogram_and_counter_round_trip(rdb: redis.Redis) -> None:
    for value in (0.004, 0.03, 0.03, 0.7, 900.0):
        observe(rdb, "stage", value, stage="ingest")
    observe(rdb, "stage", 1.5, stage="run")
    count(rdb, "outcomes", outcome="ok")
    count(rdb, "outcomes", 2, outcome="failed")
    hist = read_histogram(rdb, "stage")
    assert hist["stage=ingest"]["count"] == 5
    assert hist["stage=ingest"]["0.05"] == 2 and hist["stage=ingest"]["+Inf"] == 1
    assert read_counters(rdb, "outcomes") == {"outcome=ok": 1, "outcome=failed": 2}

    registry = CollectorRegistry()
    registry.register(
        RedisCollector(rdb, ["stage"], ["outcomes"], queue_depth=lambda: {"wait": 3})
    )
    text = generate_latest(registry).decode()
    assert 'prompt_tasks_stage_seconds_bucket{le="0.05",stage="ingest"} 3.0' in text
    assert 'prompt_tasks_stage_seconds_count{stage="ingest"} 5.0' in text
    assert 'prompt_tasks_outcomes_total{outcome="failed"} 2.0' in text
    assert 'prompt_tasks_queue_depth{queue="wait"} 3.0' in text
