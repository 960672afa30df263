"""The intake process: the HTTP API under uvicorn, the stream consumer, the queue controller, /metrics.

``prompt-tasks intake`` runs :class:`IntakeService`. uvicorn serves in the main thread; the
stream consumer and the queue controller run in their own threads. SIGTERM or SIGINT stops
uvicorn gracefully (in-flight requests finish), then the consumer (which announces what it
had gathered) and the controller, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from prompt_tasks.fleet.controller import QueueController
from prompt_tasks.fleet.prometheus import MetricsServer
from prompt_tasks.intake.http import create_api
from prompt_tasks.intake.stream import StreamConsumer

if TYPE_CHECKING:
    from celery import Celery

    from prompt_tasks.settings import Settings

__all__ = ["IntakeService"]

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class IntakeService:
    """The intake process of ``settings``.

    Parameters
    ----------
    settings
        Settings of the fleet (``host`` and ``intake_port`` are where the API listens).
    celery_app
        The app visits are announced through and the controller commands workers with.
    instruments
        Instruments whose fan-out streams to read (default: the known ones, plus any
        ``instrument:*`` stream found).
    stream, controller, metrics
        Whether to run the stream consumer, the queue controller and the metrics endpoint.
    window_s
        Gathering window of the stream consumer.
    """

    settings: Settings
    celery_app: Celery
    instruments: Iterable[str] | None = None
    stream: bool = True
    controller: bool = True
    #: Serve ``/metrics`` on ``settings.metrics_port`` (:mod:`prompt_tasks.fleet.prometheus`).
    metrics: bool = True
    window_s: float = 0.5

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        stop_requested: list[int] = []

        def remember(signum: int, _: FrameType | None) -> None:
            # uvicorn handles the signal while it serves, restores this handler afterwards and
            # raises the signal again: remember it instead of dying before the cleanup.
            stop_requested.append(signum)

        previous = {sig: signal.signal(sig, remember) for sig in _STOP_SIGNALS}
        parts: list[Any] = []
        try:
            parts = self._start_parts()
            server = uvicorn.Server(
                uvicorn.Config(
                    create_api(self.settings, self.celery_app),
                    host=self.settings.host,
                    port=self.settings.intake_port,
                    log_config=None,
                    access_log=False,
                    lifespan="on",
                    timeout_graceful_shutdown=10,
                )
            )
            if stop_requested:  # stopped while starting
                return 0
            log.info("intake listening on %s:%d", self.settings.host, self.settings.intake_port)
            server.run()
            return 0 if server.started else 1
        finally:
            self._stop_parts(parts)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if stop_requested:
                log.info("intake stopped by signal %d", stop_requested[0])

    def _start_parts(self) -> list[Any]:
        parts: list[Any] = []
        if self.metrics:
            try:
                parts.append(MetricsServer(self.celery_app, self.settings).start())
            except OSError:  # the port is taken: visits matter more than their metrics
                log.exception("metrics endpoint not started on port %d", self.settings.metrics_port)
        if self.controller:
            controller = QueueController(self.celery_app, self.settings)
            controller.start()
            parts.append(controller)
        if self.stream:
            consumer = StreamConsumer(
                self.celery_app, self.settings, self.instruments, window_s=self.window_s
            )
            consumer.start()
            parts.append(consumer)
        return parts

    @staticmethod
    def _stop_parts(parts: list[Any]) -> None:
        for part in reversed(parts):
            try:
                part.stop()
                closer = getattr(part, "close", None)
                if callable(closer):
                    closer()
            except Exception:
                log.exception("intake: stopping %s failed", type(part).__name__)
