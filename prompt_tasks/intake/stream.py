"""Consumer of the per-detector next_visit streams written by Rubin's fan-out service.

The fan-out service writes one message per detector, every value a string, to the Redis stream
``instrument:<name>``. This consumer reads them with a consumer group (``XREADGROUP``), gathers
the messages of one visit (instrument, groupId) until no new detector has come for
``window_s`` (or ``max_wait_s`` after the first), announces the visit on exactly the detectors
received, and only then acknowledges the messages (``XACK``). Messages left pending by a
consumer that died are claimed with ``XAUTOCLAIM`` after ``claim_idle_s``; the announcement is
idempotent, so a message handled twice is a logged duplicate. A malformed message is
acknowledged, counted and logged, never fatal.

Gathering is the pure :class:`Gatherer`; :class:`StreamConsumer` does the I/O.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis as redis_lib

from prompt_tasks.context import Context
from prompt_tasks.errors import InvalidVisit
from prompt_tasks.flow.dispatcher import known_instruments
from prompt_tasks.flow.router import announce
from prompt_tasks.logs import bound
from prompt_tasks.model.visit import NextVisit, parse_next_visit
from prompt_tasks.store.keys import STREAM_PREFIX, stream_key
from prompt_tasks.store.metrics import count

if TYPE_CHECKING:
    from celery import Celery

    from prompt_tasks.settings import Settings

__all__ = [
    "DEFAULT_GROUP",
    "Gatherer",
    "Gathering",
    "StreamConsumer",
    "StreamMessage",
    "parse_message",
]

log = logging.getLogger(__name__)

#: The consumer group every intake process joins.
DEFAULT_GROUP = "prompt-tasks-intake"
#: Metrics counter (see :mod:`prompt_tasks.store.metrics`) of stream messages, by outcome.
METRIC = "intake_stream_messages"


@dataclass(frozen=True)
class StreamMessage:
    """One parsed per-detector message."""

    stream: str
    id: str
    visit: NextVisit
    detector: int


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def parse_message(stream: str, message_id: str, fields: Mapping[bytes | str, bytes | str] | None) -> StreamMessage:
    """Parse one stream message, or raise :class:`InvalidVisit` naming the field at fault."""
    if not fields:
        raise InvalidVisit("body: empty or deleted message")
    try:
        text = {_text(key): _text(value) for key, value in fields.items()}
    except UnicodeDecodeError:
        raise InvalidVisit("body: not UTF-8") from None
    visit = parse_next_visit(text)
    if visit.detector is None:
        raise InvalidVisit("detector: required in a fan-out message")
    expected = stream.removeprefix(STREAM_PREFIX)
    if stream.startswith(STREAM_PREFIX) and visit.instrument.lower() != expected.lower():
        raise InvalidVisit(f"instrument: {visit.instrument} sent on the stream of {expected}")
    return StreamMessage(stream, message_id, visit.without_detector(), visit.detector)


@dataclass
class Gathering:
    """The messages of one visit gathered so far."""

    visit: NextVisit
    detectors: set[int]
    #: (stream, message id) of every message, acknowledged once the visit is announced.
    ids: list[tuple[str, str]]
    first: float
    last: float

    @property
    def key(self) -> str:
        """``instrument/groupId``."""
        return self.visit.key


@dataclass
class Gatherer:
    """Groups per-detector messages by visit until the visit's detectors stop coming.

    A visit is due ``window_s`` after its latest new detector, or ``max_wait_s`` after its
    first, whichever comes first. Pure: the caller passes the clock.
    """

    window_s: float = 0.5
    max_wait_s: float = 5.0
    pending: dict[tuple[str, str], Gathering] = field(default_factory=dict)

    def add(self, message: StreamMessage, now: float) -> None:
        """Add one message received at ``now``."""
        key = (message.visit.instrument, message.visit.groupId)
        gathering = self.pending.get(key)
        if gathering is None:
            self.pending[key] = Gathering(
                message.visit, {message.detector}, [(message.stream, message.id)], now, now
            )
            return
        gathering.ids.append((message.stream, message.id))
        if message.detector not in gathering.detectors:
            gathering.detectors.add(message.detector)
            gathering.last = now

    def _due_at(self, gathering: Gathering) -> float:
        return min(gathering.last + self.window_s, gathering.first + self.max_wait_s)

    def due(self, now: float) -> list[Gathering]:
        """Remove and return the visits whose gathering is over at ``now``."""
        keys = [key for key, g in self.pending.items() if self._due_at(g) <= now]
        return [self.pending.pop(key) for key in keys]

    def next_due(self) -> float | None:
        """When the next visit becomes due (None when nothing is gathered)."""
        return min((self._due_at(g) for g in self.pending.values()), default=None)

    def drain(self) -> list[Gathering]:
        """Remove and return everything gathered."""
        out = list(self.pending.values())
        self.pending.clear()
        return out


AnnounceFn = Callable[[NextVisit, list[int]], Any]


class StreamConsumer:
    """Reads the fan-out streams and announces each visit on the detectors it received.

    Parameters
    ----------
    celery_app
        The app the visits are announced through.
    settings
        Settings of the fleet.
    instruments
        Instruments whose streams to read; default: the known instruments. Streams named
        ``instrument:*`` that appear later are read too when ``discover`` is true.
    client
        Redis holding the streams; default: the events Redis of ``settings``.
    group, consumer
        Consumer group and this consumer's name (default: ``host-pid``).
    window_s, max_wait_s
        Gathering window (see :class:`Gatherer`).
    claim_idle_s
        Messages pending that long in another consumer are claimed.
    announce
        ``announce(visit, detectors)``; default: :func:`prompt_tasks.flow.router.announce`.
    """

    def __init__(
        self,
        celery_app: Celery,
        settings: Settings,
        instruments: Iterable[str] | None = None,
        *,
        client: redis_lib.Redis | None = None,
        group: str = DEFAULT_GROUP,
        consumer: str | None = None,
        window_s: float = 0.5,
        max_wait_s: float = 5.0,
        claim_idle_s: float = 30.0,
        discover: bool = True,
        announce: AnnounceFn | None = None,
    ) -> None:
        self.celery_app = celery_app
        self.settings = settings
        self.instruments = None if instruments is None else sorted(set(instruments))
        self._own_client = client is None
        self.client = client or redis_lib.Redis.from_url(
            settings.events_redis, socket_keepalive=True, health_check_interval=10, socket_timeout=30
        )
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.gatherer = Gatherer(window_s, max_wait_s)
        self.claim_idle_s = claim_idle_s
        self.discover = discover
        self._announce = announce or self._router_announce
        #: Messages by outcome: ``received``, ``invalid``, ``announced`` (visits), ``duplicate``
        #: (visits already announced), ``failed`` (announcements that failed, left pending).
        self.stats: Counter[str] = Counter()
        self.streams: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_refresh = 0.0
        self._next_claim = 0.0
        self._context: Context | None = None

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Run :meth:`run` in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="stream-consumer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (announcing what was gathered) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Close the Redis client if this consumer opened it."""
        if self._own_client:
            self.client.close()
        if self._context is not None:
            self._context.close()
            self._context = None

    def run(self) -> None:
        """Consume until :meth:`stop`; connection errors are logged and retried."""
        log.info("stream consumer %s of group %s started", self.consumer, self.group)
        while not self._stop.is_set():
            try:
                self.poll()
            except redis_lib.ConnectionError as exc:
                log.warning("stream consumer: Redis unreachable (%s); retrying", type(exc).__name__)
                self._next_refresh = 0.0
                self._stop.wait(1.0)
            except Exception:
                log.exception("stream consumer: unexpected error; continuing")
                self._stop.wait(1.0)
        try:
            self._flush(self.gatherer.drain())
        except Exception:
            log.exception("stream consumer: could not announce what was gathered at stop")
        log.info("stream consumer stopped: %s", dict(self.stats))

    # ----------------------------------------------------------------------------- one round

    def poll(self, block_s: float = 0.2) -> None:
        """One round: refresh the streams, claim orphans, read, announce what is due."""
        now = time.monotonic()
        if now >= self._next_refresh:
            self.refresh_streams()
            self._next_refresh = now + 5.0
        if now >= self._next_claim:
            self.claim()
            self._next_claim = now + max(self.claim_idle_s / 2, 0.5)
        due_at = self.gatherer.next_due()
        wait = block_s if due_at is None else min(block_s, max(due_at - now, 0.0))
        if self.streams:
            try:
                replies = self.client.xreadgroup(
                    self.group, self.consumer, dict.fromkeys(self.streams, ">"), count=500,
                    block=max(int(wait * 1000), 1),
                )
            except redis_lib.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("stream consumer: a stream or group vanished; recreating")
                self.refresh_streams()
                replies = []
            self._take(replies or [])
        else:
            self._stop.wait(wait)
        self._flush(self.gatherer.due(time.monotonic()))

    def refresh_streams(self) -> list[str]:
        """Settle which streams to read and make sure the group exists on each."""
        names = {stream_key(i) for i in (self.instruments if self.instruments is not None else _known())}
        if self.discover:
            for key in self.client.scan_iter(match=f"{STREAM_PREFIX}*", count=500, _type="STREAM"):
                names.add(_text(key))
        for name in sorted(names):
            try:
                self.client.xgroup_create(name, self.group, id="0", mkstream=True)
                log.info("stream consumer: group %s created on %s", self.group, name)
            except redis_lib.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self.streams = sorted(names)
        return self.streams

    def claim(self) -> int:
        """Take over messages idle in other consumers for ``claim_idle_s``; returns how many."""
        claimed = 0
        for stream in self.streams:
            start = "0-0"
            for _ in range(100):  # bounded: at most 100 pages per stream per round
                reply = self.client.xautoclaim(
                    stream, self.group, self.consumer, int(self.claim_idle_s * 1000), start, count=500
                )
                start, messages = _text(reply[0]), reply[1]
                deleted = reply[2] if len(reply) > 2 else []
                if deleted:
                    self.client.xack(stream, self.group, *deleted)
                if messages:
                    log.info("stream consumer: claimed %d pending messages of %s", len(messages), stream)
                    claimed += len(messages)
                    self._take([(stream, messages)])
                if start == "0-0":
                    break
            self.forget_idle_consumers(stream)
        return claimed

    def forget_idle_consumers(self, stream: str, idle_s: float = 3600.0) -> None:
        """Drop consumers of the group with nothing pending that were idle ``idle_s`` (dead
        intake processes), so the group's consumer list does not grow forever."""
        for info in self.client.xinfo_consumers(stream, self.group):
            name = _text(info["name"])
            if name != self.consumer and not info["pending"] and info["idle"] >= idle_s * 1000:
                self.client.xgroup_delconsumer(stream, self.group, name)
                log.info("stream consumer: forgot idle consumer %s of %s", name, stream)

    def _take(self, replies: Iterable[tuple[Any, Iterable[tuple[Any, Any]]]]) -> None:
        now = time.monotonic()
        for raw_stream, messages in replies:
            stream = _text(raw_stream)
            for raw_id, fields in messages:
                message_id = _text(raw_id)
                self.stats["received"] += 1
                try:
                    message = parse_message(stream, message_id, fields)
                except InvalidVisit as exc:
                    self._reject(stream, message_id, exc)
                    continue
                self.gatherer.add(message, now)

    def _reject(self, stream: str, message_id: str, exc: InvalidVisit) -> None:
        self.stats["invalid"] += 1
        log.warning("stream %s message %s rejected: %s", stream, message_id, exc)
        self.client.xack(stream, self.group, message_id)
        self._count("invalid")

    def _flush(self, gatherings: Iterable[Gathering]) -> None:
        for gathering in gatherings:
            detectors = sorted(gathering.detectors)
            with bound(instrument=gathering.visit.instrument, group=gathering.visit.groupId):
                try:
                    result = self._announce(gathering.visit, detectors)
                except InvalidVisit as exc:  # retrying cannot help: drop the messages
                    for stream, message_id in gathering.ids:
                        self._reject(stream, message_id, exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - left pending, claimed again later
                    self.stats["failed"] += 1
                    log.warning("stream: announcing %s failed (%s: %s); messages left pending",
                                gathering.key, type(exc).__name__, exc)
                    continue
                if getattr(result, "duplicate", False):
                    self.stats["duplicate"] += 1
                    log.info("stream: %s already announced; detectors %s are duplicates",
                             gathering.key, detectors)
                    self._count("duplicate", len(gathering.ids))
                else:
                    self.stats["announced"] += 1
                    log.info("stream: %s announced on %d detectors", gathering.key, len(detectors))
                    self._count("announced", len(gathering.ids))
                pipe = self.client.pipeline(transaction=False)
                for stream, message_id in gathering.ids:
                    pipe.xack(stream, self.group, message_id)
                pipe.execute()

    def _count(self, outcome: str, amount: int = 1) -> None:
        with contextlib.suppress(redis_lib.RedisError):
            count(self.client, METRIC, amount, outcome=outcome)

    def _router_announce(self, visit: NextVisit, detectors: list[int]) -> Any:
        if self._context is None:
            self._context = Context(self.settings)
        return announce(self.celery_app, self._context, visit, detectors=detectors)


def _known() -> list[str]:
    """The instruments the fleet knows."""

    return sorted(known_instruments())
