"""The arrivals index on a real Redis: idempotent records, wake tokens, end and abort."""

from __future__ import annotations

import redis

from prompt_tasks.model.objectkeys import SnapKey
from prompt_tasks.store.arrivals import (
    abort_visit,
    arrivals_for,
    is_aborted,
    is_ended,
    record_arrival,
    register_waiter,
    signal_end,
    unregister_waiter,
    visit_announced,
)
from prompt_tasks.store.keys import arrivals_key, visit_end_key, wake_key

GROUP = "2026-11-24T01:00:00.000"


def test_record_is_idempotent_and_wakes_once(rdb: redis.Redis) -> None:
    snap = SnapKey("SimCam", 4, GROUP, 0, "raw.fits")
    assert record_arrival(rdb, snap, "SimCam/4/g/0/raw.fits", 10, "e1", 100.0, ttl_s=60)
    assert not record_arrival(rdb, snap, "SimCam/4/g/0/other.fits", 99, "e2", 200.0, ttl_s=60)
    (arrival,) = arrivals_for(rdb, "SimCam", GROUP, 4).values()
    assert (arrival.snap, arrival.key, arrival.size, arrival.etag, arrival.t) == (
        0, "SimCam/4/g/0/raw.fits", 10, "e1", 100.0)
    assert rdb.lrange(wake_key("SimCam", GROUP, 4), 0, -1) == ["0"]
    assert 0 < rdb.ttl(arrivals_key("SimCam", GROUP, 4)) <= 60
    assert 0 < rdb.ttl(wake_key("SimCam", GROUP, 4)) <= 60


def test_snaps_and_detectors_are_separate(rdb: redis.Redis) -> None:
    for detector, snap in [(1, 0), (1, 1), (2, 0)]:
        record_arrival(rdb, SnapKey("SimCam", detector, GROUP, snap, "r.fits"), f"k{detector}{snap}", 1, "", 1.0)
    assert sorted(arrivals_for(rdb, "SimCam", GROUP, 1)) == [0, 1]
    assert sorted(arrivals_for(rdb, "SimCam", GROUP, 2)) == [0]
    assert arrivals_for(rdb, "SimCam", "other", 1) == {}


def test_end_and_abort_wake_registered_waiters(rdb: redis.Redis) -> None:
    register_waiter(rdb, "SimCam", GROUP, 3)
    register_waiter(rdb, "SimCam", GROUP, 5)
    assert not is_ended(rdb, "SimCam", GROUP)
    assert signal_end(rdb, "SimCam", GROUP) == 2
    assert is_ended(rdb, "SimCam", GROUP) and rdb.ttl(visit_end_key("SimCam", GROUP)) > 0
    assert rdb.blpop([wake_key("SimCam", GROUP, 3)], timeout=1) is not None
    unregister_waiter(rdb, "SimCam", GROUP, 5)
    assert is_aborted(rdb, "SimCam", GROUP) is None
    assert abort_visit(rdb, "SimCam", GROUP, "dome closed") == 1
    assert is_aborted(rdb, "SimCam", GROUP) == "dome closed"
    assert rdb.llen(wake_key("SimCam", GROUP, 3)) == 1
    assert is_aborted(rdb, "SimCam", "another") is None


def test_visit_announced_marker(rdb: redis.Redis) -> None:
    assert not visit_announced(rdb, "SimCam", GROUP)
    rdb.hset(f"visit:SimCam:{GROUP}", "state", "announced")
    assert visit_announced(rdb, "SimCam", GROUP)
