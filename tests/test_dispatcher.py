"""The dispatcher on the real Redis and S3 gateway, with the gateway's real notifications."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from prompt_tasks.context import Context
from prompt_tasks.flow.dispatcher import (
    CALIB_QUEUE,
    CALIB_TASK,
    Dispatcher,
    counters,
    dispatcher_for,
    known_instruments,
    use_plugin_schemes,
)
from prompt_tasks.model.objectkeys import format_key
from prompt_tasks.settings import Settings
from prompt_tasks.stack.servers import start_redis, wait_redis
from prompt_tasks.store.arrivals import arrivals_for
from prompt_tasks.store.keys import DISPATCHER_COUNTERS
from tests.servers import test_settings as private_settings
from tests.test_headers import fits_bytes


def _group() -> str:
    """A fresh ISO group id (objects stay in the bucket across tests)."""
    n = uuid.uuid4().int
    return f"2026-11-24T01:{n % 60:02d}:{n // 60 % 60:02d}.{n // 3600 % 10**6:06d}"


def _body(key: str, name: str = "s3:ObjectCreated:Put", bucket: str = "raws") -> str:
    from urllib.parse import quote_plus

    record = {"eventName": name, "eventSource": "minio:s3", "eventTime": "2026-11-24T01:00:00Z",
              "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key), "size": 3, "eTag": "e"}}}
    return json.dumps([{"Event": [record], "EventTime": "2026-11-24T01:00:00Z"}])


@pytest.fixture
def ctx(settings: Settings) -> Iterator[Context]:
    context = Context(settings)
    yield context
    context.close()


#: The registry knows SimCam; LSSTCam (the sidecar scheme) is added for these tests.
KNOWN = frozenset({"SimCam", "LSSTCam"})


@pytest.fixture
def dispatcher(ctx: Context, celery_app: Celery) -> Dispatcher:
    return dispatcher_for(ctx, known=KNOWN, celery_app=celery_app)


def _put(ctx: Context, key: str, data: bytes = b"raw") -> None:
    ctx.s3.put_object(ctx.settings.raw_bucket, key, io.BytesIO(data), len(data))


def test_put_is_indexed_through_real_notifications(ctx: Context, dispatcher: Dispatcher) -> None:
    group = _group()
    key = format_key("SimCam", 4, group, 0, "a+b%c d.fits")
    _put(ctx, key, b"12345")
    assert dispatcher.step(block_s=10)
    (arrival,) = arrivals_for(ctx.redis, "SimCam", group, 4).values()
    assert (arrival.key, arrival.size, arrival.snap) == (key, 5, 0)
    assert arrival.etag
    assert counters(ctx.redis)["ok"] == 1
    assert ctx.redis.llen(dispatcher.processing_list) == 0


def test_unusable_records_are_counted_and_skipped(ctx: Context, dispatcher: Dispatcher) -> None:
    group = _group()
    good = format_key("SimCam", 1, group, 0)
    ctx.redis.hset(f"visit:SimCam:{group}", "state", "announced")  # indexed unread
    bodies = [
        b"{not json", b"\xff", b"[]", json.dumps({"what": 1}),
        _body("Nobody/1/g/0/raw.fits"),
        _body("SimCam/x/g/0/raw.fits"),
        _body("noslash"),
        _body(good, name="s3:ObjectRemoved:Delete"),
        _body(good), _body(good),
    ]
    ctx.redis.rpush(ctx.settings.event_list, *bodies)
    while dispatcher.step(block_s=0.1):
        pass
    got = counters(ctx.redis)
    assert got["bodies"] == len(bodies)
    assert (got["malformed"], got["unknown_instrument"], got["bad_key"], got["non_create"]) == (3, 1, 2, 1)
    assert (got["ok"], got["duplicate"]) == (1, 1)
    assert list(arrivals_for(ctx.redis, "SimCam", group, 1)) == [0]


def test_known_instruments_come_from_the_registry(ctx: Context) -> None:
    assert "SimCam" in known_instruments()
    assert use_plugin_schemes(["SimCam", "NoSuchCam"]) == {"SimCam": "dmtn-219"}
    assert dispatcher_for(ctx).known == known_instruments()


def test_lsstcam_sidecar_before_and_after_the_image(ctx: Context, dispatcher: Dispatcher) -> None:
    group = _group()
    first = format_key("LSSTCam", 94, group, 0, obs_id=f"MC_O_20261123_{uuid.uuid4().int % 10**6:06d}")
    second = format_key("LSSTCam", 95, group, 0, obs_id=f"MC_O_20261123_{uuid.uuid4().int % 10**6:06d}")
    header = json.dumps({"GROUPID": group, "CURINDEX": 1, "IMGTYPE": "OBJECT"}).encode()
    _put(ctx, first.removesuffix(".fits") + ".json", header)  # sidecar first (the usual order)
    _put(ctx, first)
    _put(ctx, second)  # image first: parked until its sidecar lands
    for _ in range(3):
        assert dispatcher.step(block_s=10)
    assert arrivals_for(ctx.redis, "LSSTCam", group, 95) == {}
    _put(ctx, second.removesuffix(".fits") + ".json", header)
    assert dispatcher.step(block_s=10)
    assert arrivals_for(ctx.redis, "LSSTCam", group, 94)[0].key == first
    assert arrivals_for(ctx.redis, "LSSTCam", group, 95)[0].key == second
    got = counters(ctx.redis)
    assert (got["ok"], got["pending_sidecar"], got["sidecar"]) == (2, 1, 2)


def _queued_tasks(settings: Settings, queue: str) -> list[dict[str, object]]:
    broker = redis.Redis.from_url(settings.broker)
    try:
        messages = [json.loads(raw) for raw in broker.lrange(queue, 0, -1)]
    finally:
        broker.close()
    return [{"task": m["headers"]["task"], "kwargs": json.loads(base64.b64decode(m["body"]))[1]}
            for m in messages]


def test_calibration_without_visit_starts_the_calib_route(
    ctx: Context, dispatcher: Dispatcher, settings: Settings
) -> None:
    group, announced = _group(), _group()
    ctx.redis.hset(f"visit:SimCam:{announced}", "state", "announced")
    _put(ctx, format_key("SimCam", 2, group, 0, "bias.fits"))
    _put(ctx, format_key("SimCam", 2, announced, 0, "bias.fits"))
    _put(ctx, format_key("SimCam", 3, group, 0, "raw.fits"))
    for _ in range(3):
        assert dispatcher.step(block_s=10)
    (task,) = _queued_tasks(settings, CALIB_QUEUE)
    assert task["task"] == CALIB_TASK
    assert task["kwargs"] == {"instrument": "SimCam", "group": group, "detector": 2, "snap": 0,
                              "bucket": "raws", "key": format_key("SimCam", 2, group, 0, "bias.fits"),
                              "calib_type": "bias"}
    assert set(ctx.redis.hkeys(f"calib-route:SimCam:{group}")) == {"2:0"}
    assert counters(ctx.redis)["calib_started"] == 1


def test_unfinished_bodies_are_recovered(ctx: Context, dispatcher: Dispatcher) -> None:
    group = _group()
    ctx.redis.hset(f"visit:SimCam:{group}", "state", "announced")
    ctx.redis.rpush(dispatcher.processing_list, _body(format_key("SimCam", 7, group, 0)))
    assert dispatcher.step(block_s=0.5)
    assert list(arrivals_for(ctx.redis, "SimCam", group, 7)) == [0]


def test_burst_of_10000_is_drained_without_loss(ctx: Context, dispatcher: Dispatcher) -> None:
    group = _group()
    ctx.redis.hset(f"visit:SimCam:{group}", "state", "announced")  # the raws of an announced visit
    bodies = [_body(f"SimCam/{d}/{group}/{s}/raw.fits") for d in range(8) for s in range(1250)]
    pipe = ctx.redis.pipeline(transaction=False)
    for start in range(0, len(bodies), 1000):
        pipe.rpush(ctx.settings.event_list, *bodies[start:start + 1000])
    pipe.execute()
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, 0.2), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 240
        while counters(ctx.redis)["bodies"] < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert counters(ctx.redis)["ok"] == len(bodies)
    assert ctx.redis.llen(ctx.settings.event_list) == 0
    assert sum(len(arrivals_for(ctx.redis, "SimCam", group, d)) for d in range(8)) == len(bodies)


def test_dispatcher_survives_a_redis_restart(tmp_path: Path) -> None:
    own = private_settings(tmp_path)
    run_dir = tmp_path / "run"
    proc = start_redis(own, tmp_path / "redis", run_dir)
    assert wait_redis(own)
    client = redis.Redis.from_url(own.events_redis)
    dispatcher = Dispatcher(redis=client, event_list=own.event_list)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, 0.2), daemon=True)
    thread.start()
    try:
        client.rpush(own.event_list, _body("SimCam/1/g1/0/raw.fits"))
        _wait_for(lambda: client.hget(DISPATCHER_COUNTERS, "ok") == b"1")
        proc.stop()
        time.sleep(0.5)
        proc = start_redis(own, tmp_path / "redis", run_dir)
        assert wait_redis(own)
        client.rpush(own.event_list, _body("SimCam/1/g2/0/raw.fits"))
        _wait_for(lambda: bool(arrivals_for(client, "SimCam", "g2", 1)))
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
        client.close()
        proc.stop()
    assert not thread.is_alive()


def _wait_for(predicate: object, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_dispatcher_command_runs_until_sigterm(settings: Settings, ctx: Context) -> None:
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ)
    env.update({
        "PROMPT_TASKS_REDIS_PORT": str(settings.redis_port),
        "PROMPT_TASKS_S3_PORT": str(settings.s3_port),
        "PROMPT_TASKS_STATE_DIR": str(settings.state_path),
    })
    proc = subprocess.Popen(
        [sys.executable, "-c", "from prompt_tasks.cli import main; main()", "dispatcher", "--text-logs"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        group = _group()
        key = format_key("SimCam", 6, group, 0)
        _put(ctx, key)
        _wait_for(lambda: bool(arrivals_for(ctx.redis, "SimCam", group, 6)), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert "dispatcher stopped" in output


def test_calibration_known_from_the_fits_header(ctx: Context, dispatcher: Dispatcher, settings: Settings) -> None:
    group = _group()
    dark = format_key("SimCam", 4, group, 0, "raw.fits")
    _put(ctx, dark, fits_bytes("DARK"))
    _put(ctx, format_key("SimCam", 5, group, 0, "raw.fits"), fits_bytes("OBJECT"))
    for _ in range(2):
        assert dispatcher.step(block_s=10)
    (task,) = _queued_tasks(settings, CALIB_QUEUE)
    assert task["kwargs"]["key"] == dark and task["kwargs"]["calib_type"] == "dark"


# --- hardening: forged, foreign and hostile events (issue 17) -----------------------------


def test_forged_and_foreign_events_are_counted_never_indexed(
    ctx: Context, dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """Another bucket, a detector the camera does not have, an object that is not there."""
    group = _group()
    real = format_key("SimCam", 3, group, 0)
    _put(ctx, real)
    assert dispatcher.step(block_s=10)  # the real PUT's own event
    bodies = [
        _body(format_key("SimCam", 2, group, 0), bucket="elsewhere"),
        _body(format_key("SimCam", 99999, group, 0)),
        _body(format_key("SimCam", 99998, group, 0)),
        _body(format_key("SimCam", 5, group, 0)),  # no such object, no announced visit
    ]
    ctx.redis.rpush(ctx.settings.event_list, *bodies)
    with caplog.at_level("INFO", logger="prompt_tasks.flow.dispatcher"):
        while dispatcher.step(block_s=0.1):
            pass
    got = counters(ctx.redis)
    assert (got["wrong_bucket"], got["unknown_detector"], got["missing_object"]) == (1, 2, 1)
    assert got["ok"] == 1
    for det in (2, 5, 99998, 99999):
        assert arrivals_for(ctx.redis, "SimCam", group, det) == {}
    assert list(arrivals_for(ctx.redis, "SimCam", group, 3)) == [0]
    detector_logs = [r for r in caplog.records if "unknown_detector" in r.getMessage()]
    assert len(detector_logs) == 1  # once per reason (rate limited), not once per event


def test_raw_of_an_announced_visit_is_indexed_before_it_is_read(ctx: Context, dispatcher: Dispatcher) -> None:
    """The fast path: no read for an announced visit; a missing object fails at ingest instead."""
    group = _group()
    ctx.redis.hset(f"visit:SimCam:{group}", "state", "announced")
    ctx.redis.rpush(ctx.settings.event_list, _body(format_key("SimCam", 5, group, 0)))
    assert dispatcher.step(block_s=1)
    assert list(arrivals_for(ctx.redis, "SimCam", group, 5)) == [0]


@pytest.mark.parametrize("body", [
    "[" * 100_000 + "]" * 100_000,
    '{"Records": ' * 100_000 + "1" + "}" * 100_000,
    "[" * 500 + "]" * 500,
    _body("SimCam/1/2026-11-24T01:00:00.000/0/raw.fits").replace('"eventName"', '"pad": "%s", "eventName"' % ("x" * 3_000_000)),
], ids=["deep-list", "deep-object", "nested-lists", "huge"])
def test_deep_or_huge_bodies_are_malformed_without_traceback(
    ctx: Context, dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture, body: str
) -> None:
    ctx.redis.rpush(ctx.settings.event_list, body)
    with caplog.at_level("INFO"):
        assert dispatcher.step(block_s=1)
    got = counters(ctx.redis)
    assert (got["malformed"], got["error"]) == (1, 0)
    assert not [r for r in caplog.records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)  # no body dump
