"""The fan-out stream consumer: gathering (pure) and consuming real Redis streams."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from prompt_tasks.errors import InvalidVisit
from prompt_tasks.intake.stream import (
    DEFAULT_GROUP,
    METRIC,
    Gatherer,
    StreamConsumer,
    StreamMessage,
    parse_message,
)
from prompt_tasks.model.visit import parse_next_visit
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import stream_key
from prompt_tasks.store.metrics import read_counters

GROUP = "2026-11-24T04:00:00.000"
STREAM = stream_key("SimCam")


def fan_message(detector: int, group: str = GROUP, **overrides: str) -> dict[str, str]:
    """One message as Rubin's fan-out service writes it: every value a string."""
    body = {
        "private_sndStamp": "1795568400.0",
        "salIndex": "1",
        "scriptSalIndex": "7",
        "instrument": "SimCam",
        "groupId": group,
        "coordinateSystem": "2",
        "position": "[150.0, 2.0]",
        "startTime": str(time.time() + 30),
        "rotationSystem": "2",
        "cameraAngle": "0.0",
        "filters": "r",
        "dome": "2",
        "duration": "30.0",
        "nimages": "1",
        "survey": "TEST",
        "totalCheckpoints": "0",
        "detector": str(detector),
    }
    body.update(overrides)
    return body


def message(detector: int, group: str = GROUP, message_id: str = "1-0") -> StreamMessage:
    return parse_message(STREAM, message_id, fan_message(detector, group))


# --- pure parts ----------------------------------------------------------------------------------


def test_parse_message() -> None:
    parsed = parse_message(STREAM, "5-0", {k.encode(): v.encode() for k, v in fan_message(7).items()})
    assert parsed.detector == 7 and parsed.id == "5-0" and parsed.stream == STREAM
    assert parsed.visit.detector is None and parsed.visit.key == f"SimCam/{GROUP}"
    assert parsed.visit.position == (150.0, 2.0)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (None, "body"),
        ({}, "body"),
        ({b"groupId": b"\xff\xfe"}, "body"),
        ({k: v for k, v in fan_message(1).items() if k != "detector"}, "detector"),
        (fan_message(1, position="[1, 2"), "position"),
        (fan_message(1, coordinateSystem="OBSERVED"), "coordinateSystem"),
        ({**fan_message(1), "detector": "R22_S11"}, "detector"),
        (fan_message(1, instrument="OtherCam"), "instrument"),
        ({"garbage": "x"}, "instrument"),
    ],
)
def test_parse_message_rejects(fields: Any, field: str) -> None:
    with pytest.raises(InvalidVisit) as info:
        parse_message(STREAM, "1-0", fields)
    assert str(info.value).startswith(field) or field in str(info.value)


def test_stream_instrument_case_is_ignored() -> None:
    assert parse_message("instrument:simcam", "1-0", fan_message(2)).detector == 2


def test_gatherer_waits_for_the_window_after_the_last_new_detector() -> None:
    gatherer = Gatherer(window_s=0.5, max_wait_s=5.0)
    for at, det in ((0.0, 1), (0.1, 3), (0.2, 5)):
        gatherer.add(message(det, message_id=f"{det}-0"), at)
    assert gatherer.due(0.6) == []
    assert gatherer.next_due() == pytest.approx(0.7)
    (done,) = gatherer.due(0.7)
    assert done.detectors == {1, 3, 5}
    assert done.ids == [(STREAM, "1-0"), (STREAM, "3-0"), (STREAM, "5-0")]
    assert gatherer.next_due() is None


def test_gatherer_repeated_detector_does_not_extend_the_window() -> None:
    gatherer = Gatherer(window_s=0.5, max_wait_s=5.0)
    gatherer.add(message(1, message_id="1-0"), 0.0)
    gatherer.add(message(1, message_id="2-0"), 0.4)
    (done,) = gatherer.due(0.5)
    assert done.detectors == {1} and len(done.ids) == 2


def test_gatherer_caps_the_wait() -> None:
    gatherer = Gatherer(window_s=0.5, max_wait_s=1.0)
    done = []
    for i in range(5):  # a new detector every 0.4 s would hold a 0.5 s window open forever
        now = i * 0.4
        done += gatherer.due(now)
        gatherer.add(message(i, message_id=f"{i}-0"), now)
    done += gatherer.due(2.1)
    assert [g.detectors for g in done] == [{0, 1, 2}, {3, 4}]


