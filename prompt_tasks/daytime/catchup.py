"""Daytime catch-up: a durable record of every detector-visit that did not succeed, and its redo.

Occasional failures at night are acceptable because the failed detector-visits are processed
again during the day (DMTN-219). When a visit's summary is written (by the chord or by the
deadline), :func:`record_failures` records each detector that failed, timed out or was
aborted, with the stage, the reason and code, and what is needed to redo it: the
``next_visit`` (without the detector), the detector, the snaps expected and the bucket prefix
of its raws. Records live in Redis (:data:`CATCHUP_RECORDS`, one hash field per detector-visit,
plus :data:`CATCHUP_PENDING`, a sorted set by failure time), which the stack runs with append-only
persistence, so they survive a restart.

:func:`run_catchup` (``prompt-tasks catchup run`` and the beat job) picks the pending records
whose raws are now in the bucket (:func:`plan_runs`, pure) and sends each through the same
chain as at night, ``prepare_repo → wait_for_snap → ingest → run_pipeline``, then
:data:`RESULT_TASK`, every signature on the :data:`CATCHUP_QUEUE` queue. The compute workers
consume that queue besides their detector queues.

How that stays out of the night's way, honestly: Redis has no message priorities between
queues. A worker consuming several queues issues one ``BRPOP`` over all of them, rotating
their order (kombu's round-robin), so a worker with a long catch-up backlog would interleave
catch-up chains with its detector's visits. What keeps the night safe is that catch-up work
is only *sent* in the daytime window (``settings.catchup_window``) and only while no visit is
in flight (unless forced), in batches of at most ``settings.catchup_batch``, each chain
being one detector's four short stages. (RabbitMQ could give real per-message priorities with
``x-max-priority``; the separate queue keeps both brokers alike.)

A record is retried at most ``settings.catchup_max_attempts`` times, then ``abandoned``; an
``aborted`` detector-visit is recorded but never redone (the visit was aborted on purpose).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prompt_tasks.flow.snap import list_snaps
from prompt_tasks.model.status import Outcome
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import CATCHUP_PENDING, CATCHUP_RECORDS

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from prompt_tasks.context import Context
    from prompt_tasks.store.ledger import VisitRecord

__all__ = [
    "CATCHUP_QUEUE",
    "FAILED_OUTCOMES",
    "NOT_REDONE",
    "RESULT_TASK",
    "CatchupRecord",
    "beat_run",
    "failures_of",
    "finish_attempt",
    "in_window",
    "list_records",
    "plan_runs",
    "raws_present",
    "read_record",
    "record_failures",
    "record_key",
    "run_catchup",
    "send_chain",
]

log = logging.getLogger(__name__)

#: The low-priority queue catch-up chains run on (compute workers consume it).
CATCHUP_QUEUE = "catchup"
#: The task that ends a catch-up chain and settles its record.
RESULT_TASK = "prompt_tasks.catchup_result"
#: Outcomes that make a detector-visit a catch-up candidate.
FAILED_OUTCOMES: frozenset[str] = frozenset({Outcome.FAILED.value, Outcome.TIMED_OUT.value, Outcome.ABORTED.value})
#: Codes that are recorded but never redone.
NOT_REDONE: frozenset[str] = frozenset({"aborted"})

_CHAIN: tuple[str, ...] = (
    "prompt_tasks.prepare_repo",
    "prompt_tasks.wait_for_snap",
    "prompt_tasks.ingest",
    "prompt_tasks.run_pipeline",
)


@dataclass
class CatchupRecord:
    """One detector-visit that did not succeed, and what its redo needs."""

    instrument: str
    group: str
    detector: int
    stage: str
    outcome: str
    reason: str
    code: str
    failed_at: float
    #: The ``next_visit`` as announced (JSON dict, without ``detector``).
    visit: dict[str, Any] = field(default_factory=dict)
    #: Snaps expected (``nimages``; 0: unknown, at least one needed).
    expected_snaps: int = 0
    #: Bucket prefix under which the detector-visit's raws lie.
    raw_prefix: str = ""
    #: ``pending`` (waiting for a redo), ``queued`` (a redo was sent), ``done``, ``abandoned``.
    state: str = "pending"
    attempts: int = 0
    last_attempt: float | None = None
    resolved_at: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        """``instrument/group/detector``."""
        return record_key(self.instrument, self.group, self.detector)

    @property
    def redoable(self) -> bool:
        """False for detector-visits that must not be redone (aborted visits)."""
        return self.code not in NOT_REDONE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CatchupRecord:
        """Inverse of :meth:`to_dict` (unknown fields ignored)."""
        known = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
        return cls(**known)


def record_key(instrument: str, group: str, detector: int) -> str:
    """Field of a detector-visit in :data:`CATCHUP_RECORDS`."""
    return f"{instrument}/{group}/{int(detector)}"


# --------------------------------------------------------------------------- pure decisions


def in_window(window: str, now: datetime) -> bool:
    """True when ``now`` (UTC) falls in ``window``, written ``HH:MM-HH:MM`` (may wrap midnight)."""
    start_text, _, end_text = window.partition("-")

    def minutes(text: str) -> int:
        hours, _, mins = text.strip().partition(":")
        return int(hours) * 60 + int(mins or 0)

    start, end = minutes(start_text), minutes(end_text)
    current = now.astimezone(UTC).hour * 60 + now.astimezone(UTC).minute
    if start == end:
        return True
    if start < end:
        return start <= current < end
    return current >= start or current < end


def plan_runs(records: Iterable[CatchupRecord], present: Mapping[str, int], max_attempts: int,
              limit: int) -> list[CatchupRecord]:
    """The pending records to redo now, oldest failure first, at most ``limit``.

    ``present`` maps record keys to the number of their raws found in the bucket; a record is
    redone when it is pending, redoable, has attempts left and all its expected raws (at least
    one when unknown) are there.
    """
    chosen = []
    for rec in sorted(records, key=lambda r: (r.failed_at, r.key)):
        if rec.state != "pending" or not rec.redoable or rec.attempts >= max_attempts:
            continue
        if present.get(rec.key, 0) >= max(rec.expected_snaps, 1):
            chosen.append(rec)
        if len(chosen) >= limit:
            break
    return chosen


def failures_of(record: VisitRecord | None, summary: Mapping[str, Any], raw_prefix: Any = None,
                now: float | None = None) -> list[CatchupRecord]:
    """The catch-up records of a visit's summary: one per detector that did not succeed.

    ``raw_prefix`` is a callable ``(instrument, group, detector) -> str`` (the instrument's key
    scheme), or None.
    """
    instrument, group = str(summary.get("instrument", "")), str(summary.get("group", ""))
    visit = dict(record.visit) if record is not None else {}
    visit.pop("detector", None)
    now = time.time() if now is None else now
    out = []
    for det, entry in (summary.get("detectors") or {}).items():
        if entry.get("outcome") not in FAILED_OUTCOMES:
            continue
        detector = int(det)
        out.append(CatchupRecord(
            instrument=instrument, group=group, detector=detector,
            stage=str(entry.get("stage", "")), outcome=str(entry.get("outcome", "")),
            reason=str(entry.get("reason", "")), code=str(entry.get("code", "")),
            failed_at=now, visit=visit, expected_snaps=int(visit.get("nimages") or 0),
            raw_prefix=raw_prefix(instrument, group, detector) if callable(raw_prefix) else "",
        ))
    return out


# --------------------------------------------------------------------------- the record


def _save(client: redis.Redis, rec: CatchupRecord) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.hset(CATCHUP_RECORDS, rec.key, json.dumps(rec.to_dict(), sort_keys=True))
    if rec.state == "pending":
        pipe.zadd(CATCHUP_PENDING, {rec.key: rec.failed_at})
    else:
        pipe.zrem(CATCHUP_PENDING, rec.key)
    pipe.execute()


def read_record(client: redis.Redis, instrument: str, group: str, detector: int) -> CatchupRecord | None:
    """The record of one detector-visit, or None."""
    raw = client.hget(CATCHUP_RECORDS, record_key(instrument, group, detector))
    return CatchupRecord.from_dict(json.loads(raw)) if raw else None


def list_records(client: redis.Redis, states: Iterable[str] | None = None) -> list[CatchupRecord]:
    """Every record (or those in ``states``), oldest failure first."""
    wanted = set(states) if states is not None else None
    out = [CatchupRecord.from_dict(json.loads(raw)) for raw in client.hvals(CATCHUP_RECORDS)]
    return sorted((r for r in out if wanted is None or r.state in wanted), key=lambda r: (r.failed_at, r.key))


def _default_prefix(instrument: str, group: str, detector: int) -> str:
    try:
        from prompt_tasks.model.objectkeys import scheme_for

        return scheme_for(instrument).listing_prefix(instrument, group, detector)
    except Exception:  # an unknown scheme must not lose the record
        log.warning("no key scheme for %s", instrument, exc_info=True)
        return ""


def record_failures(client: redis.Redis, record: VisitRecord | None, summary: Mapping[str, Any]) -> int:
    """Record every failed detector-visit of a written summary; the number recorded.

    A detector-visit recorded before (a catch-up attempt that failed again) keeps its
    attempts and history; its reason becomes the latest.
    """
    written = 0
    for rec in failures_of(record, summary, _default_prefix):
        old = read_record(client, rec.instrument, rec.group, rec.detector)
        if old is not None:
            if old.state in ("done", "abandoned"):
                continue
            rec.attempts, rec.history, rec.failed_at = old.attempts, old.history, old.failed_at
            if old.state == "queued":  # the catch-up chain's own result settles it
                continue
        _save(client, rec)
        written += 1
    if written:
        log.warning("%d detector-visits of %s/%s recorded for catch-up", written,
                    summary.get("instrument"), summary.get("group"))
    return written


def finish_attempt(client: redis.Redis, status: Mapping[str, Any], instrument: str, group: str,
                   detector: int, max_attempts: int, now: float | None = None) -> CatchupRecord | None:
    """Settle a catch-up attempt from the chain's final status: done, pending again or abandoned."""
    rec = read_record(client, instrument, group, detector)
    if rec is None:
        return None
    now = time.time() if now is None else now
    outcome = str(status.get("outcome", ""))
    rec.history.append({"t": now, "outcome": outcome, "stage": status.get("stage", ""),
                        "reason": status.get("reason", ""), "code": status.get("code", "")})
    if outcome == Outcome.OK.value:
        rec.state, rec.resolved_at = "done", now
    else:
        rec.reason, rec.code = str(status.get("reason", "")), str(status.get("code", ""))
        rec.stage, rec.outcome = str(status.get("stage", "")), outcome
        rec.state = "abandoned" if rec.attempts >= max_attempts or not rec.redoable else "pending"
    _save(client, rec)
    return rec


