"""Health checks of the stack's components: one probe per kind of server.

Each probe answers a yes or no quickly (short timeouts) and never raises for a server that
is down. Celery workers are probed together with one broadcast ``ping`` addressed to their
node names.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterable

import redis
import urllib3

from prompt_tasks.celery import create_app
from prompt_tasks.objstore import health_live
from prompt_tasks.settings import Settings

__all__ = ["celery_ping", "flower_api", "http_ok", "node_name", "redis_ping", "s3_live"]


def redis_ping(settings: Settings, timeout: float = 1.0) -> bool:
    """True when the Redis of ``settings`` answers PING."""
    client = redis.Redis.from_url(
        settings.redis_url(0), socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def s3_live(settings: Settings, timeout: float = 1.0) -> bool:
    """True when the S3 server answers ``/minio/health/live``."""
    return health_live(settings, timeout=timeout)


def http_ok(url: str, timeout: float = 1.0, auth: str | None = None) -> bool:
    """True when ``GET url`` answers 200 (``auth``: ``user:password`` for basic auth) and,
    when the body is a JSON object with an ``ok`` field, that field is true."""
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    try:
        resp = urllib3.request("GET", url, headers=headers, timeout=timeout, retries=False)
    except urllib3.exceptions.HTTPError:
        return False
    if resp.status != 200:
        return False
    try:
        body = resp.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and body.get("ok") is False)


def flower_api(settings: Settings, auth: str | None, timeout: float = 2.0) -> bool:
    """True when Flower answers ``/api/workers`` (with basic auth when set)."""
    return http_ok(f"http://{settings.host}:{settings.flower_port}/api/workers", timeout, auth)


def node_name(prefix: str, host: str | None = None) -> str:
    """Full Celery node name of a worker started with ``-n prefix@%h`` on ``host``."""
    return f"{prefix}@{host or socket.gethostname()}"


def celery_ping(settings: Settings, prefixes: Iterable[str], timeout: float = 1.0) -> set[str]:
    """The node-name prefixes among ``prefixes`` whose worker (on this host) answers ping."""

    wanted = {node_name(prefix): prefix for prefix in prefixes}
    if not wanted:
        return set()
    app = create_app(settings)
    try:
        replies = app.control.ping(destination=list(wanted), timeout=timeout)
    except Exception:  # noqa: BLE001 - a broker that is down means no worker is healthy
        return set()
    finally:
        app.close()
    answered = {name for reply in replies for name in reply}
    return {wanted[name] for name in answered if name in wanted}
