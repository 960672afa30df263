"""The fleet's operations tasks: catch-up, housekeeping, expiry, gauges (the beat jobs).

Thin ``shared_task`` wrappers around :mod:`prompt_tasks.daytime.catchup` and
:mod:`prompt_tasks.fleet.housekeeping`; :mod:`prompt_tasks.fleet.schedule` names them. Importing this module
(it is in ``TASK_MODULES``) also registers the housekeeping remote-control command in every
worker, and counts each new pool process (``pool_children`` metric: a child replaced after
``worker_max_memory_per_child`` or killed by the out-of-memory killer shows up there).

=================================== ========= =================================================
task                                queue     job
=================================== ========= =================================================
``prompt_tasks.catchup_run``        default   redo failed detector-visits (daytime window)
``prompt_tasks.catchup_result``     catchup   end of a catch-up chain: settle its record
``prompt_tasks.fleet.housekeeping``       default   broadcast the local-repo housekeeping command
``prompt_tasks.expiry_sweep``       default   ledger and arrivals-index expiry
``prompt_tasks.fleet_gauges``       default   queue depths and worker liveness
=================================== ========= =================================================
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_process_init

from prompt_tasks.context import context_of
from prompt_tasks.daytime import catchup
from prompt_tasks.fleet import gauges, housekeeping
from prompt_tasks.store import metrics

__all__ = ["catchup_result", "catchup_run", "expiry_sweep", "fleet_gauges", "housekeeping_broadcast"]

log = logging.getLogger(__name__)


@shared_task(bind=True, name="prompt_tasks.catchup_run", ignore_result=True)
def catchup_run(self: Task, force: bool = False) -> dict[str, Any]:
    """Catch-up: redo failed detector-visits whose raws are in the bucket (in the window)."""
    ctx = context_of(self.app)
    if force:
        return catchup.run_catchup(self.app, ctx, force=True)
    return catchup.beat_run(self.app, ctx)


@shared_task(bind=True, name="prompt_tasks.catchup_result")
def catchup_result(self: Task, status: dict[str, Any], instrument: str, group: str, detector: int) -> dict[str, Any]:
    """The last link of a catch-up chain: record the attempt's outcome."""
    ctx = context_of(self.app)
    rec = catchup.finish_attempt(ctx.redis, status, instrument, group, int(detector),
                                 ctx.settings.catchup_max_attempts)
    return {"key": catchup.record_key(instrument, group, detector), "state": rec.state if rec else None}


@shared_task(bind=True, name="prompt_tasks.housekeeping", ignore_result=True)
def housekeeping_broadcast(self: Task) -> dict[str, Any]:
    """Ask every compute worker to housekeep its local repos."""
    return housekeeping.broadcast_housekeeping(self.app, context_of(self.app))


@shared_task(bind=True, name="prompt_tasks.expiry_sweep", ignore_result=True)
def expiry_sweep(self: Task) -> dict[str, int]:
    """Ledger and arrivals-index expiry."""
    ctx = context_of(self.app)
    return housekeeping.expiry_sweep(ctx.redis, ctx.settings)


@shared_task(bind=True, name="prompt_tasks.fleet_gauges", ignore_result=True)
def fleet_gauges(self: Task) -> dict[str, Any]:
    """Queue depths and worker liveness, for the metrics endpoint."""
    return gauges.fleet_gauges(self.app, context_of(self.app))


@worker_process_init.connect
def _count_pool_child(**_: Any) -> None:
    """Count each pool process started (replacements after memory limits or kills included)."""
    from celery import current_app

    try:
        metrics.count(context_of(current_app).redis, "pool_children")
    except Exception:  # metrics never stop a worker from starting
        log.debug("pool_children metric not written", exc_info=True)
