"""The visit's Celery tasks: the four detector stages, the summary and the visit deadline.

Tasks are thin ``shared_task`` wrappers (so they bind to whichever app imports this module)
around plain functions that take a :class:`~prompt_tasks.context.Context`. Every argument
and result is JSON. The router (:mod:`prompt_tasks.flow.router`) sends them by name with the queue
set on every signature:

=============================== ==================== ===========================================
task                            queue                job
=============================== ==================== ===========================================
``prompt_tasks.prepare_repo``   detector.<I>.<NNN>   prepare the detector's local repo (preload)
``prompt_tasks.wait_for_snap``  wait                 wait until the detector's snaps are in
``prompt_tasks.butler.ingest``         detector.<I>.<NNN>   ingest the snaps into the local repo
``prompt_tasks.run_pipeline``   detector.<I>.<NNN>   run the science pipeline
``prompt_tasks.summarize_visit`` summary             the chord callback: write the summary
``prompt_tasks.visit_deadline`` summary              the summary if the chord is late
``prompt_tasks.butler.export``         export               outputs to the central repo, batched
=============================== ==================== ===========================================

``wait_for_snap`` runs :func:`prompt_tasks.flow.snap.wait_for_snaps`; ``prepare_repo``, ``ingest``
and ``run_pipeline`` run the Butler work of :mod:`prompt_tasks.butler.stages` (or, with
``settings.payload == "noop"``, only the framework's bookkeeping); the ledger bookkeeping,
retries and the fault-injection keys of :func:`prompt_tasks.flow.stage.check_fault` are the base
task's (:class:`~prompt_tasks.flow.stage.StageTask`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery import Task, current_app, shared_task
from celery.signals import worker_init, worker_process_init
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from prompt_tasks.butler.stages import export_pending, import_pipeline_tasks, prepare, run, warm_process, warm_writer
from prompt_tasks.butler.stages import ingest as ingest_snaps
from prompt_tasks.butler.writer import import_ahead as import_writer_ahead
from prompt_tasks.context import Context, context_of, settings_of
from prompt_tasks.daytime.catchup import record_failures
from prompt_tasks.errors import RetryLater
from prompt_tasks.fleet.roles import is_compute_node, is_writer_node
from prompt_tasks.flow.policy import policy_options
from prompt_tasks.flow.snap import wait_for_snaps
from prompt_tasks.flow.stage import StageTask
from prompt_tasks.heap import settle_heap
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.model.visit import expected_end_utc
from prompt_tasks.store import ledger

__all__ = [
    "deadline_summary",
    "export",
    "ingest",
    "placeholder_stage",
    "prepare_repo",
    "run_pipeline",
    "summarize_visit",
    "visit_deadline",
    "visit_summary",
    "wait_for_snap",
]

_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)
log = logging.getLogger(__name__)


def _ahead(what: str, work: Callable[[], Sequence[str] | None]) -> None:
    """Do start-up ``work`` (what a first task would otherwise pay for) and log how it went; a
    failure is logged and left to the tasks, which report it (a missing central repo, as on a
    fresh stack before anything made it, in one line)."""
    started = time.process_time()
    try:
        names = work()
    except FileNotFoundError as exc:
        log.info("%s: not done, %s", what, exc)
    except Exception:  # a worker and its pool processes always start
        log.warning("%s: failed", what, exc_info=True)
    else:
        log.info("%s: done%s (%.1f CPU-s)", what, f", {', '.join(names) or '-'}" if names is not None else "",
                 time.process_time() - started)


@worker_init.connect
def _import_pipelines_before_fork(sender: Any = None, **_: Any) -> None:
    """A compute worker imports its pipelines' task code before forking its pool (see
    :func:`~prompt_tasks.butler.stages.import_pipeline_tasks`): no pool child pays for it on
    the first visit it runs; the registry writer's worker imports the Butler's modules the same
    way (:func:`~prompt_tasks.butler.writer.import_ahead`). Every worker then settles its heap
    (:func:`~prompt_tasks.heap.settle_heap`), and its pool children inherit it settled."""
    node, app = getattr(sender, "hostname", None) or "", getattr(sender, "app", None)
    if app is not None and settings_of(app).payload != "noop":
        if is_compute_node(node):
            _ahead("importing the pipelines ahead of the pool", lambda: import_pipeline_tasks(settings_of(app)))
        elif is_writer_node(node):
            _ahead("importing the registry writer's modules ahead of the pool", import_writer_ahead)
    settle_heap()


@worker_process_init.connect
def _warm_pool_process(**_: Any) -> None:
    """Each pool process of a compute worker opens the central repo and loads its pipelines as
    it starts (:func:`~prompt_tasks.butler.stages.warm_process`), not on the first visit it
    runs: a worker's slots each start cold, and the second slot's first visit is often the
    detector's second (``worker_proc_alive_timeout`` leaves it the time). A pool process of the
    registry writer's worker opens the central repo (:func:`~prompt_tasks.butler.stages.warm_writer`).
    Every pool process then settles its warm heap."""
    app = current_app
    node = getattr(app, "prompt_node_name", "") or ""
    if settings_of(app).payload != "noop":
        if is_compute_node(node):
            _ahead("warming the pool process", lambda: warm_process(context_of(app)))
        elif is_writer_node(node):
            _ahead("opening the central repo ahead", lambda: warm_writer(context_of(app)))
    settle_heap()


# --------------------------------------------------------------------------- plain functions


def placeholder_stage(ctx: Context, stage: str, visit: Mapping[str, Any], detector: int) -> StageStatus:
    """A stage body that succeeds (until the real one lands); faults are injected by the base task."""
    del ctx
    instrument, group = str(visit["instrument"]), str(visit["groupId"])
    return StageStatus(stage, Outcome.OK, instrument, group, int(detector), data={"placeholder": True})


def visit_summary(ctx: Context, instrument: str, group: str,
                  statuses: Sequence[Mapping[str, Any]] | None, by: str) -> dict[str, Any]:
    """Build and write a visit's summary (first writer wins); the summary, with ``written``."""
    record = ledger.read_visit(ctx.redis, instrument, group)
    now = time.time()
    summary = ledger.build_summary(record, instrument, group, statuses, by=by, now=now)
    written = ledger.write_summary(ctx.redis, instrument, group, summary, by=by,
                                   ttl_s=ctx.settings.ledger_ttl_s, when=now)
    if written:  # every detector-visit that did not succeed is kept for daytime catch-up
        record_failures(ctx.redis, record, summary)
    return {**summary, "written": written}


