"""The roles of the fleet: which processes run, on which queues, with which pool.

Every ``celery worker`` command line of the project is built here, so scripts, the embedded
stack, docker-compose and the Kubernetes manifests all start the same roles the same way
(``prompt-tasks worker ROLE``).

========== ============ ============================================================
role       pool         job
========== ============ ============================================================
intake     (uvicorn)    next_visit HTTP intake, Redis-stream consumer, router, queue
                        controller (assigns ``detector.<I>.<NNN>`` queues to compute
                        workers)
dispatcher (process)    BLPOPs bucket events, indexes arrivals, wakes waiters
detector   prefork, 2   prepare_repo, ingest, run_pipeline; detector queues are added
                        and removed at run time by the controller. Two slots: while one
                        runs a visit's pipeline, the other prepares the next visit of the
                        same detector (same host, same local repo), so a prepare never
                        waits behind a run
wait       gevent       wait_for_snap: pure I/O, hundreds at once
summary    prefork      summarize_visit, visit deadlines, export (one writer)
beat       (beat)       the periodic jobs of :mod:`prompt_tasks.fleet.schedule`
flower     (flower)     the dashboard, basic auth when configured
========== ============ ============================================================
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["CELERY_ROLES", "ROLES", "Role", "celery_argv", "detector_hostname", "is_compute_node", "is_writer_node"]

Kind = Literal["worker", "beat", "flower", "process"]


@dataclass(frozen=True)
class Role:
    """One kind of process of the fleet."""

    name: str
    kind: Kind
    description: str
    queues: tuple[str, ...] = ()
    pool: str = "prefork"
    concurrency: int = 1
    extra: tuple[str, ...] = field(default_factory=tuple)


ROLES: dict[str, Role] = {
    role.name: role
    for role in (
        Role("intake", "process", "next_visit intake, router and queue controller"),
        Role("dispatcher", "process", "bucket-event dispatcher"),
        Role(
            "detector",
            "worker",
            "compute worker; detector queues assigned by the controller",
            queues=("catchup",),
            pool="prefork",
            concurrency=2,  # a pipeline run and the next visit's prepare side by side
        ),
        Role(
            "wait",
            "worker",
            "waits for snaps (gevent)",
            queues=("wait",),
            pool="gevent",
            concurrency=500,
        ),
        Role(
            "summary",
            "worker",
            "visit summaries, deadlines and export",
            queues=("summary", "export", "default"),
            pool="prefork",
            concurrency=2,
        ),
        Role("beat", "beat", "the periodic-job scheduler (exactly one)"),
        Role("flower", "flower", "the Flower dashboard"),
    )
}

#: Roles that are Celery workers (answer ``celery inspect ping``).
CELERY_ROLES: tuple[str, ...] = tuple(name for name, role in ROLES.items() if role.kind == "worker")


def detector_hostname(index: int) -> str:
    """Node-name prefix of compute worker ``index``; the controller recognises this prefix."""
    return f"detector-{index}"


def is_compute_node(node_name: str) -> bool:
    """True for a compute worker's node name (``detector-<N>@host``)."""
    prefix, _, index = node_name.partition("@")[0].partition("-")
    return prefix == "detector" and index.isdigit()


def is_writer_node(node_name: str) -> bool:
    """True for the node name of a worker whose role consumes the registry writer's ``export``
    queue (``summary@host``)."""
    role = ROLES.get(node_name.partition("@")[0])
    return role is not None and role.kind == "worker" and "export" in role.queues


def celery_argv(role: Role, index: int = 1, loglevel: str = "INFO") -> list[str]:
    """The ``celery`` command line of a worker ``role`` (instance ``index``)."""
    if role.kind != "worker":
        raise ValueError(f"role {role.name!r} is not a Celery worker")
    name = detector_hostname(index) if role.name == "detector" else role.name
    return [
        sys.executable, "-m", "celery", "-A", "prompt_tasks", "worker",
        "-n", f"{name}@%h",
        "-Q", ",".join(role.queues),
        "-P", role.pool,
        "-c", str(role.concurrency),
        f"--loglevel={loglevel}",
        # No start-up sync with every other worker (mingle: a broadcast and a second's wait for
        # replies, to share revoked task ids, which the fleet never uses) and no subscription
        # to every other worker's events (gossip: with events on, each worker would receive
        # every worker's heartbeat, a cost that grows with the square of the fleet). Liveness
        # is the fleet's own heartbeat (:mod:`prompt_tasks.fleet.heartbeat`).
        "--without-mingle",
        "--without-gossip",
        *role.extra,
    ]