def test_gatherer_keeps_visits_apart() -> None:
    gatherer = Gatherer(window_s=0.5)
    gatherer.add(message(1, "g1"), 0.0)
    gatherer.add(message(2, "g2"), 0.0)
    gatherer.add(message(3, "g1"), 0.0)
    done = {g.visit.groupId: g.detectors for g in gatherer.due(1.0)}
    assert done == {"g1": {1, 3}, "g2": {2}}
    gatherer.add(message(4, "g3"), 0.0)
    assert [g.visit.groupId for g in gatherer.drain()] == ["g3"]


def test_gathered_visit_is_the_summit_visit() -> None:
    gatherer = Gatherer()
    gatherer.add(message(1), 0.0)
    (done,) = gatherer.drain()
    summit = {k: v for k, v in fan_message(1).items() if k != "detector"}
    assert done.visit.groupId == parse_next_visit(summit).groupId
    assert done.visit.detector is None


# --- against the real Redis and router -----------------------------------------------------------


@pytest.fixture
def consumer(settings: Settings, celery_app: Celery) -> Iterator[StreamConsumer]:
    """A consumer of SimCam's stream with a short window (polled by the test, no thread)."""
    made = StreamConsumer(celery_app, settings, ["SimCam"], window_s=0.2, max_wait_s=2.0,
                          consumer="test-consumer", discover=False)
    yield made
    made.stop()
    made.close()


