"""The Celery application (``celery -A prompt_tasks``).

Its configuration is computed lazily from :class:`~prompt_tasks.settings.Settings` the first
time it is needed, so importing this module reads no environment. Serialization is JSON only:
a pickled message is refused by every worker.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, current_app
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown

from prompt_tasks.context import REDIS_MAX_CONNECTIONS, drop_context, settings_of
from prompt_tasks.fleet.brokers import TRANSPORT
from prompt_tasks.fleet.heartbeat import Heartbeat
from prompt_tasks.fleet.schedule import schedule
from prompt_tasks.logs import configure_logging
from prompt_tasks.settings import Settings

__all__ = ["TASK_MODULES", "app", "broker_transport_options", "celery_config", "create_app", "settings_of"]

#: Modules whose tasks every process of the fleet registers.
TASK_MODULES: list[str] = ["prompt_tasks.flow.tasks", "prompt_tasks.fleet.operations", "prompt_tasks.daytime.calibration"]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration for ``settings``."""
    return {
        "broker_url": settings.broker,
        "result_backend": settings.backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": "default",
        "task_create_missing_queues": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A task running when the broker connection drops finishes (its ack is lost with the
        # connection; the message comes back after the visibility timeout: stages are idempotent).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_prefetch_multiplier": 1,
        # a compute worker's pool process opens the central repo and loads its pipelines as it
        # starts (prompt_tasks.flow.tasks): seconds on a loaded host, not the default's 4
        "worker_proc_alive_timeout": 60.0,
        # a pool process grown past this (a leak, a huge visit) is replaced after its task
        "worker_max_memory_per_child": settings.max_memory_per_child_kb or None,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": broker_transport_options(settings),
        # kombu's Redis transport, made to survive a Redis restart (see prompt_tasks.fleet.brokers)
        "broker_transport": _broker_transport(settings),
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        # One result backend (and connection pool) per process: Celery's default keeps one per
        # thread, which under gevent is one per task, each opening its own connections.
        "result_backend_thread_safe": True,
        "redis_max_connections": REDIS_MAX_CONNECTIONS,
        "result_expires": 24 * 3600,
        # No STARTED state written to the result backend per task (a write and a publish each):
        # nothing reads it, and Flower and monitors see a task start from its task-started event.
        "task_track_started": False,
        # Task events (three publishes per task, ~40 % of a compute worker's consumer CPU) only
        # when asked for: Flower enables them on every worker while it runs (``enable_events``).
        "worker_send_task_events": settings.task_events,
        # No task-sent event per message: announcing 189 detectors would publish 189 more
        # messages (about 40 % of the router's cost); Flower sees tasks from their receipt.
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule": schedule(settings),
        "include": list(TASK_MODULES),
    }


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options of the broker of ``settings`` (Redis or RabbitMQ).

    On Redis a message delivered to a worker that dies (``acks_late``) is only returned to its
    queue once ``visibility_timeout`` has passed since its delivery, by a sweep every worker
    runs every ``unacked_restore_interval`` × ``unacked_restore_throttle`` seconds (kombu's
    default: 100 s); the throttle is set to 1 so ``settings.restore_interval_s`` is the period.
    The visibility timeout must exceed the longest stage, or a long stage runs twice. RabbitMQ
    returns a dead consumer's unacknowledged messages at once and needs none of this.
    """
    if not settings.broker.startswith(("redis", "rediss", "sentinel")):
        return {}
    return {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": 1,
        # gevent workers ack from many greenlets: the default pool of 10 runs dry.
        "max_connections": 200,
        "socket_keepalive": True,
        "health_check_interval": 10,
    }


def _broker_transport(settings: Settings) -> str | None:
    """Our Redis transport for ``redis://`` brokers; None (the URL's own) for any other."""
    if settings.broker.startswith(("redis://", "rediss://")):
        return TRANSPORT
    return None


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (or, lazily, from the environment)."""
    celery_app = Celery("prompt_tasks", set_as_current=settings is None)
    if settings is not None:
        celery_app.conf.update(celery_config(settings))
        celery_app.prompt_settings = settings  # type: ignore[attr-defined]
    else:
        celery_app.add_defaults(lambda: celery_config(settings_of(celery_app)))
    # every worker says in Redis that it lives and what it consumes (the queue controller reads it)
    celery_app.steps["consumer"].add(Heartbeat)
    return celery_app


app = create_app()


@worker_process_init.connect
def _fresh_context_after_fork(**_: Any) -> None:
    """A forked pool child must not share its parent's sockets: drop the inherited context."""
    drop_context(current_app)


@worker_process_shutdown.connect
def _close_context(**_: Any) -> None:
    drop_context(current_app)


@setup_logging.connect
def _structured_logging(loglevel: str | int | None = None, **_: Any) -> None:
    """Replace Celery's log set-up with the project's structured logs."""
    settings = settings_of(current_app)
    configure_logging(loglevel or settings.log_level, json_format=settings.log_json)