# --------------------------------------------------------------------------- redoing


def raws_present(ctx: Context, rec: CatchupRecord) -> int:
    """How many of the record's raws are in the bucket now (indexing them as arrived)."""

    return len(list_snaps(ctx, rec.instrument, rec.group, rec.detector))


def send_chain(app: Celery, rec: CatchupRecord) -> str:
    """Send the record's chain on :data:`CATCHUP_QUEUE`; the chain's id."""
    from celery import chain

    kwargs = {"visit": rec.visit, "detector": rec.detector}
    steps = [app.signature(name, kwargs=dict(kwargs), queue=CATCHUP_QUEUE) for name in _CHAIN]
    steps.append(app.signature(RESULT_TASK, kwargs={"instrument": rec.instrument, "group": rec.group,
                                                    "detector": rec.detector}, queue=CATCHUP_QUEUE))
    return str(chain(*steps).apply_async().id)


def _succeeded_late(client: redis.Redis, rec: CatchupRecord) -> bool:
    """Settle ``rec`` as done if its chain finished ok after the summary gave up on it."""

    visit = ledger.read_visit(client, rec.instrument, rec.group)
    det = visit.detectors.get(rec.detector) if visit is not None else None
    if det is None or not det.final or det.outcome != Outcome.OK.value:
        return False
    finish_attempt(client, {"outcome": "ok", "stage": det.stage, "reason": "completed after the summary"},
                   rec.instrument, rec.group, rec.detector, max_attempts=rec.attempts + 1)
    return True


