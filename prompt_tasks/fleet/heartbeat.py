"""Worker heartbeats: every Celery worker says in Redis, once a second, that it lives and which
queues it consumes.

A beat is one expiring key per worker (:func:`~prompt_tasks.store.keys.beat_key`, JSON: the
queues it consumes) and the worker's name in the set
:data:`~prompt_tasks.store.keys.FLEET_BEATING`, written by :class:`Heartbeat`, a consumer
bootstep, from the worker's own event loop: a worker whose loop is stuck stops beating as it
would stop answering a broadcast. The queue controller reads the whole fleet's beats in two
round trips (:func:`read_beats`) instead of broadcasting an ``active_queues`` inspect that every
worker answers, every round; what it costs grows with the fleet only by one small key per
worker. A worker killed outright is gone once its key expires (:data:`TTL_S`); one shutting
down withdraws its beat at once (:func:`withdraw`), so its queues move without waiting.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from prompt_tasks.context import settings_of
from prompt_tasks.store.keys import FLEET_BEATING, beat_key

if TYPE_CHECKING:
    import redis

__all__ = [
    "PERIOD_S", "TTL_S", "Beat", "Heartbeat", "decode", "encode", "publish", "queues_by_node", "read_beats",
    "withdraw",
]

log = logging.getLogger(__name__)

#: Seconds between two beats of a worker.
PERIOD_S = 1.0
#: Seconds a beat stays in Redis: a worker that missed two beats in a row is gone.
TTL_S = 2.5
#: Seconds a worker waits after failing to reach Redis before it tries again (its event loop is
#: not held up by an unreachable Redis every second).
RETRY_S = 5.0
#: Longest wait for Redis in a beat (s): the beat runs on the worker's event loop.
TIMEOUT_S = 0.5

#: Remove from the set ``KEYS[1]`` each name ``ARGV[i]`` whose beat key ``KEYS[i + 1]`` is absent,
#: atomically (a plain SREM after the read could drop a worker that has just beaten again).
_FORGET_SILENT = """
for i, node in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('SREM', KEYS[1], node) end
end
return 0
"""


@dataclass(frozen=True)
class Beat:
    """One worker's last heartbeat."""

    node: str
    queues: frozenset[str]


def encode(queues: Iterable[str]) -> str:
    """The stored form of a beat."""
    return json.dumps({"queues": sorted(set(queues))}, separators=(",", ":"))


def decode(node: str, raw: str | bytes | None) -> Beat | None:
    """The beat stored as ``raw`` (None when absent or malformed)."""
    if raw is None:
        return None
    try:
        body = json.loads(raw)
        queues = body["queues"]
        if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
            raise TypeError("queues is not a list of names")
        return Beat(node, frozenset(queues))
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("heartbeat of %s is malformed (%s: %s), ignored", node, type(exc).__name__, exc)
        return None


def publish(client: redis.Redis, node: str, queues: Iterable[str], ttl_s: float = TTL_S) -> None:
    """Store one beat of ``node`` (one round trip)."""
    pipe = client.pipeline(transaction=False)
    pipe.set(beat_key(node), encode(queues), px=max(int(ttl_s * 1000), 1))
    pipe.sadd(FLEET_BEATING, node)
    pipe.execute()


def withdraw(client: redis.Redis, node: str) -> None:
    """Remove ``node``'s beat: it is gone now, not when its key expires."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(beat_key(node))
    pipe.srem(FLEET_BEATING, node)
    pipe.execute()


def read_beats(client: redis.Redis) -> dict[str, Beat]:
    """The live workers' beats, by node name (two round trips for the whole fleet).

    Names whose beat has expired are dropped from :data:`FLEET_BEATING`; a worker that is only
    late adds itself again with its next beat.
    """
    nodes = sorted(str(n if isinstance(n, str) else n.decode()) for n in client.smembers(FLEET_BEATING))
    if not nodes:
        return {}
    raws = client.mget([beat_key(node) for node in nodes])
    beats = {node: decode(node, raw) for node, raw in zip(nodes, raws, strict=True)}
    gone = [node for node, raw in zip(nodes, raws, strict=True) if raw is None]
    if gone:  # only those still without a beat: one that beat since the MGET stays listed
        client.register_script(_FORGET_SILENT)(keys=[FLEET_BEATING, *map(beat_key, gone)], args=gone)
    return {node: beat for node, beat in beats.items() if beat is not None}


def queues_by_node(beats: Mapping[str, Beat]) -> dict[str, set[str]]:
    """Node → the queues it consumes, from its beat."""
    return {node: set(beat.queues) for node, beat in beats.items()}


class Heartbeat(bootsteps.StartStopStep):
    """Consumer bootstep sending this worker's beats (see the module doc)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self._tref: Any = None
        self._client: redis.Redis | None = None
        self._quiet_until = 0.0
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        self._beat(c)
        self._tref = c.timer.call_repeatedly(PERIOD_S, self._beat, (c,))

    def stop(self, c: Any) -> None:
        """Stop beating (a consumer restarting keeps its last beat until it expires)."""
        if self._tref is not None:
            c.timer.cancel(self._tref)
            self._tref = None

    def shutdown(self, c: Any) -> None:
        """Stop beating and withdraw the beat: the worker is going away."""
        self.stop(c)
        client = self._client
        if client is not None:
            try:
                withdraw(client, c.hostname)
            except Exception:  # the key expires anyway
                log.debug("heartbeat of %s not withdrawn", c.hostname, exc_info=True)
            client.close()
            self._client = None

    def _redis(self, c: Any) -> redis.Redis:
        if self._client is None:
            import redis as redis_lib

            self._client = redis_lib.Redis.from_url(
                settings_of(c.app).events_redis, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
            )
        return self._client

    def _beat(self, c: Any) -> None:
        now = time.monotonic()
        if now < self._quiet_until:
            return
        consumer = getattr(c, "task_consumer", None)
        queues = [q.name for q in consumer.queues] if consumer is not None else []
        try:
            publish(self._redis(c), c.hostname, queues)
        except Exception as exc:  # noqa: BLE001 - the worker goes on; the controller sees it missing
            self._quiet_until = now + RETRY_S
            log.warning("heartbeat of %s not sent (%s: %s); next try in %.0f s", c.hostname,
                        type(exc).__name__, exc, RETRY_S)
