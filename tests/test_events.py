"""Bucket-event bodies: every real sample and the garbage around them."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prompt_tasks.errors import InvalidEvent
from prompt_tasks.model.events import ObjectEvent, parse_body

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "s3-events"
#: The key every sample was made with, and its bucket per sample.
SAMPLE_KEY = "instr1/det A/g1/snap+7/img%1.tif"
SAMPLE_BUCKETS = {
    "ceph-rgw-16.2-http-push.json": "images-http",
    "minio-code-juicefs-gw-redis-access-item.json": "camera",
    "minio-code-juicefs-gw-webhook-body.json": "camera",
    "moto-5.2-sqs-body.json": "images-moto",
}


def _sample_path(name: str) -> Path:
    for base in (SAMPLES, Path("/work/shared/reference/s3-events")):
        if (base / name).exists():
            return base / name
    pytest.skip(f"sample {name} not found")


def test_every_sample_is_known() -> None:
    base = _sample_path(next(iter(SAMPLE_BUCKETS))).parent
    assert sorted(p.name for p in base.glob("*.json")) == sorted(SAMPLE_BUCKETS)


@pytest.mark.parametrize("name", sorted(SAMPLE_BUCKETS))
def test_real_samples_parse_to_bucket_and_key(name: str) -> None:
    events = parse_body(_sample_path(name).read_bytes())
    assert len(events) == 1
    event = events[0]
    assert event.bucket == SAMPLE_BUCKETS[name]
    assert event.key == SAMPLE_KEY
    assert event.size == 10
    assert event.is_create
    assert event.etag and '"' not in event.etag
    assert event.timestamp is not None


def _access_item(key: str, name: str = "s3:ObjectCreated:Put", **obj: object) -> str:
    record = {"eventName": name, "eventSource": "minio:s3", "eventTime": "2026-11-24T01:00:00.123Z",
              "s3": {"bucket": {"name": "raws"}, "object": {"key": key, "size": 5, "eTag": "abc", **obj}}}
    return json.dumps([{"Event": [record], "EventTime": "2026-11-24T01:00:00.123Z"}])


def test_url_encoded_keys_with_plus_percent_and_colon() -> None:
    raw = _access_item("SimCam%2F4%2F2026-11-24T01%3A00%3A00.000%2F0%2Fa%2Bb+c%25d.fits")
    (event,) = parse_body(raw)
    assert event.key == "SimCam/4/2026-11-24T01:00:00.000/0/a+b c%d.fits"


def test_ceph_keys_are_not_decoded() -> None:
    body = {"Records": [{"eventName": "ObjectCreated:Put", "eventSource": "ceph:s3",
                         "s3": {"bucket": {"name": "b"}, "object": {"key": "a+b/%41", "size": 1}}}]}
    assert parse_body(json.dumps(body))[0].key == "a+b/%41"


def test_multipart_and_several_records() -> None:
    item = json.loads(_access_item("x%2Fy"))
    item[0]["Event"].append(dict(item[0]["Event"][0], eventName="s3:ObjectCreated:CompleteMultipartUpload"))
    events = parse_body(json.dumps(item).encode())
    assert [e.event_name for e in events] == ["s3:ObjectCreated:Put", "s3:ObjectCreated:CompleteMultipartUpload"]
    assert all(e.is_create for e in events)


def test_non_create_events_parse_but_are_not_creates() -> None:
    (event,) = parse_body(_access_item("x%2Fy", name="s3:ObjectRemoved:Delete", size=None))
    assert not event.is_create
    assert event.size == 0


def test_sns_envelope_and_test_event() -> None:
    inner = json.loads(_sample_path("moto-5.2-sqs-body.json").read_text())
    envelope = {"Type": "Notification", "Message": json.dumps(inner)}
    assert parse_body(json.dumps(envelope))[0].key == SAMPLE_KEY
    (test_event,) = parse_body(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"}))
    assert not test_event.is_create and test_event.bucket == "b"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"42",
        b'"a string"',
        b'{"hello": "world"}',
        b'{"Records": "nope"}',
        b'{"Records": [42]}',
        b'{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}',
        b'[{"Event": [{"eventName": "x", "s3": {"bucket": {"name": "b"}, "object": {}}}]}]',
        b'{"Records": [{"eventName": "x", "s3": {"bucket": {"name": "b"}, "object": {"key": "k", "size": "big"}}}]}',
    ],
)
def test_garbage_raises_invalid_event(raw: bytes) -> None:
    with pytest.raises(InvalidEvent):
        parse_body(raw)


def test_event_is_a_plain_value() -> None:
    event = ObjectEvent("s3:ObjectCreated:Put", "b", "k", 1, "e", "")
    assert event.timestamp is None and event.is_create


@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1))
def test_any_key_survives_minio_escaping(key: str) -> None:
    (event,) = parse_body(_access_item(quote_plus(key, safe="")))
    assert event.key == key