def deadline_summary(ctx: Context, instrument: str, group: str) -> dict[str, Any]:
    """At the visit's deadline: write the summary from the ledger if nobody has yet."""
    record = ledger.read_visit(ctx.redis, instrument, group)
    if record is None or record.summary is not None:
        return {"instrument": instrument, "group": group, "by": "deadline", "written": False}
    return visit_summary(ctx, instrument, group, None, by="deadline")


# --------------------------------------------------------------------------- stage tasks


@shared_task(bind=True, base=StageTask, name="prompt_tasks.prepare_repo", stage="prepare",
             chained=False, **policy_options("prepare"))
def prepare_repo(self: Task, visit: dict[str, Any], detector: int) -> StageStatus:
    """Select the visit's pipelines and preload the detector's local repository.

    See :func:`prompt_tasks.butler.stages.prepare`; with ``settings.payload == "noop"`` the
    stage only does the framework's bookkeeping (benchmarks, drills).
    """
    ctx = context_of(self.app)
    if ctx.settings.payload == "noop":
        return placeholder_stage(ctx, "prepare", visit, detector)

    return prepare(ctx, visit, int(detector))


@shared_task(bind=True, base=StageTask, name="prompt_tasks.wait_for_snap", stage="wait",
             chained=True, **policy_options("wait"))