def poll_until(consumer: StreamConsumer, done: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        consumer.poll(block_s=0.05)
        if done():
            return
    pytest.fail(f"condition not reached; stats {dict(consumer.stats)}")


def pending(rdb: redis.Redis, stream: str = STREAM) -> int:
    return rdb.xpending(stream, DEFAULT_GROUP)["pending"]


def detector_lists(rdb: redis.Redis) -> dict[str, int]:
    return {k: rdb.llen(k) for k in rdb.scan_iter(match="detector.SimCam.*", _type="LIST")}


def test_three_detectors_one_announce(consumer: StreamConsumer, rdb: redis.Redis) -> None:
    for det in (5, 1, 3):
        rdb.xadd(STREAM, fan_message(det))
    poll_until(consumer, lambda: consumer.stats["announced"] == 1)
    record = ledger.read_visit(rdb, "SimCam", GROUP)
    assert record is not None
    assert sorted(record.detectors) == [1, 3, 5]
    assert detector_lists(rdb) == {"detector.SimCam.001": 1, "detector.SimCam.003": 1, "detector.SimCam.005": 1}
    assert pending(rdb) == 0
    assert consumer.stats["received"] == 3 and consumer.stats["invalid"] == 0
    assert read_counters(rdb, METRIC) == {"outcome=announced": 3}


def test_malformed_messages_are_acked_and_counted(consumer: StreamConsumer, rdb: redis.Redis) -> None:
    rdb.xadd(STREAM, {"garbage": "x"})
    rdb.xadd(STREAM, fan_message(2, position="[1000, 2]"))
    rdb.xadd(STREAM, {**fan_message(2), "detector": "-4"})
    rdb.xadd(STREAM, fan_message(4, group="2026-11-24T05:00:00.000"))
    poll_until(consumer, lambda: consumer.stats["announced"] == 1)
    assert consumer.stats["invalid"] == 3
    assert pending(rdb) == 0
    assert read_counters(rdb, METRIC)["outcome=invalid"] == 3
    assert ledger.read_visit(rdb, "SimCam", GROUP) is None
    assert ledger.read_visit(rdb, "SimCam", "2026-11-24T05:00:00.000") is not None


def test_binary_garbage_is_survived(consumer: StreamConsumer, rdb: redis.Redis) -> None:
    rdb.xadd(STREAM, {b"\xff\x00": b"\xfe" * 100, b"detector": b"\x80"})
    poll_until(consumer, lambda: consumer.stats["invalid"] == 1)
    assert pending(rdb) == 0


def test_late_detector_is_a_logged_duplicate(
    consumer: StreamConsumer, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    rdb.xadd(STREAM, fan_message(1))
    poll_until(consumer, lambda: consumer.stats["announced"] == 1)
    rdb.xadd(STREAM, fan_message(2))
    with caplog.at_level("INFO", logger="prompt_tasks.intake.stream"):
        poll_until(consumer, lambda: consumer.stats["duplicate"] == 1)
    assert "already announced" in caplog.text
    record = ledger.read_visit(rdb, "SimCam", GROUP)
    assert record is not None and sorted(record.detectors) == [1]
    assert pending(rdb) == 0


def test_pending_messages_of_a_dead_consumer_are_claimed(
    settings: Settings, celery_app: Celery, rdb: redis.Redis
) -> None:
    first = StreamConsumer(celery_app, settings, ["SimCam"], consumer="dead", discover=False)
    first.refresh_streams()
    for det in (0, 8):
        rdb.xadd(STREAM, fan_message(det))
    # "dead" reads the messages, then dies before announcing: they stay pending on it.
    rdb.xreadgroup(DEFAULT_GROUP, "dead", {STREAM: ">"}, count=10)
    first.close()
    assert pending(rdb) == 2

    heir = StreamConsumer(celery_app, settings, ["SimCam"], consumer="heir", window_s=0.1,
                          claim_idle_s=0.2, discover=False)
    try:
        time.sleep(0.3)
        poll_until(heir, lambda: heir.stats["announced"] == 1)
    finally:
        heir.close()
    record = ledger.read_visit(rdb, "SimCam", GROUP)
    assert record is not None and sorted(record.detectors) == [0, 8]
    assert pending(rdb) == 0
    # Once idle long enough with nothing pending, the dead consumer is forgotten.
    heir.forget_idle_consumers(STREAM, idle_s=0.0)
    assert [c["name"] for c in rdb.xinfo_consumers(STREAM, DEFAULT_GROUP)] == ["heir"]


def test_failed_announcement_stays_pending_and_is_retried(
    settings: Settings, celery_app: Celery, rdb: redis.Redis
) -> None:
    calls: list[list[int]] = []

    def flaky(visit: Any, detectors: list[int]) -> Any:
        calls.append(detectors)
        if len(calls) == 1:
            raise ConnectionError("broker away")
        from prompt_tasks.flow.router import announce

        return announce(celery_app, settings, visit, detectors=detectors)

    made = StreamConsumer(celery_app, settings, ["SimCam"], consumer="flaky", window_s=0.1,
                          claim_idle_s=0.3, discover=False, announce=flaky)
    try:
        rdb.xadd(STREAM, fan_message(6))
        poll_until(made, lambda: made.stats["failed"] == 1)
        assert pending(rdb) == 1
        poll_until(made, lambda: made.stats["announced"] == 1)
    finally:
        made.close()
    assert calls == [[6], [6]]
    assert pending(rdb) == 0


def test_discovers_streams_and_survives_a_vanished_group(
    settings: Settings, celery_app: Celery, rdb: redis.Redis
) -> None:
    other = stream_key("OtherCam")
    rdb.xadd(other, fan_message(1, instrument="OtherCam"))
    made = StreamConsumer(celery_app, settings, [], consumer="finder", window_s=0.1)
    try:
        assert made.refresh_streams() == [other]
        rdb.delete(other)  # the stream (and its group) vanish, as after a Redis restart
        made.poll(block_s=0.05)
        rdb.xadd(STREAM, fan_message(2))
        made.refresh_streams()  # as after the refresh period
        poll_until(made, lambda: made.stats["announced"] == 1)
    finally:
        made.close()
    assert ledger.read_visit(rdb, "SimCam", GROUP) is not None


def test_consumer_thread_starts_and_stops(settings: Settings, celery_app: Celery, rdb: redis.Redis) -> None:
    made = StreamConsumer(celery_app, settings, ["SimCam"], consumer="threaded", window_s=0.1)
    made.start()
    try:
        for det in (2, 4):
            rdb.xadd(STREAM, fan_message(det))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and ledger.read_visit(rdb, "SimCam", GROUP) is None:
            time.sleep(0.05)
    finally:
        made.stop()
        made.close()
    record = ledger.read_visit(rdb, "SimCam", GROUP)
    assert record is not None and sorted(record.detectors) == [2, 4]
