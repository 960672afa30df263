"""The Prometheus endpoint of the fleet: ``GET /metrics`` on ``settings.metrics_port``.

The intake process serves it (a thread, :class:`MetricsServer`). At each scrape it reads

- the per-stage latency histograms (``stage``, label ``stage``: prepare, wait, ingest, run, export;
  ``snap_to_run``: last snap arrival → pipeline start) and the counters (``outcomes`` by
  outcome and stage, ``failures`` by stage and code, ``retries``, ``redeliveries``,
  ``pool_children``, ``intake_rejections`` by reason) that every process records in Redis (:mod:`prompt_tasks.store.metrics`);
- the broker's queue depths, live: ``LLEN`` of each queue's list on a Redis broker, a passive
  ``queue_declare`` on RabbitMQ (:func:`prompt_tasks.fleet.gauges.queue_depths`);
- the workers seen alive by the housekeeping job (``prompt_tasks_worker_last_seen_seconds``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from prompt_tasks.context import Context
from prompt_tasks.fleet.gauges import fleet_queues, queue_depths
from prompt_tasks.store.keys import FLEET_WORKERS
from prompt_tasks.store.metrics import RedisCollector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    import redis
    from celery import Celery

    from prompt_tasks.context import Context
    from prompt_tasks.settings import Settings

__all__ = [
    "COUNTERS",
    "HISTOGRAMS",
    "FleetCollector",
    "MetricsServer",
    "registry_for",
]

log = logging.getLogger(__name__)

HISTOGRAMS: tuple[str, ...] = ("stage", "snap_to_run")
COUNTERS: tuple[str, ...] = ("outcomes", "failures", "retries", "redeliveries", "pool_children",
                             "intake_rejections")
class FleetCollector(Collector):
    """Live queue depths and the workers' last-seen times."""

    def __init__(self, app: Celery, ctx: Context) -> None:
        self.app = app
        self.ctx = ctx

    def collect(self) -> Iterator[Any]:

        depth = GaugeMetricFamily("prompt_tasks_queue_depth", "messages waiting", labels=["queue"])
        try:
            for queue, n in sorted(queue_depths(self.app, fleet_queues(self.app, self.ctx)).items()):
                depth.add_metric([queue], n)
        except Exception:  # broker unreachable: the scrape still answers
            log.warning("queue depths unavailable", exc_info=True)
        yield depth
        seen = GaugeMetricFamily("prompt_tasks_worker_last_seen_seconds",
                                 "seconds since the gauges job last saw the worker's heartbeat", labels=["node"])
        client: redis.Redis = self.ctx.redis
        now = time.time()
        try:
            for node, when in sorted(client.hgetall(FLEET_WORKERS).items()):
                seen.add_metric([str(node)], max(0.0, now - float(when)))
        except Exception:  # Redis unreachable
            log.warning("worker liveness unavailable", exc_info=True)
        yield seen


def registry_for(app: Celery, ctx: Context) -> CollectorRegistry:
    """A registry with the fleet's collectors."""
    registry = CollectorRegistry()
    registry.register(RedisCollector(ctx.redis, HISTOGRAMS, COUNTERS))
    registry.register(FleetCollector(app, ctx))
    return registry


class MetricsServer:
    """``/metrics`` on ``settings.host:settings.metrics_port``, served from a thread."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.ctx = Context(settings)
        self.settings = settings
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Start serving."""
        self._server, self._thread = start_http_server(
            self.settings.metrics_port, addr=self.settings.host, registry=registry_for(self.app, self.ctx)
        )
        log.info("metrics on %s:%d", self.settings.host, self.settings.metrics_port)
        return self

    def stop(self) -> None:
        """Stop serving and close the Redis client."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.ctx.close()
