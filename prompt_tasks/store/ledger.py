"""The visit ledger: one Redis hash per visit, written by the router and the tasks themselves.

Layout of the hash at ``visit:{instrument}:{group}`` (the events dispatcher tests this key's
existence to know a visit was announced)::

    instrument, group, visit (JSON), detectors (JSON), received, expected_end, deadline,
    chord_id
    dNNN.<stage>.start / dNNN.<stage>.end    stage times (stage: prepare, wait, ingest, run)
    dNNN.snap.<n>                            arrival time of snap n
    dNNN.<stage>.worker                      node name of the worker that ran the stage
    dNNN.outcome, dNNN.stage, dNNN.reason,   the latest status of the detector-visit
    dNNN.code, dNNN.worker
    summary (JSON), summarized, summary_by   written once: first writer wins

Every write is one pipelined ``HSET`` (plus ``EXPIRE``), so a stamp costs one round trip.
Visits are also indexed by received time in two sorted sets: :data:`VISITS_INFLIGHT` (until their
summary is written) and :data:`VISITS_RECENT` (every visit within the ledger's lifetime). Reading
turns the raw hash into a typed :class:`VisitRecord` with pure functions.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.store.keys import VISITS_INFLIGHT, VISITS_RECENT, visit_key

if TYPE_CHECKING:
    import redis

    from prompt_tasks.model.visit import NextVisit

__all__ = [
    "DEADLINE_CODE",
    "DEADLINE_REASON",
    "STAGES",
    "STATES",
    "DetectorRecord",
    "VisitRecord",
    "build_summary",
    "create_visit",
    "delete_visit",
    "detector_field",
    "in_flight",
    "index_member",
    "parse_record",
    "read_visit",
    "recent",
    "record_stage_end",
    "set_fields",
    "stage_done",
    "stamp",
    "stamp_snap",
    "write_summary",
]

#: The detector stages in chain order.
STAGES: tuple[str, ...] = ("prepare", "wait", "ingest", "run")
#: The states a detector-visit is counted in (:attr:`DetectorRecord.state`).
STATES: tuple[str, ...] = ("waiting", "running", "ok", "failed", "skipped")
#: Code and reason of a detector that had no final status when its visit's deadline passed.
DEADLINE_CODE = "deadline"
DEADLINE_REASON = "deadline: no result"


def index_member(instrument: str, group: str) -> str:
    """Member of a visit in the index sorted sets (the visit key ``instrument/group``)."""
    return f"{instrument}/{group}"


def detector_field(detector: int, name: str) -> str:
    """Hash field ``dNNN.<name>`` of one detector."""
    return f"d{int(detector):03d}.{name}"


# --------------------------------------------------------------------------- writing

# Create the record only if it does not exist (idempotent announce), then index it.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[2] - ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2] - ARGV[1])
return 1
"""

# Write the summary only if nobody did (first writer wins), and take the visit out of flight.
_SUMMARY = """
if redis.call('HEXISTS', KEYS[1], 'summary') == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


def _encode(mapping: Mapping[str, Any]) -> dict[str, str]:
    """Hash values as strings: strings as they are, anything else as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in mapping.items()}


def _flat(mapping: Mapping[str, Any]) -> list[str]:
    """``field, value, field, value...`` for a script's ``HSET``."""
    return [item for pair in _encode(mapping).items() for item in pair]


def create_visit(
    client: redis.Redis,
    visit: NextVisit,
    detectors: Sequence[int],
    ttl_s: int,
    deadline: float,
    received: float | None = None,
) -> bool:
    """Create the ledger record of ``visit`` atomically; False if it already exists.

    This is what makes an announcement idempotent per (instrument, group).
    """
    received = time.time() if received is None else received
    fields = {
        "instrument": visit.instrument,
        "group": visit.groupId,
        "visit": json.dumps(visit.to_json_dict(), sort_keys=True),
        "detectors": json.dumps([int(d) for d in detectors]),
        "received": repr(received),
        "expected_end": repr(visit.expected_end),
        "deadline": repr(deadline),
    }
    created = client.eval(
        _CREATE, 3, visit_key(visit.instrument, visit.groupId), VISITS_INFLIGHT, VISITS_RECENT,
        int(ttl_s), repr(received), index_member(visit.instrument, visit.groupId), *_flat(fields),
    )
    return bool(created)


