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


def test_a_new_volume_keeps_its_metadata_in_badger_an_old_one_in_sqlite(tmp_path) -> None:
    """The gateway's volume: Badger for a new one (a third of SQLite's CPU per request); a
    volume an earlier version formatted on SQLite is opened as it is, not formatted again."""
    from prompt_tasks.stack.servers import s3_meta_url

    new, old = tmp_path / "new", tmp_path / "old"
    old.mkdir()
    (old / "meta.db").write_bytes(b"")
    assert s3_meta_url(new) == f"badger://{new / 'meta'}"
    assert s3_meta_url(old) == f"sqlite3://{old / 'meta.db'}"


def test_the_running_gateway_keeps_its_metadata_in_badger(settings: Settings) -> None:
    """The tests' own gateway was formatted by :func:`format_s3`: Badger, marked formatted."""
    s3_dir = settings.state_path / "s3"
    assert (s3_dir / "formatted").read_text().startswith("badger://")
    assert (s3_dir / "meta").is_dir() and not (s3_dir / "meta.db").exists()