def run_catchup(app: Celery, ctx: Context, limit: int | None = None, force: bool = False,
                dry_run: bool = False, now: float | None = None) -> dict[str, Any]:
    """Redo the pending records whose raws are in the bucket (see the module docstring).

    Without ``force`` nothing is sent while a visit is in flight. Returns what was decided:
    ``sent`` (record keys), ``waiting`` (pending but raws missing), ``skipped`` (why nothing
    was sent, if so).
    """

    settings = ctx.settings
    client = ctx.redis
    if not force and ledger.in_flight(client, limit=1):
        return {"sent": [], "waiting": [], "skipped": "visits in flight"}
    pending = [r for r in list_records(client, ["pending"])
               if r.redoable and r.attempts < settings.catchup_max_attempts]
    pending = [r for r in pending if not _succeeded_late(client, r)]
    present: dict[str, int] = {}
    for rec in pending:
        try:
            present[rec.key] = raws_present(ctx, rec)
        except Exception:  # S3 unreachable: try again next time
            log.warning("catch-up: listing raws of %s failed", rec.key, exc_info=True)
    chosen = plan_runs(pending, present, settings.catchup_max_attempts,
                       settings.catchup_batch if limit is None else limit)
    sent = []
    now = time.time() if now is None else now
    for rec in chosen:
        if dry_run:
            sent.append(rec.key)
            continue
        rec.attempts += 1
        rec.state, rec.last_attempt = "queued", now
        _save(client, rec)
        try:
            send_chain(app, rec)
        except Exception:
            rec.attempts -= 1
            rec.state = "pending"
            _save(client, rec)
            raise
        sent.append(rec.key)
    waiting = sorted(r.key for r in pending if r.key not in set(sent))
    if sent:
        log.info("catch-up: %s %d detector-visits", "would redo" if dry_run else "sent", len(sent))
    return {"sent": sent, "waiting": waiting, "skipped": ""}


def beat_run(app: Celery, ctx: Context, now: datetime | None = None) -> dict[str, Any]:
    """The beat job: :func:`run_catchup` inside the daytime window, nothing outside it."""
    now = now or datetime.now(UTC)
    if not in_window(ctx.settings.catchup_window, now):
        return {"sent": [], "waiting": [], "skipped": f"outside {ctx.settings.catchup_window} UTC"}
    return run_catchup(app, ctx)
