"""The Celery base task of every detector stage: statuses instead of exceptions.

:class:`StageTask` wraps each stage body so that

- a stage handed a status that is not ``ok`` passes it on unchanged (the chain short-circuits
  and the visit's summary still sees the detector);
- :class:`~prompt_tasks.errors.RetryLater`, and any error :mod:`prompt_tasks.flow.retry` deems
  transient (Redis, broker, S3, registry unreachable), becomes ``self.retry`` with exponential
  backoff and jitter, at most ``max_retries`` times (the stage's
  :class:`~prompt_tasks.flow.policy.StagePolicy`); after that, a failed status;
- any other exception, a soft time limit included, becomes a failed status with the error's
  stable code and reason: nothing raises out of a chain, so the chord always completes;
- a task delivered more than ``settings.max_deliveries`` times (its worker died under it each
  time: ``acks_late`` + ``task_reject_on_worker_lost`` redeliver it) fails without running;
- a redelivered task whose stage the ledger already shows done ok (catch-up, or another
  delivery, redid the detector-visit while the message waited out the visibility timeout)
  returns ``ok`` without running and without touching the ledger: a late redelivery never
  runs a pipeline twice nor turns a done detector-visit into another outcome;
- the ledger gets the start and end of the stage and the detector's status, and the status
  names the worker that ran it (``data["worker"]``) and, in a process that runs one task at a
  time (a prefork pool child), the CPU seconds the stage used (``data["cpu_s"]``: the
  benchmark's CPU accounting by stage);
- every log line inside carries the detector-visit (:func:`prompt_tasks.logs.bound`); the
  stage's duration, outcome, failure code, retries and redeliveries go to the fleet metrics
  (:mod:`prompt_tasks.store.metrics`); with ``settings.task_events`` a ``task-stage`` event
  (``phase`` start/end) reports progress to Flower and any event consumer.

Task bodies never call ``retry`` themselves. A stage task is declared with
``shared_task(bind=True, base=StageTask, stage="<stage>", chained=<bool>, **policy_options(stage))`` (:mod:`prompt_tasks.flow.policy`)
and takes ``visit`` (the next_visit as a JSON dict) and ``detector`` keyword arguments; a
chained stage gets the previous stage's status as its first positional argument.

Fault injection (tests and operations): a Redis key ``fault:{instrument}:{group}:{detector}:{stage}``
makes :func:`check_fault` (called by the base task before every stage body) raise: ``fail`` a permanent
error, ``retry`` a :class:`RetryLater`, ``sleep:<seconds>`` a stall, ``crash`` a plain
exception; ``pass`` skips the body and succeeds. See :func:`fault_key`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.signals import worker_init

from prompt_tasks.context import Context, context_of
from prompt_tasks.errors import PermanentError, RetryLater
from prompt_tasks.flow import retry
from prompt_tasks.flow.policy import POLICIES, retry_countdown
from prompt_tasks.logs import bound
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.store import ledger, metrics
from prompt_tasks.store.keys import fault_key, visit_key

if TYPE_CHECKING:
    import redis

__all__ = [
    "StageTask",
    "check_fault",
    "failed_status",
]

log = logging.getLogger(__name__)


def failed_status(stage: str, instrument: str, group: str, detector: int, exc: BaseException,
                  outcome: Outcome = Outcome.FAILED) -> StageStatus:
    """The status of a stage that raised ``exc``."""
    if isinstance(exc, SoftTimeLimitExceeded):
        code, reason = "time_limit", f"{stage}: soft time limit exceeded"
    else:
        code = getattr(exc, "code", None) or "internal"
        reason = f"{type(exc).__name__}: {exc}"
    return StageStatus(stage, outcome, instrument, group, int(detector), reason=reason, code=str(code))


def check_fault(client: redis.Redis, instrument: str, group: str, detector: int, stage: str) -> bool:
    """Apply the fault injected for this stage, if any (see the module docstring).

    The value is one mode or several separated by commas, applied in order: ``sleep:<s>``
    stalls, ``pass`` makes the stage succeed without running its body (returns True: cheap
    stand-in stages for fault drills), ``retry`` raises :class:`RetryLater`, ``crash`` a plain
    exception, anything else a :class:`PermanentError`. The detector's own key wins over the
    visit-wide one (``detector="*"``).
    """
    own, every = client.mget([fault_key(instrument, group, detector, stage), fault_key(instrument, group, "*", stage)])
    value = own or every
    if not value:
        return False
    for mode in str(value.decode() if isinstance(value, bytes) else value).split(","):
        mode = mode.strip()
        if mode.startswith("sleep:"):
            time.sleep(float(mode.partition(":")[2]))
        elif mode == "pass":
            return True
        elif mode == "retry":
            raise RetryLater(f"injected transient fault in {stage}", delay=0.05)
        elif mode == "crash":
            raise RuntimeError(f"injected crash in {stage}")
        elif mode:
            raise PermanentError(f"injected fault in {stage}: {mode}")
    return False


class StageTask(Task):
    """Base class of the detector stage tasks (see the module docstring)."""

    #: Stage name (``prepare``, ``wait``, ``ingest``, ``run``); set by the task decorator.
    stage: str = ""
    #: True when the task's first positional argument is the previous stage's status.
    chained: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        instrument, group, detector, log_fields = self.identify(kwargs)
        if self.chained and args:
            previous = StageStatus.from_dict(args[0])
            if not previous.ok:
                return previous.to_dict()
        with bound(instrument=instrument, group=group, detector=detector, stage=self.stage, **log_fields):
            return self._run_stage(args, kwargs, instrument, group, detector).to_dict()

    def identify(self, kwargs: dict[str, Any]) -> tuple[str, str, int, dict[str, Any]]:
        """Hook: the detector-visit a call is about (instrument, group, detector, log fields)."""
        visit = kwargs.get("visit") or {}
        instrument, group = str(visit.get("instrument", "")), str(visit.get("groupId", ""))
        return instrument, group, int(kwargs.get("detector", -1)), {"visit": f"{instrument}/{group}"}

    def record_start(self, ctx: Context, instrument: str, group: str, detector: int) -> None:
        """Hook: note the first attempt's start (the visit ledger's ``<stage>.start`` stamp)."""
        self._stamp(ctx, instrument, group, detector, f"{self.stage}.start", ctx.settings.ledger_ttl_s)

    def already_done(self, ctx: Context, instrument: str, group: str, detector: int) -> str | None:
        """Hook: the worker that already finished this stage ok for the detector-visit, if any."""
        return ledger.stage_done(ctx.redis, instrument, group, detector, self.stage)

    def record_end(self, ctx: Context, status: StageStatus, kwargs: dict[str, Any]) -> None:
        """Hook: keep the final status (the visit ledger's detector record)."""
        ledger.record_stage_end(ctx.redis, status, ctx.settings.ledger_ttl_s, worker=status.data["worker"])

    def _run_stage(self, args: tuple[Any, ...], kwargs: dict[str, Any], instrument: str, group: str,
                   detector: int) -> StageStatus:
        ctx = context_of(self.app)
        worker = self._node_name()
        deliveries = self._deliveries(ctx)
        started, cpu_started = time.time(), time.process_time()
        if deliveries > ctx.settings.max_deliveries:
            status = StageStatus(self.stage, Outcome.FAILED, instrument, group, detector,
                                 reason=f"{self.stage}: {retry.redelivered_reason(deliveries)}",
                                 code=retry.REDELIVERED_CODE)
            log.error("%s given up: %s", self.stage, status.reason)
        elif deliveries > 1 and (done_by := self._done_by(ctx, instrument, group, detector)) is not None:
            log.warning("%s redelivered after %s finished it: nothing to do", self.stage, done_by)
            return StageStatus(self.stage, Outcome.OK, instrument, group, detector,
                               reason=f"already done by {done_by}", data={"worker": done_by, "redelivered": True})
        else:
            if not self.request.retries:
                self.record_start(ctx, instrument, group, detector)
            self._progress("start", instrument, group, detector, worker)
            status = self._body(ctx, args, kwargs, instrument, group, detector)
        status.data.setdefault("worker", worker)
        if _one_task_per_process():
            status.data["cpu_s"] = round(time.process_time() - cpu_started, 4)
        try:
            self.record_end(ctx, status, kwargs)
        except Exception:  # noqa: BLE001 - bookkeeping must not lose the status
            self._log_ledger_failure(status)
        self._measure(ctx, status, time.time() - started)
        self._progress("end", instrument, group, detector, worker, status)
        return status

    def _body(self, ctx: Context, args: tuple[Any, ...], kwargs: dict[str, Any], instrument: str,
              group: str, detector: int) -> StageStatus:
        """Run the stage body; a status whatever happens (or ``Retry`` raised for a retry)."""
        try:
            if self.stage == "run":
                self._measure_snap_to_run(ctx, instrument, group, detector)
            if check_fault(ctx.redis, instrument, group, detector, self.stage):
                return StageStatus(self.stage, Outcome.OK, instrument, group, detector,
                                   data={"placeholder": True})
            status = super().__call__(*args, **kwargs)
            return status if isinstance(status, StageStatus) else StageStatus.from_dict(status)
        except Retry:
            raise
        except SoftTimeLimitExceeded as exc:
            return failed_status(self.stage, instrument, group, detector, exc)
        except Exception as exc:  # noqa: BLE001 - a stage never raises out of its chain
            transient = retry.as_retry(exc)
            if transient is None:
                return failed_status(self.stage, instrument, group, detector, exc)
            policy = POLICIES[self.stage]
            if self.request.retries < policy.max_retries:
                hint = exc.delay if isinstance(exc, RetryLater) else None
                countdown = retry_countdown(self.stage, self.request.retries, hint)
                log.warning("%s: transient error, retry %d in %.2f s: %s", self.stage,
                            self.request.retries + 1, countdown, transient)
                self._count(ctx, "retries", stage=self.stage)
                try:
                    raise self.retry(countdown=countdown, max_retries=policy.max_retries) from exc
                except Retry:
                    raise
                except Exception as unsent:  # the broker is gone too: fail now, with the reason
                    log.warning("%s: retry could not be sent: %s", self.stage, unsent, exc_info=True)
                    status = failed_status(self.stage, instrument, group, detector, exc)
                    status.code = "transient"
                    status.reason = f"retry not sent ({type(unsent).__name__}): {status.reason}"
                    return status
            status = failed_status(self.stage, instrument, group, detector, exc)
            status.code = status.code if isinstance(exc, RetryLater) else "transient"
            status.reason = f"gave up after {self.request.retries} retries: {status.reason}"
            return status

    def _done_by(self, ctx: Context, instrument: str, group: str, detector: int) -> str | None:
        try:
            return self.already_done(ctx, instrument, group, detector)
        except Exception:  # when unsure, run the (idempotent) stage again
            log.warning("could not tell whether %s is done already", self.stage, exc_info=True)
            return None

    def _deliveries(self, ctx: Context) -> int:
        """Count this delivery of this attempt; 1 when counting is impossible (Redis down)."""
        task_id = self.request.id
        if not task_id:
            return 1
        try:
            deliveries = retry.count_delivery(ctx.redis, str(task_id), int(self.request.retries or 0))
        except Exception:  # never refuse work because bookkeeping failed
            log.warning("delivery count failed", exc_info=True)
            return 1
        if deliveries > 1:
            log.warning("%s delivered %d times", self.stage, deliveries)
            self._count(ctx, "redeliveries", stage=self.stage)
        return deliveries

    def _measure(self, ctx: Context, status: StageStatus, seconds: float) -> None:
        try:
            metrics.observe(ctx.redis, "stage", seconds, stage=self.stage)
            metrics.count(ctx.redis, "outcomes", outcome=status.outcome.value, stage=self.stage)
            if not status.ok:
                metrics.count(ctx.redis, "failures", stage=self.stage, code=status.code or "none")
        except Exception:  # metrics never fail a stage
            log.debug("metrics write failed", exc_info=True)

    def _measure_snap_to_run(self, ctx: Context, instrument: str, group: str, detector: int) -> None:
        """Latency from the detector's last snap arrival to the start of its pipeline run."""
        try:
            # Only this detector's snap fields: the whole record of a 189-detector visit is
            # ~6000 fields, and reading it for every detector made the metric O(detectors²).
            pattern = ledger.detector_field(detector, "snap.*")
            arrivals = [float(value) for _, value in ctx.redis.hscan_iter(
                visit_key(instrument, group), match=pattern, count=10_000)]
            if arrivals:
                metrics.observe(ctx.redis, "snap_to_run", max(0.0, time.time() - max(arrivals)))
        except Exception:  # metrics never fail a stage
            log.debug("snap_to_run metric failed", exc_info=True)

    @staticmethod
    def _count(ctx: Context, name: str, **labels: str) -> None:
        try:
            metrics.count(ctx.redis, name, **labels)
        except Exception:  # metrics never fail a stage
            log.debug("metrics write failed", exc_info=True)

    def _progress(self, phase: str, instrument: str, group: str, detector: int, worker: str,
                  status: StageStatus | None = None) -> None:
        """Send a ``task-stage`` event (Flower shows custom task events; monitors may follow),
        when the fleet sends task events from the start (``settings.task_events``)."""
        if not self.request.id or self.request.called_directly or not context_of(self.app).settings.task_events:
            return
        fields: dict[str, Any] = {"phase": phase, "stage": self.stage, "instrument": instrument,
                                  "group": group, "detector": detector, "worker": worker}
        if status is not None:
            fields.update(outcome=status.outcome.value, code=status.code)
        try:
            self.send_event("task-stage", retry=False, **fields)
        except Exception:  # progress events are best effort
            log.debug("task-stage event not sent", exc_info=True)

    def _node_name(self) -> str:
        """The node name (``detector-1@host``) of the worker running this task.

        ``request.hostname`` is the node name in ``celery worker`` processes; a worker embedded
        in a test process reports the machine's name there, so fall back to the name it
        announced at start-up (:func:`_remember_node_name`).
        """
        hostname = str(self.request.hostname or "")
        if "@" in hostname:
            return hostname
        return str(getattr(self.app, "prompt_node_name", None) or hostname)

    def _stamp(self, ctx: Context, instrument: str, group: str, detector: int, name: str,
               ttl: int) -> None:
        try:
            ledger.stamp(ctx.redis, instrument, group, detector, name, ttl)
        except Exception:  # noqa: BLE001 - bookkeeping must not fail the stage
            from celery.utils.log import get_task_logger

            get_task_logger(__name__).warning("ledger stamp %s failed", name, exc_info=True)

    @staticmethod
    def _log_ledger_failure(status: StageStatus) -> None:
        from celery.utils.log import get_task_logger

        get_task_logger(__name__).warning(
            "ledger write failed for %s/%s detector %s", status.instrument, status.group,
            status.detector, exc_info=True,
        )


def _one_task_per_process() -> bool:
    """True unless gevent runs many tasks in this process (its CPU time is then no one stage's)."""
    monkey = sys.modules.get("gevent.monkey")
    return not (monkey is not None and monkey.is_module_patched("socket"))


@worker_init.connect
def _remember_node_name(sender: Any = None, **_: Any) -> None:
    """Keep the worker's node name on its app, for :meth:`StageTask._node_name`."""
    app, hostname = getattr(sender, "app", None), getattr(sender, "hostname", None)
    if app is not None and hostname:
        app.prompt_node_name = hostname