def wait_for_snap(self: Task, status: dict[str, Any], visit: dict[str, Any], detector: int) -> StageStatus:
    """Wait until every snap of the detector-visit is in the bucket (:mod:`prompt_tasks.flow.snap`).

    Times out at the visit's expected end (``startTime + duration``, TAI converted to the
    machine's UTC clock) plus ``settings.wait_margin_s``.
    """

    ctx = context_of(self.app)
    instrument, group = str(visit["instrument"]), str(visit["groupId"])
    expected_end = expected_end_utc(float(visit.get("startTime") or 0.0), float(visit.get("duration") or 0.0))
    return wait_for_snaps(ctx, instrument, group, int(detector), int(visit.get("nimages") or 0), expected_end)


@shared_task(bind=True, base=StageTask, name="prompt_tasks.ingest", stage="ingest",
             chained=True, **policy_options("ingest"))
def ingest(self: Task, status: dict[str, Any], visit: dict[str, Any], detector: int) -> StageStatus:
    """Ingest the snaps ``wait_for_snap`` found into the detector's local repository.

    See :func:`prompt_tasks.butler.stages.ingest` (a bad raw fails this detector-visit).
    """
    ctx = context_of(self.app)
    if ctx.settings.payload == "noop":
        return placeholder_stage(ctx, "ingest", visit, detector)

    return ingest_snaps(ctx, visit, int(detector), status)


@shared_task(bind=True, base=StageTask, name="prompt_tasks.run_pipeline", stage="run",
             chained=True, **policy_options("run"))
def run_pipeline(self: Task, status: dict[str, Any], visit: dict[str, Any], detector: int) -> StageStatus:
    """Run the first candidate pipeline with work, in-process, then queue its export.

    See :func:`prompt_tasks.butler.stages.run`; the ``export`` task writes the outputs to the
    central repo.
    """
    ctx = context_of(self.app)
    if ctx.settings.payload == "noop":
        return placeholder_stage(ctx, "run", visit, detector)

    return run(ctx, visit, int(detector), status, poke_export=lambda: export.apply_async(queue="export"))


@shared_task(bind=True, name="prompt_tasks.export", autoretry_for=(RetryLater,), retry_backoff=2,
             retry_backoff_max=60, max_retries=30)
def export(self: Task, force: bool = False) -> dict[str, Any]:
    """Write queued pipeline outputs to the central repo in batches (queue ``export``).

    One writer at a time (a Redis lock); a partial batch waits for its age, with one delayed
    export scheduled; a failure retries the export, never the pipeline
    (:func:`prompt_tasks.butler.stages.export_pending`).
    """

    def later(delay: float) -> None:
        export.apply_async(countdown=delay, queue="export")

    ctx = context_of(self.app)
    started = time.time()
    done = export_pending(ctx, later, force=bool(force))
    try:  # the export latency beside the detector stages' (metrics never fail the export)
        from prompt_tasks.store.metrics import observe

        observe(ctx.redis, "stage", time.time() - started, stage="export")
    except Exception:
        logging.getLogger(__name__).debug("export metric not written", exc_info=True)
    return done


# --------------------------------------------------------------------------- visit tasks


@shared_task(bind=True, name="prompt_tasks.summarize_visit", autoretry_for=_REDIS_ERRORS,
             retry_backoff=1, retry_backoff_max=30, max_retries=10)
def summarize_visit(self: Task, statuses: list[dict[str, Any]], instrument: str, group: str) -> dict[str, Any]:
    """The chord callback: the visit's summary from every detector's final status."""
    return visit_summary(context_of(self.app), instrument, group, statuses, by="chord")


@shared_task(bind=True, name="prompt_tasks.visit_deadline", autoretry_for=_REDIS_ERRORS,
             retry_backoff=1, retry_backoff_max=30, max_retries=10)
def visit_deadline(self: Task, instrument: str, group: str) -> dict[str, Any]:
    """The visit's deadline: summarize from the ledger unless the chord already did."""
    return deadline_summary(context_of(self.app), instrument, group)
