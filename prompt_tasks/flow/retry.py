"""When the detector stages retry: what is transient, and when a redelivered task gives up.

Two failure classes, decided here by pure functions:

- **transient** (:func:`is_transient`): the broker, Redis, the S3 server or the registry
  database could not be reached or answered 5xx; a later attempt may succeed. The stage is
  retried (:class:`~prompt_tasks.errors.RetryLater`) with the backoff and at most the retries
  of its policy (:mod:`prompt_tasks.flow.policy`), then fails;
- **permanent**: everything else (bad data, pipeline failure, a bug): the detector-visit fails
  at once, with the reason, and goes to the catch-up record.

A third limit guards against a task that kills its worker: with ``acks_late`` a task whose
worker dies is delivered again, and one that crashes every worker it lands on would be
redelivered forever. :func:`count_delivery` counts the deliveries of each task id (and retry
number) in Redis; past ``settings.max_deliveries`` the stage gives up with
:data:`REDELIVERED_CODE`.
"""

from __future__ import annotations

import functools
import importlib
import socket
from typing import TYPE_CHECKING

from prompt_tasks.errors import PermanentError, RetryLater
from prompt_tasks.store.keys import delivery_key

if TYPE_CHECKING:
    import redis

__all__ = [
    "REDELIVERED_CODE",
    "as_retry",
    "count_delivery",
    "is_transient",
    "redelivered_reason",
]

#: Status code of a detector-visit given up after too many deliveries.
REDELIVERED_CODE = "redelivered"
#: How long a delivery counter lives (s): longer than any stage with its retries.
_DELIVERY_TTL_S = 24 * 3600


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception classes of the clients we use that mean "could not talk to the server"."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.timeout]
    candidates = (
        ("redis.exceptions", ("ConnectionError", "TimeoutError", "BusyLoadingError", "TryAgainError")),
        ("kombu.exceptions", ("OperationalError",)),
        ("amqp.exceptions", ("ConnectionError", "RecoverableConnectionError", "RecoverableChannelError")),
        ("urllib3.exceptions", ("ProtocolError", "NewConnectionError", "MaxRetryError",
                                "ReadTimeoutError", "ConnectTimeoutError")),
        ("botocore.exceptions", ("EndpointConnectionError", "ConnectionClosedError",
                                 "ReadTimeoutError", "ConnectTimeoutError")),
        ("sqlalchemy.exc", ("OperationalError", "DisconnectionError")),
    )
    for module_name, names in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found.extend(getattr(module, name) for name in names if hasattr(module, name))
    return tuple(found)


def _is_server_error(exc: BaseException) -> bool:
    """True for an S3 answer in the 5xx range (minio's ``ServerError`` or ``S3Error``)."""
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status", None)
    return isinstance(status, int) and 500 <= status < 600


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) means "try again later"."""
    transient = _transient_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RetryLater):
            return True
        if isinstance(current, PermanentError):
            return False
        if isinstance(current, transient) or _is_server_error(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def as_retry(exc: BaseException) -> RetryLater | None:
    """``exc`` as a :class:`RetryLater` when it is transient, else None."""
    if isinstance(exc, RetryLater):
        return exc
    if is_transient(exc):
        retry = RetryLater(f"{type(exc).__name__}: {exc}", delay=0.0)
        retry.__cause__ = exc
        return retry
    return None


def count_delivery(client: redis.Redis, task_id: str, retries: int) -> int:
    """Count one more delivery of attempt ``retries`` of ``task_id``; the count so far."""
    key = delivery_key(task_id, retries)
    pipe = client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, _DELIVERY_TTL_S)
    return int(pipe.execute()[0])


def redelivered_reason(deliveries: int) -> str:
    """Reason of a stage given up after ``deliveries`` deliveries."""
    return f"redelivered {deliveries - 1} times (worker crashed?)"