def delete_visit(client: redis.Redis, instrument: str, group: str) -> None:
    """Remove a visit's record and index entries (an announcement that could not be sent)."""
    member = index_member(instrument, group)
    pipe = client.pipeline(transaction=True)
    pipe.delete(visit_key(instrument, group))
    pipe.zrem(VISITS_INFLIGHT, member)
    pipe.zrem(VISITS_RECENT, member)
    pipe.execute()


def set_fields(client: redis.Redis, instrument: str, group: str, fields: Mapping[str, Any],
               ttl_s: int) -> None:
    """``HSET`` visit-level ``fields`` (strings, or JSON-encoded), keeping the record's expiry."""
    key = visit_key(instrument, group)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, mapping=_encode(fields))
    pipe.expire(key, int(ttl_s))
    pipe.execute()


def stamp(client: redis.Redis, instrument: str, group: str, detector: int, name: str,
          ttl_s: int, when: float | None = None, **extra: Any) -> None:
    """Record that ``detector`` reached ``name`` (e.g. ``prepare.start``) at ``when``."""
    fields: dict[str, Any] = {detector_field(detector, name): repr(time.time() if when is None else when)}
    fields.update({detector_field(detector, key): value for key, value in extra.items()})
    set_fields(client, instrument, group, fields, ttl_s)


def stamp_snap(client: redis.Redis, instrument: str, group: str, detector: int, snap: int,
               ttl_s: int, when: float | None = None) -> None:
    """Record the arrival time of ``snap`` of ``detector`` (the first time only counts)."""
    key = visit_key(instrument, group)
    pipe = client.pipeline(transaction=False)
    pipe.hsetnx(key, detector_field(detector, f"snap.{int(snap)}"), repr(time.time() if when is None else when))
    pipe.expire(key, int(ttl_s))
    pipe.execute()


def record_stage_end(client: redis.Redis, status: StageStatus, ttl_s: int,
                     worker: str = "") -> None:
    """Record the end of a stage and the detector's status after it, in one write.

    A status whose ``data["snaps"]`` maps snap numbers to arrivals with a time ``t`` (the
    wait stage's) also records each snap's arrival time; one with ``data["cpu_s"]`` records
    ``<stage>.cpu_s``.
    """
    fields = {
        f"{status.stage}.end": repr(status.finished),
        "outcome": status.outcome.value,
        "stage": status.stage,
        "reason": status.reason,
        "code": status.code,
    }
    if worker:
        fields["worker"] = worker
        fields[f"{status.stage}.worker"] = worker
    cpu = status.data.get("cpu_s")
    if isinstance(cpu, int | float):  # the stage's CPU seconds (benchmarks' accounting)
        fields[f"{status.stage}.cpu_s"] = repr(float(cpu))
    snaps = status.data.get("snaps")
    if isinstance(snaps, Mapping):  # the wait stage reports each snap's arrival time
        for snap, arrival in snaps.items():
            when = arrival.get("t") if isinstance(arrival, Mapping) else None
            if str(snap).isdigit() and isinstance(when, int | float):
                fields[f"snap.{int(snap)}"] = repr(float(when))
    set_fields(
        client, status.instrument, status.group,
        {detector_field(status.detector, name): value for name, value in fields.items()}, ttl_s,
    )


