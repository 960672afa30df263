"""Bucket-event bodies: every shape an object store sends, parsed into :class:`ObjectEvent`.

Shapes understood (samples of each are in ``shared/reference/s3-events/``):

- MinIO's Redis target in ``access`` format: a JSON list of ``{"Event": [record...],
  "EventTime": ...}`` items (the JuiceFS gateway sends the same);
- MinIO webhook / AMQP bodies: ``{"EventName", "Key", "Records": [record...]}``;
- plain AWS bodies ``{"Records": [record...]}`` (SQS, moto), and SNS envelopes whose
  ``Message`` is such a body;
- Ceph RGW HTTP-push bodies, ``{"Records": [...]}`` with ``eventSource`` ``ceph:s3``.

Object keys are URL query-escaped by MinIO and AWS (``/`` may come as ``%2F``, a space as
``+``) and must be decoded with ``unquote_plus``; Ceph RGW sends them as they are. Parsing is
pure: no I/O, and garbage raises :class:`~prompt_tasks.errors.InvalidEvent`, hostile garbage
included: a body over :data:`MAX_BODY_BYTES` or nested deeper than :data:`MAX_DEPTH` is refused
before it is decoded (never a ``RecursionError``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from prompt_tasks.errors import InvalidEvent

__all__ = ["MAX_BODY_BYTES", "MAX_DEPTH", "ObjectEvent", "parse_body", "parse_record"]

#: Largest body parsed (bytes); one record is about 1.5 kB, a multi-record body a few dozen.
MAX_BODY_BYTES = 1 << 20
#: Deepest nesting of JSON arrays and objects parsed (a real body nests 6 deep).
MAX_DEPTH = 32

#: ``eventSource`` values whose object keys arrive unescaped.
_UNESCAPED_SOURCES = ("ceph:",)


@dataclass(frozen=True)
class ObjectEvent:
    """One record of a bucket notification.

    Parameters
    ----------
    event_name
        As sent (``s3:ObjectCreated:Put``, ``ObjectCreated:Put``, ``s3:ObjectRemoved:Delete``...).
    bucket
        Bucket name.
    key
        Object key, decoded.
    size
        Object size in bytes (0 when the record has none, e.g. deletions).
    etag
        Entity tag without quotes ("" when absent).
    event_time
        The server's ISO-8601 event time as sent ("" when absent).
    """

    event_name: str
    bucket: str
    key: str
    size: int
    etag: str
    event_time: str

    @property
    def is_create(self) -> bool:
        """True for object-created events (PUT, POST, copy, multipart completion)."""
        return "ObjectCreated" in self.event_name

    @property
    def timestamp(self) -> float | None:
        """``event_time`` as Unix seconds, or None if absent or unparsable."""
        if not self.event_time:
            return None
        try:
            return datetime.fromisoformat(self.event_time).timestamp()
        except ValueError:
            return None


def _field(mapping: Any, *path: str) -> Any:
    """``mapping[path[0]][path[1]]...`` or raise InvalidEvent naming the missing field."""
    value = mapping
    for name in path:
        if not isinstance(value, dict) or name not in value:
            raise InvalidEvent(f"event record has no {'.'.join(path)}")
        value = value[name]
    return value


def parse_record(record: Any) -> ObjectEvent:
    """Parse one S3 event record (the element of ``Records`` or of ``Event``)."""
    if not isinstance(record, dict):
        raise InvalidEvent(f"event record is a {type(record).__name__}, not an object")
    name = _field(record, "eventName")
    bucket = _field(record, "s3", "bucket", "name")
    raw_key = _field(record, "s3", "object", "key")
    if not isinstance(name, str) or not isinstance(bucket, str) or not isinstance(raw_key, str):
        raise InvalidEvent("eventName, bucket name and object key must be strings")
    obj = record["s3"]["object"]
    source = str(record.get("eventSource", ""))
    key = raw_key if source.startswith(_UNESCAPED_SOURCES) else unquote_plus(raw_key)
    try:
        size = int(obj.get("size") or 0)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"object size {obj.get('size')!r} is not an integer") from exc
    etag = str(obj.get("eTag") or obj.get("etag") or "").strip('"')
    return ObjectEvent(
        event_name=name,
        bucket=bucket,
        key=key,
        size=size,
        etag=etag,
        event_time=str(record.get("eventTime") or ""),
    )


def _records(body: Any, top: bool = True) -> list[Any]:
    """The S3 records inside any of the known body shapes (one level of list, one SNS envelope)."""
    if isinstance(body, list) and top:  # MinIO Redis "access" format: a list of items
        out: list[Any] = []
        for item in body:
            out.extend(_records(item, top=False))
        return out
    if not isinstance(body, dict):
        raise InvalidEvent(f"event body is a {type(body).__name__}, not an object or list")
    if "Records" in body:  # AWS, webhook/AMQP, Ceph RGW
        records = body["Records"]
    elif "Event" in body and isinstance(body["Event"], list):  # one "access" item
        records = body["Event"]
    elif body.get("Type") == "Notification" and isinstance(body.get("Message"), str):  # SNS
        if not top:
            raise InvalidEvent("an SNS envelope inside a list")
        return _records(_loads(body["Message"]), top=False)
    elif "Event" in body and isinstance(body["Event"], str):  # s3:TestEvent and friends
        return [{"eventName": body["Event"], "s3": {"bucket": {"name": str(body.get("Bucket", ""))},
                                                     "object": {"key": ""}}}]
    else:
        raise InvalidEvent(f"unknown event body shape with fields {sorted(body)[:8]}")
    if not isinstance(records, list):
        raise InvalidEvent("event records are not a list")
    return records


def nesting_depth(raw: bytes | str, limit: int = MAX_DEPTH) -> int:
    """The deepest nesting of JSON arrays and objects in ``raw``, counted up to ``limit + 1``.

    Brackets inside strings are skipped; ``raw`` need not be valid JSON (the decoder says so).
    A body with at most ``limit`` brackets in all is not scanned and gives ``limit``.
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if text.count("[") + text.count("{") <= limit:  # the usual body: no scan needed
        return limit
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif char in "]}":
            depth -= 1
    return deepest


def _loads(raw: bytes | str) -> Any:
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidEvent(f"event body of {len(raw)} bytes is over {MAX_BODY_BYTES}")
    if nesting_depth(raw) > MAX_DEPTH:
        raise InvalidEvent(f"event body nests deeper than {MAX_DEPTH}")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidEvent(f"event body is not JSON: {str(exc)[:120]}") from exc


def parse_body(raw: bytes | str) -> list[ObjectEvent]:
    """Every record of one notification body, in order.

    Raises
    ------
    InvalidEvent
        The body is not JSON, has an unknown shape, or a record lacks the bucket or key.
    """
    return [parse_record(record) for record in _records(_loads(raw))]
