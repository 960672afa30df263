"""The private servers: a PUT into the raw bucket produces an event in Redis."""

from __future__ import annotations

import io
import json
from urllib.parse import unquote_plus

import redis

from prompt_tasks.objstore import make_client
from prompt_tasks.settings import Settings


def test_put_produces_access_event(settings: Settings, rdb: redis.Redis) -> None:
    key = "SimCam/4/2026-11-24T01:00:00.000/0/raw a+b.fits"
    make_client(settings).put_object(settings.raw_bucket, key, io.BytesIO(b"x" * 10), 10)
    item = rdb.blpop([settings.event_list], timeout=30)
    assert item is not None, "no bucket event within 30 s"
    record = json.loads(item[1])[0]["Event"][0]
    assert record["eventName"] == "s3:ObjectCreated:Put"
    assert record["s3"]["bucket"]["name"] == settings.raw_bucket
    assert unquote_plus(record["s3"]["object"]["key"]) == key
