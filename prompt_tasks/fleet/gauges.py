"""The fleet's gauges: queue depths on the broker and the workers whose heartbeat is live.

:func:`fleet_gauges` runs as a periodic job and keeps the last measure in Redis
(:data:`~prompt_tasks.store.keys.FLEET_QUEUES`, :data:`~prompt_tasks.store.keys.FLEET_WORKERS`),
where the Prometheus endpoint (:mod:`prompt_tasks.fleet.prometheus`) reads the workers' liveness;
queue depths it measures live at each scrape.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import redis as redis_lib

from prompt_tasks.fleet.controller import read_assignment
from prompt_tasks.fleet.heartbeat import read_beats
from prompt_tasks.store.keys import FLEET_QUEUES, FLEET_WORKERS

if TYPE_CHECKING:
    from celery import Celery

    from prompt_tasks.context import Context

__all__ = ["FIXED_QUEUES", "fleet_gauges", "fleet_queues", "queue_depths"]

log = logging.getLogger(__name__)

#: The queues every fleet has, besides the detector queues.
FIXED_QUEUES: tuple[str, ...] = ("wait", "summary", "export", "default", "catchup")


def fleet_queues(app: Celery, ctx: Context) -> list[str]:
    """The fleet's queues: the fixed ones and the detector queues the controller manages."""
    queues = set(FIXED_QUEUES)
    try:
        for assigned in read_assignment(ctx.redis).values():
            queues.update(assigned)
    except Exception:  # no assignment recorded yet
        log.debug("no queue assignment", exc_info=True)
    del app
    return sorted(queues)


def queue_depths(app: Celery, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each of ``queues`` on the app's broker (Redis or RabbitMQ)."""
    url = str(app.conf.broker_url or "")
    if url.startswith(("redis", "rediss")):
        client = redis_lib.Redis.from_url(url)
        try:
            pipe = client.pipeline(transaction=False)
            for queue in queues:
                pipe.llen(queue)
            return {queue: int(n) for queue, n in zip(queues, pipe.execute(), strict=True)}
        finally:
            client.close()
    out: dict[str, int] = {}
    with app.connection_for_read() as conn:
        for queue in queues:
            channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(queue=queue, passive=True)
                out[queue] = int(count)
            except Exception:  # not declared yet: nothing waits there
                log.debug("queue %s not declared", queue, exc_info=True)
                out[queue] = 0
            finally:
                try:
                    channel.close()
                except Exception:  # the broker closed it after a NOT_FOUND
                    log.debug("channel close", exc_info=True)
    return out



def fleet_gauges(app: Celery, ctx: Context) -> dict[str, Any]:
    """Measure queue depths and live workers; write them to Redis for the metrics endpoint.

    Live workers are read from their heartbeats (:mod:`prompt_tasks.fleet.heartbeat`), not asked
    with a ping broadcast that would hold this job's worker slot for its whole reply window.
    """
    now = time.time()
    depths = queue_depths(app, fleet_queues(app, ctx))
    alive = sorted(read_beats(ctx.redis))
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.delete(FLEET_QUEUES)
    pipe.hset(FLEET_QUEUES, mapping={**{q: str(d) for q, d in depths.items()}, "_t": repr(now)})
    if alive:
        pipe.hset(FLEET_WORKERS, mapping={node: repr(now) for node in alive})
    pipe.execute()
    return {"queues": depths, "alive": alive}