def write_summary(client: redis.Redis, instrument: str, group: str, summary: Mapping[str, Any],
                  by: str, ttl_s: int, when: float | None = None) -> bool:
    """Write the visit's summary unless one was written already; True if this call wrote it.

    The chord callback and the visit deadline both call this; whichever comes first wins and
    the other changes nothing. Detectors the summary records as failed at the deadline get
    their status fields set too, so the record says why.
    """
    when = time.time() if when is None else when
    fields: dict[str, Any] = {
        "summary": json.dumps(summary, sort_keys=True),
        "summarized": repr(when),
        "summary_by": by,
    }
    for det, entry in summary.get("detectors", {}).items():
        if entry.get("code") == DEADLINE_CODE:
            fields[detector_field(int(det), "outcome")] = entry["outcome"]
            fields[detector_field(int(det), "reason")] = entry["reason"]
            fields[detector_field(int(det), "code")] = entry["code"]
            if entry.get("stage") in STAGES:  # where it was stopped: stage and progress agree
                fields[detector_field(int(det), "stage")] = entry["stage"]
    wrote = client.eval(
        _SUMMARY, 2, visit_key(instrument, group), VISITS_INFLIGHT,
        int(ttl_s), index_member(instrument, group), *_flat(fields),
    )
    return bool(wrote)


# --------------------------------------------------------------------------- reading


@dataclass
class DetectorRecord:
    """What the ledger knows of one detector-visit."""

    detector: int
    #: Event → unix time: ``received``, ``<stage>.start``, ``<stage>.end`` (stages of
    #: :data:`STAGES`: prepared = ``prepare.end``, ingested = ``ingest.end``, run started and
    #: finished = ``run.start`` / ``run.end``), ``summarized``.
    times: dict[str, float] = field(default_factory=dict)
    #: Snap number → arrival time.
    snaps: dict[int, float] = field(default_factory=dict)
    #: Stage → node name of the worker that ran it.
    workers: dict[str, str] = field(default_factory=dict)
    outcome: str = ""
    stage: str = ""
    reason: str = ""
    code: str = ""
    worker: str = ""

    @property
    def final(self) -> bool:
        """True when the detector-visit is over: a stage failed, or the last one succeeded."""
        if not self.outcome:
            return False
        return self.outcome != Outcome.OK.value or self.stage == STAGES[-1]

    @property
    def progress(self) -> str:
        """The furthest point reached: ``pending``, ``<stage>`` (running) or ``<stage> done``."""
        for stage in reversed(STAGES):
            if f"{stage}.end" in self.times:
                return f"{stage} done"
            if f"{stage}.start" in self.times:
                return stage
        return "pending"

    @property
    def progress_stage(self) -> str:
        """The stage of :attr:`progress` (``prepare`` while pending): where the detector-visit is."""
        return self.progress.split()[0] if self.progress != "pending" else STAGES[0]

    @property
    def state(self) -> str:
        """The detector-visit's current state, one of :data:`STATES`.

        ``ok``: the last stage succeeded; ``failed`` (failed, timed out, aborted) and
        ``skipped``: a stage ended it; ``waiting``: not started, or prepared and waiting for its
        snaps; ``running``: inside or between the other stages.
        """
        if self.final:
            if self.outcome == Outcome.OK.value:
                return "ok"
            return "skipped" if self.outcome == Outcome.SKIPPED.value else "failed"
        return "waiting" if self.progress in ("pending", "prepare done", "wait") else "running"

    def duration(self, stage: str) -> float | None:
        """Seconds ``stage`` took, when both ends are known."""
        start, end = self.times.get(f"{stage}.start"), self.times.get(f"{stage}.end")
        return None if start is None or end is None else end - start

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "detector": self.detector,
            "times": dict(sorted(self.times.items())),
            "snaps": {str(n): t for n, t in sorted(self.snaps.items())},
            "workers": dict(sorted(self.workers.items())),
            "outcome": self.outcome,
            "stage": self.stage,
            "reason": self.reason,
            "code": self.code,
            "worker": self.worker,
            "final": self.final,
            "progress": self.progress,
            "state": self.state,
        }


