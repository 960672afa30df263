"""The Redis broker transport, surviving a Redis restart with messages in flight.

kombu 5.7's Redis transport has a flaw that kills a worker when Redis goes away while the
worker holds unacknowledged messages (a running ``acks_late`` task, an ETA task such as a
visit deadline): on the lost connection Celery closes the channel, the channel's QoS tries to
put those messages back in their queues at once, needs a new Redis client for that, and the
transport's connection info is already gone, so ``AttributeError: 'NoneType' object has no
attribute 'hostname'`` escapes and the worker exits with "Unrecoverable error" (seen in
``tests/test_faults.py``: the summary and wait workers died, the idle compute worker lived).

:class:`RedisTransport` is kombu's transport with that flaw closed: a channel whose connection
is gone raises the transport's own connection error (which Celery recovers from: it reconnects)
instead of ``AttributeError``, for the restore on close as for a late ack; and messages that
cannot be restored then are left where Redis keeps them anyway (the unacked index, on
append-only storage), for the restore sweep of any live worker to return them to their queues
once the visibility timeout has passed (an ack lost that way means the task runs again: stages
are idempotent). The celery configuration selects it (``broker_transport``) for ``redis://``
brokers.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

__all__ = ["TRANSPORT", "RedisChannel", "RedisQoS", "RedisTransport"]

log = logging.getLogger(__name__)

#: The value of Celery's ``broker_transport`` for Redis brokers.
TRANSPORT = "prompt_tasks.fleet.brokers:RedisTransport"


class RedisQoS(kombu_redis.QoS):
    """kombu's Redis QoS; restoring unacked messages on a dead connection is left to the sweep."""

    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except (AttributeError, redis.ConnectionError):  # the connection is gone (see module docstring)
            log.warning("%d unacknowledged messages left for the restore sweep (connection lost)",
                        len(self._delivered))
            self._delivered.clear()


class RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel with :class:`RedisQoS`, failing like a lost connection once closed."""

    QoS = RedisQoS

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        connection = self.connection
        if connection is None or connection.client is None:
            raise redis.ConnectionError("the broker connection of this channel is closed")
        return super()._connparams(asynchronous=asynchronous)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`RedisChannel`."""

    Channel = RedisChannel
