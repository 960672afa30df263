"""Worker heartbeats: the stored form, reading a fleet's beats from a real Redis, a real worker
beating with its queues and withdrawing its beat, and the controller's hold-back after a change."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from celery import Celery

from prompt_tasks.fleet.controller import hold_back
from prompt_tasks.fleet.heartbeat import Beat, decode, encode, publish, read_beats, withdraw
from prompt_tasks.store.keys import FLEET_BEATING, beat_key


def test_a_beat_round_trips() -> None:
    assert decode("w@h", encode(["b", "a", "a"])) == Beat("w@h", frozenset({"a", "b"}))
    assert encode(["b", "a"]) == '{"queues":["a","b"]}'


@pytest.mark.parametrize("raw", ["not json", "[]", "3", '{"queues": "a"}', '{"queues": [1]}', '{"other": []}'])
def test_a_malformed_beat_is_ignored(raw: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="prompt_tasks.fleet.heartbeat"):  # whatever the root's level
        assert decode("w@h", raw) is None
    assert "heartbeat of w@h is malformed" in caplog.text


def test_an_absent_beat_is_none() -> None:
    assert decode("w@h", None) is None


def test_hold_back_spares_workers_told_to_change_lately() -> None:
    actions = [("w1", "q1"), ("w2", "q2"), ("w3", "q3")]
    acted = {"w1": 100.0, "w2": 97.0}
    assert hold_back(actions, acted, now=101.0, settle_s=2.5) == [("w2", "q2"), ("w3", "q3")]
    assert hold_back(actions, acted, now=100.5, settle_s=5.0) == [("w3", "q3")]
    assert hold_back([], acted, now=0.0, settle_s=1.0) == []


def test_beats_are_read_in_one_go_and_expire(rdb: redis.Redis) -> None:
    publish(rdb, "detector-1@a", ["detector.X.001", "catchup"])
    publish(rdb, "detector-2@b", [])
    publish(rdb, "detector-3@c", ["q"], ttl_s=0.2)
    rdb.set(beat_key("broken@d"), "{")
    rdb.sadd(FLEET_BEATING, "broken@d")
    beats = read_beats(rdb)
    assert beats == {
        "detector-1@a": Beat("detector-1@a", frozenset({"detector.X.001", "catchup"})),
        "detector-2@b": Beat("detector-2@b", frozenset()),
        "detector-3@c": Beat("detector-3@c", frozenset({"q"})),
    }
    time.sleep(0.4)
    withdraw(rdb, "detector-2@b")
    assert sorted(read_beats(rdb)) == ["detector-1@a"]
    # expired and withdrawn names leave the set; a malformed beat stays until it expires
    assert rdb.smembers(FLEET_BEATING) == {"detector-1@a", "broken@d"}


def test_a_worker_beating_again_during_a_read_stays_listed(rdb: redis.Redis) -> None:
    publish(rdb, "detector-4@late", ["q"], ttl_s=0.05)
    time.sleep(0.2)  # its beat has expired...

    class BeatsDuringRead(redis.Redis):
        def mget(self, keys: Any, *args: Any) -> Any:
            out = super().mget(keys, *args)
            publish(rdb, "detector-4@late", ["q"])  # ...and it beats again just after the read
            return out

    assert read_beats(BeatsDuringRead(connection_pool=rdb.connection_pool)) == {}
    assert rdb.smembers(FLEET_BEATING) == {"detector-4@late"}  # missed once, not forgotten
    assert sorted(read_beats(rdb)) == ["detector-4@late"]


def test_an_empty_fleet_has_no_beats(rdb: redis.Redis) -> None:
    assert read_beats(rdb) == {}


def test_a_worker_beats_its_queues_and_withdraws_when_it_stops(celery_app: Celery, rdb: redis.Redis) -> None:
    from celery.contrib.testing.worker import start_worker

    node = "detector-7@beats"
    with start_worker(celery_app, pool="solo", queues=["detector.X.007", "catchup"], perform_ping_check=False,
                      hostname=node, shutdown_timeout=30):
        deadline = time.monotonic() + 30
        while node not in (beats := read_beats(rdb)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert beats[node].queues == {"detector.X.007", "catchup"}
        ttl = rdb.pttl(beat_key(node))
        assert 0 < ttl <= 2500
        first = rdb.get(beat_key(node))
        rdb.delete(beat_key(node))  # beats keep coming: the key is back within a period
        deadline = time.monotonic() + 10
        while rdb.get(beat_key(node)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rdb.get(beat_key(node)) == first
    assert node not in read_beats(rdb)
    assert not rdb.exists(beat_key(node))


def test_the_workers_table_says_which_workers_beat_and_consume_their_queues() -> None:
    from rich.console import Console

    from prompt_tasks.cli.fleet import workers_table

    assignment = {"detector-1@a": ["detector.X.000", "detector.X.001"], "detector-2@b": ["detector.X.002"],
                  "detector-3@c": ["detector.X.003"]}
    live = {"detector-1@a": {"detector.X.000", "catchup"}, "detector-2@b": {"detector.X.002"}}
    console = Console(width=120, record=True)
    console.print(workers_table(assignment, [], {}, 0.0, live))
    rows = {line.split()[1]: line for line in console.export_text().splitlines() if "detector-" in line}
    assert "1 not consumed" in rows["detector-1@a"]
    assert rows["detector-2@b"].rstrip(" │").endswith("ok")
    assert "missing" in rows["detector-3@c"]