@dataclass
class VisitRecord:
    """The typed ledger record of one visit."""

    instrument: str
    group: str
    visit: dict[str, Any]
    detectors: dict[int, DetectorRecord]
    received: float | None = None
    expected_end: float | None = None
    deadline: float | None = None
    chord_id: str = ""
    summary: dict[str, Any] | None = None
    summarized: float | None = None
    summary_by: str = ""

    @property
    def key(self) -> str:
        """``instrument/group``."""
        return index_member(self.instrument, self.group)

    def counts(self) -> dict[str, int]:
        """Detectors per current outcome (``pending`` for those with none yet)."""
        return dict(Counter(d.outcome or "pending" for d in self.detectors.values()))

    def states(self) -> dict[str, int]:
        """Detectors per current state (:attr:`DetectorRecord.state`), each counted once."""
        return dict(Counter(d.state for d in self.detectors.values()))

    def progress(self) -> dict[str, int]:
        """Detectors per point reached (see :attr:`DetectorRecord.progress`)."""
        return dict(Counter(d.progress for d in self.detectors.values()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (served by ``GET /visits/{instrument}/{group}``)."""
        return {
            "instrument": self.instrument,
            "group": self.group,
            "visit": self.visit,
            "received": self.received,
            "expected_end": self.expected_end,
            "deadline": self.deadline,
            "chord_id": self.chord_id,
            "summarized": self.summarized,
            "summary_by": self.summary_by,
            "summary": self.summary,
            "counts": self.counts(),
            "states": self.states(),
            "detectors": {str(d): rec.to_dict() for d, rec in sorted(self.detectors.items())},
        }


def _float(value: str | None) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except ValueError:
        return None


def parse_record(raw: Mapping[str, str]) -> VisitRecord | None:
    """Turn the raw hash of a visit into a :class:`VisitRecord` (None for an empty hash)."""
    if not raw:
        return None
    detectors: dict[int, DetectorRecord] = {
        int(d): DetectorRecord(int(d)) for d in json.loads(raw.get("detectors") or "[]")
    }
    for name, value in raw.items():
        if not (name.startswith("d") and name[1:4].isdigit() and name[4:5] == "."):
            continue
        det = int(name[1:4])
        rec = detectors.setdefault(det, DetectorRecord(det))
        rest = name[5:]
        if rest.startswith("snap."):
            number, when = rest[5:], _float(value)
            if number.isdigit() and when is not None:
                rec.snaps[int(number)] = when
        elif rest.endswith((".start", ".end")):
            when = _float(value)
            if when is not None:
                rec.times[rest] = when
        elif rest in ("outcome", "stage", "reason", "code", "worker"):
            setattr(rec, rest, value)
        elif rest.endswith(".worker"):
            rec.workers[rest.removesuffix(".worker")] = value
    received, summarized = _float(raw.get("received")), _float(raw.get("summarized"))
    for rec in detectors.values():  # visit-wide events, per detector for uniform reading
        if received is not None:
            rec.times["received"] = received
        if summarized is not None:
            rec.times["summarized"] = summarized
    return VisitRecord(
        instrument=raw.get("instrument", ""),
        group=raw.get("group", ""),
        visit=json.loads(raw.get("visit") or "{}"),
        detectors=dict(sorted(detectors.items())),
        received=received,
        expected_end=_float(raw.get("expected_end")),
        deadline=_float(raw.get("deadline")),
        chord_id=raw.get("chord_id", ""),
        summary=json.loads(raw["summary"]) if raw.get("summary") else None,
        summarized=summarized,
        summary_by=raw.get("summary_by", ""),
    )


def read_visit(client: redis.Redis, instrument: str, group: str) -> VisitRecord | None:
    """The record of a visit, or None if it was never announced (or has expired).

    ``client`` must decode responses (the context's client does).
    """
    return parse_record(client.hgetall(visit_key(instrument, group)))


def stage_done(client: redis.Redis, instrument: str, group: str, detector: int, stage: str) -> str | None:
    """The worker that finished ``stage`` ok for the detector-visit (or a later stage), else None."""
    record = read_visit(client, instrument, group)
    det = record.detectors.get(int(detector)) if record is not None else None
    if det is None or det.outcome != Outcome.OK.value or det.stage not in STAGES or stage not in STAGES:
        return None
    if STAGES.index(det.stage) < STAGES.index(stage) or f"{stage}.end" not in det.times:
        return None
    return det.workers.get(stage) or det.worker or "another worker"


def _members(client: redis.Redis, index: str, limit: int) -> list[tuple[str, str]]:
    out = []
    for member in client.zrevrange(index, 0, max(limit, 1) - 1):
        instrument, _, group = str(member).partition("/")
        out.append((instrument, group))
    return out


def in_flight(client: redis.Redis, limit: int = 50) -> list[tuple[str, str]]:
    """(instrument, group) of the newest visits whose summary is not written, newest first."""
    return _members(client, VISITS_INFLIGHT, limit)


def recent(client: redis.Redis, limit: int = 50) -> list[tuple[str, str]]:
    """(instrument, group) of the newest visits in the ledger, newest first."""
    return _members(client, VISITS_RECENT, limit)


# --------------------------------------------------------------------------- the summary


def _stage_times(records: Iterable[DetectorRecord]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    records = list(records)
    for stage in STAGES:
        values = sorted(d for d in (rec.duration(stage) for rec in records) if d is not None)
        if values:
            out[stage] = {
                "n": len(values),
                "min_s": round(values[0], 4),
                "median_s": round(values[len(values) // 2], 4),
                "max_s": round(values[-1], 4),
            }
    return out


def build_summary(
    record: VisitRecord | None,
    instrument: str,
    group: str,
    statuses: Sequence[Mapping[str, Any]] | None,
    by: str,
    now: float,
) -> dict[str, Any]:
    """The summary of a visit, from the chord's statuses and/or what the ledger knows.

    ``statuses`` (the chord's results) take precedence; a detector the ledger lists without a
    final status (deadline path) is recorded as failed with reason ``deadline: no result``:
    it is a candidate for catch-up.
    """
    detectors: dict[int, dict[str, Any]] = {}
    ledger = record.detectors if record is not None else {}
    for det, rec in ledger.items():
        if rec.final:
            detectors[det] = {"outcome": rec.outcome, "stage": rec.stage, "reason": rec.reason,
                              "code": rec.code, "worker": rec.worker}
        else:
            detectors[det] = {"outcome": Outcome.FAILED.value, "stage": rec.progress_stage,
                              "reason": DEADLINE_REASON, "code": DEADLINE_CODE, "worker": rec.worker}
    for raw in statuses or ():
        try:
            status = StageStatus.from_dict(dict(raw))
        except (TypeError, ValueError, KeyError):
            continue
        detectors[status.detector] = {
            "outcome": status.outcome.value, "stage": status.stage, "reason": status.reason,
            "code": status.code, "worker": str(status.data.get("worker", "")),
        }
    counts = Counter(entry["outcome"] for entry in detectors.values())
    received = record.received if record is not None else None
    expected_end = record.expected_end if record is not None else None
    run_ends = [rec.times["run.end"] for rec in ledger.values() if "run.end" in rec.times]
    return {
        "instrument": instrument,
        "group": group,
        "by": by,
        "written": now,
        "n_detectors": len(detectors),
        "counts": {outcome.value: counts.get(outcome.value, 0) for outcome in Outcome},
        "detectors": {str(det): entry for det, entry in sorted(detectors.items())},
        "stage_times": _stage_times(ledger.values()),
        "received": received,
        "elapsed_s": None if received is None else round(now - received, 4),
        "last_run_end": max(run_ends) if run_ends else None,
        "after_expected_end_s": (
            None if not run_ends or expected_end is None else round(max(run_ends) - expected_end, 4)
        ),
    }
