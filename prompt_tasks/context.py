"""Per-process resources: the clients a worker process opens once and reuses.

A :class:`Context` is built from the settings the first time a task of a process needs it,
kept on the Celery app (not in a module global), and dropped after a fork or at shutdown, so
each pool child opens its own connections. Plain functions take a context argument; only
tasks look it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from prompt_tasks.objstore import make_client
from prompt_tasks.settings import Settings

if TYPE_CHECKING:
    import redis
    from celery import Celery
    from minio import Minio

__all__ = ["BLOCK_MARGIN_S", "REDIS_MAX_CONNECTIONS", "REDIS_READ_TIMEOUT_S", "Context", "context_of", "drop_context", "settings_of"]

#: Longest wait for a reply of the events Redis (s), set explicitly: redis-py's default (5 s)
#: is shorter than a snap wait's block on its wake key can be, and a block outliving the
#: socket's timeout ends in a timeout error instead of an empty reply. Blocking reads stay
#: under it (:data:`BLOCK_MARGIN_S` less).
REDIS_READ_TIMEOUT_S = 15.0
#: How much shorter than :data:`REDIS_READ_TIMEOUT_S` a blocking read must be (s).
BLOCK_MARGIN_S = 2.0
#: Connections one process may hold to a Redis. A gevent wait worker runs up to 500 snap waits
#: at once, each holding a connection while it blocks on its wake key; redis-py's default pool
#: (100) made the 101st wait of a 189-detector visit fail with "Too many connections". A
#: process past this bound waits for a free connection instead of failing.
REDIS_MAX_CONNECTIONS = 1024


@dataclass
class Context:
    """Clients and caches of one process, opened lazily."""

    settings: Settings
    #: Long-lived objects other modules attach (local Butler repos, caches), closed with us.
    extras: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def redis(self) -> redis.Redis:
        """Redis holding bucket events, the arrivals index and the visit ledger."""
        import redis as redis_lib

        pool = redis_lib.BlockingConnectionPool.from_url(
            self.settings.events_redis,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=REDIS_READ_TIMEOUT_S,
            decode_responses=True,
            socket_keepalive=True,
            health_check_interval=10,
            retry_on_timeout=True,
            socket_timeout=REDIS_READ_TIMEOUT_S,
        )
        return redis_lib.Redis.from_pool(pool)  # the client owns the pool: close() closes both

    @cached_property
    def s3(self) -> Minio:
        """S3 client of the raw bucket's server."""

        return make_client(self.settings)

    def close(self) -> None:
        """Close every client opened so far."""
        if "redis" in self.__dict__:
            self.redis.close()
        for value in self.extras.values():
            closer = getattr(value, "close", None)
            if callable(closer):
                closer()
        self.extras.clear()


def settings_of(celery_app: Celery) -> Settings:
    """The settings ``celery_app`` was built from (read from the environment once)."""
    settings = getattr(celery_app, "prompt_settings", None)
    if settings is None:
        settings = Settings()
        celery_app.prompt_settings = settings  # type: ignore[attr-defined]
    return settings


def context_of(celery_app: Celery) -> Context:
    """The context of this process for ``celery_app``, built on first use."""
    ctx = getattr(celery_app, "prompt_context", None)
    if ctx is None:
        ctx = Context(settings_of(celery_app))
        celery_app.prompt_context = ctx  # type: ignore[attr-defined]
    return ctx


def drop_context(celery_app: Celery, close: bool = False) -> None:
    """Forget (and optionally close) the context of ``celery_app`` in this process."""
    ctx = getattr(celery_app, "prompt_context", None)
    celery_app.prompt_context = None  # type: ignore[attr-defined]
    if ctx is not None and close:
        ctx.close()
