"""Per-stage latencies of a benchmark run, from ledger records and the driver's PUT times.

Pure functions: they take the raw ledger hash of a visit (``HGETALL visit:<instrument>:<group>``,
see :mod:`prompt_tasks.store.ledger` for its layout), the times at which the driver's PUT of each
raw completed, and when each detector-visit's export was committed, and return samples per
stage; then percentiles and ratios. The baseline writes the same fields, so one extraction
serves both.

Stages (seconds, one sample per detector-visit unless said otherwise):

``next_visit→prepared``
    ``prepare.end − received``.
``prepared→first snap``
    ``first PUT − prepare.end``: negative when preparing was not done before the first snap.
``PUT→snap indexed``
    per snap: the arrival time the dispatcher recorded (``snap.<n>``) − its PUT completion
    (slightly negative when the bucket event beats the PUT's response to the client); for the
    baseline, when its polling first listed the raw.
``PUT→snap seen``
    the last snap's PUT completion → the waiting task has seen every snap (``wait.end``),
    for the detector-visits whose waiting task was already waiting then (``wait.start`` before
    that PUT); a late wait is counted by ``prepared→first snap`` instead.
``last snap→pipeline start``
    last PUT → the pipeline's first task starts (``run.end − run.execute_s``): ingest,
    hand-offs between stages and the quantum graph build.
``pipeline run``
    ``run.execute_s``: the pipeline tasks executing (pre-execution and the quanta).
``pipeline end→summary``
    ``summarized − run.end``.
``export lag``
    export committed − ``run.end``.
``last snap→exported``
    export committed − last PUT: the outputs are registered in the central repo.
``overhead``
    the framework's cost on the critical path: ``(run.end − last PUT) − compute``, where
    ``compute`` is the pipeline's own execution time (``run.execute_s``, or for the baseline
    the same detector-visit's execution time measured in-process).
``queued for a worker``
    after the last PUT, the time the detector-visit's next stage waited (``received →
    prepare``, ``wait → ingest``, ``ingest → run``) while the compute worker that then ran
    it was busy with other detector-visits: waiting for a CPU the machine does not have,
    not framework cost.
``overhead excl. queueing``
    ``overhead − queued for a worker``.
``last snap→summary`` (one sample per visit)
    ``summarized − the visit's last PUT``.

and the parts of ``last snap→pipeline start`` (:data:`BREAKDOWN`): ``wait→ingest`` (from the
waiting task's end to the ingest task's start: the hand-off through the broker), ``ingest``,
``ingest→run`` (hand-off), ``graph build`` (``run.graph_s``) and ``run set-up`` (the rest of
the run stage before the pipeline executes: pipeline selection, repo and executor set-up).

:func:`queue_shares` says how much of the latencies an unsaturated night should have without
queueing was spent queued for a busy worker, and :func:`stage_cpu` sums the CPU seconds the
compute stages recorded (``dNNN.<stage>.cpu_s``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BREAKDOWN",
    "STAGES",
    "DetectorVisit",
    "Puts",
    "detector_visits",
    "first_vs_warm",
    "payload_cpu",
    "percentile",
    "queue_shares",
    "queued",
    "queued_prepare",
    "ratios",
    "reached_run",
    "stage_cpu",
    "stage_samples",
    "summarize",
    "throughput",
    "visit_samples",
    "warm",
    "warm_stage_cpu",
    "warm_summaries",
]

#: Stage names in report order.
STAGES: tuple[str, ...] = (
    "next_visit→prepared",
    "prepared→first snap",
    "PUT→snap indexed",
    "PUT→snap seen",
    "last snap→pipeline start",
    "pipeline run",
    "pipeline end→summary",
    "export lag",
    "last snap→exported",
    "overhead",
    "queued for a worker",
    "overhead excl. queueing",
    "last snap→summary",
)

#: The parts of ``last snap→pipeline start``.
BREAKDOWN: tuple[str, ...] = ("wait→ingest", "ingest", "ingest→run", "graph build", "run set-up")

#: ``(detector, snap) → unix time the PUT of that raw completed``.
Puts = Mapping[tuple[int, int], float]


def reached_run(outcome: str | None, stage: str | None) -> bool:
    """A detector-visit's ledger ``outcome`` and last ``stage`` say it ended ok after its run."""
    return outcome == "ok" and stage == "run"


@dataclass
class DetectorVisit:
    """The times of one detector-visit, as the ledger and the driver know them."""

    group: str
    detector: int
    outcome: str = ""
    #: The last stage the ledger recorded the end of.
    stage: str = ""

    @property
    def final_outcome(self) -> str:
        """The outcome once the night is over: an ``ok`` that stopped short of the run is not one
        (its chain ended after that stage without a recorded failure)."""
        if self.outcome == "ok" and self.stage and not reached_run(self.outcome, self.stage):
            return f"stopped after {self.stage}"
        return self.outcome or "pending"
    received: float | None = None
    summarized: float | None = None
    #: ``<stage>.start`` / ``<stage>.end`` → unix time.
    times: dict[str, float] = field(default_factory=dict)
    #: Snap → unix time the dispatcher indexed it.
    indexed: dict[int, float] = field(default_factory=dict)
    #: Snap → unix time its PUT completed.
    puts: dict[int, float] = field(default_factory=dict)
    #: ``run.<part>_s`` → seconds (``graph``, ``execute``).
    run_parts: dict[str, float] = field(default_factory=dict)
    exported: float | None = None
    worker: str = ""
    #: Stage → node name of the worker that ran it.
    stage_workers: dict[str, str] = field(default_factory=dict)
    #: Stage → CPU seconds the stage used (``<stage>.cpu_s``).
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def last_put(self) -> float | None:
        """When the last snap's PUT completed."""
        return max(self.puts.values()) if self.puts else None

    @property
    def compute(self) -> float | None:
        """Seconds the pipeline itself executed."""
        return self.run_parts.get("execute")

    @property
    def pipeline_start(self) -> float | None:
        """When the pipeline's tasks started executing."""
        end, compute = self.times.get("run.end"), self.compute
        return None if end is None or compute is None else end - compute


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def detector_visits(raw: Mapping[str, str], puts: Puts, exported: Mapping[int, float] | None = None
                    ) -> list[DetectorVisit]:
    """The detector-visits of one visit's raw ledger hash, with the driver's PUT times."""
    import json

    group = str(raw.get("group", ""))
    received, summarized = _float(raw.get("received")), _float(raw.get("summarized"))
    detectors = [int(d) for d in json.loads(raw.get("detectors") or "[]")]
    out: dict[int, DetectorVisit] = {
        det: DetectorVisit(group, det, received=received, summarized=summarized) for det in detectors
    }
    for name, value in raw.items():
        if not (len(name) > 5 and name[0] == "d" and name[1:4].isdigit() and name[4] == "."):
            continue
        det, rest = int(name[1:4]), name[5:]
        rec = out.setdefault(det, DetectorVisit(group, det, received=received, summarized=summarized))
        if rest.startswith("snap.") and rest[5:].isdigit():
            when = _float(value)
            if when is not None:
                rec.indexed[int(rest[5:])] = when
        elif rest.endswith((".start", ".end")) and rest.count(".") == 1:
            when = _float(value)
            if when is not None:
                rec.times[rest] = when
        elif rest.endswith(".cpu_s") and rest.count(".") == 1:
            seconds = _float(value)
            if seconds is not None:
                rec.cpu[rest.removesuffix(".cpu_s")] = seconds
        elif rest.startswith("run.") and rest.endswith("_s"):
            seconds = _float(value)
            if seconds is not None:
                rec.run_parts[rest[4:-2]] = seconds
        elif rest == "outcome":
            rec.outcome = str(value)
        elif rest == "stage":
            rec.stage = str(value)
        elif rest == "worker":
            rec.worker = str(value)
        elif rest.endswith(".worker") and rest.count(".") == 1:
            rec.stage_workers[rest.removesuffix(".worker")] = str(value)
    for (det, snap), when in puts.items():
        if det in out:
            out[det].puts[snap] = when
    for det, when in (exported or {}).items():
        if det in out:
            out[det].exported = when
    return [out[d] for d in sorted(out)]


def _diff(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else later - earlier


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _busy_by_worker(visits: Sequence[DetectorVisit]) -> dict[str, list[tuple[str, int, float, float]]]:
    busy: dict[str, list[tuple[str, int, float, float]]] = {}
    for dv in visits:
        for stage in ("prepare", "ingest", "run"):
            worker = dv.stage_workers.get(stage)
            start, end = dv.times.get(f"{stage}.start"), dv.times.get(f"{stage}.end")
            if worker and start is not None and end is not None:
                busy.setdefault(worker, []).append((dv.group, dv.detector, start, end))
    return busy


def _busy_with_others(busy: Mapping[str, list[tuple[str, int, float, float]]], dv: DetectorVisit,
                      worker: str, a: float, b: float) -> float:
    """Seconds of ``[a, b]`` during which ``worker`` ran detector-visits other than ``dv``."""
    others = _merged([(max(s, a), min(e, b)) for g, d, s, e in busy.get(worker, ())
                      if (g, d) != (dv.group, dv.detector) and e > a and s < b])
    return sum(e - s for s, e in others)


def queued(visits: Iterable[DetectorVisit]) -> dict[tuple[str, int], float]:
    """Per detector-visit, seconds of its hand-offs during which the next stage's worker was
    busy with other detector-visits (see ``queued for a worker`` in the module doc)."""
    visits = list(visits)
    busy = _busy_by_worker(visits)
    out: dict[tuple[str, int], float] = {}
    for dv in visits:
        total = 0.0
        windows = (("received", "prepare.start", "prepare"), ("wait.end", "ingest.start", "ingest"),
                   ("ingest.end", "run.start", "run"))
        for gap_from, gap_to, stage in windows:
            a = dv.received if gap_from == "received" else dv.times.get(gap_from)
            b, worker = dv.times.get(gap_to), dv.stage_workers.get(stage)
            if a is not None and dv.last_put is not None:
                a = max(a, dv.last_put)  # only what delays the detector-visit after its last snap
            if a is None or b is None or not worker or b <= a:
                continue
            total += _busy_with_others(busy, dv, worker, a, b)
        out[(dv.group, dv.detector)] = total
    return out


def queued_prepare(visits: Iterable[DetectorVisit]) -> dict[tuple[str, int], float]:
    """Per detector-visit, seconds between ``received`` and its prepare's start during which
    the compute worker that prepared it was busy with other detector-visits."""
    visits = list(visits)
    busy = _busy_by_worker(visits)
    out: dict[tuple[str, int], float] = {}
    for dv in visits:
        a, b, worker = dv.received, dv.times.get("prepare.start"), dv.stage_workers.get("prepare")
        out[(dv.group, dv.detector)] = (0.0 if a is None or b is None or not worker or b <= a
                                        else _busy_with_others(busy, dv, worker, a, b))
    return out


def queue_shares(visits: Iterable[DetectorVisit]) -> dict[str, dict[str, Any]]:
    """For the latencies an unsaturated night reports: p50 / p95 / max and the share of their
    total spent queued for a busy compute worker (``queued_share``, 0 to 1).

    ``PUT→snap seen`` is the gevent wait worker's (hundreds of concurrent waits, no queue for
    a worker): its share is None. ``last snap→summary`` takes, per visit, the queueing of the
    detector-visit whose pipeline ended last.
    """
    visits = list(visits)
    crit, prep = queued(visits), queued_prepare(visits)
    rows: dict[str, list[tuple[float, float | None]]] = {
        "PUT→snap seen": [], "last snap→pipeline start": [], "last snap→exported": [],
        "last snap→summary": [], "next_visit→prepared": []}
    by_group: dict[str, list[DetectorVisit]] = {}
    for dv in visits:
        key, last_put = (dv.group, dv.detector), dv.last_put
        by_group.setdefault(dv.group, []).append(dv)
        waiting = dv.times.get("wait.start")
        seen = _diff(dv.times.get("wait.end"), last_put)
        if seen is not None and waiting is not None and last_put is not None and waiting <= last_put:
            rows["PUT→snap seen"].append((seen, None))
        start = _diff(dv.pipeline_start, last_put)
        if start is not None:
            rows["last snap→pipeline start"].append((start, crit.get(key, 0.0)))
        exported = _diff(dv.exported, last_put)
        if exported is not None:
            rows["last snap→exported"].append((exported, crit.get(key, 0.0)))
        prepared = _diff(dv.times.get("prepare.end"), dv.received)
        if prepared is not None:
            rows["next_visit→prepared"].append((prepared, prep.get(key, 0.0)))
    for dvs in by_group.values():
        puts = [dv.last_put for dv in dvs if dv.last_put is not None]
        ended = [dv for dv in dvs if "run.end" in dv.times]
        summarized = next((dv.summarized for dv in dvs if dv.summarized is not None), None)
        if puts and ended and summarized is not None:
            last = max(ended, key=lambda dv: dv.times["run.end"])
            rows["last snap→summary"].append((summarized - max(puts), crit.get((last.group, last.detector), 0.0)))
    out: dict[str, dict[str, Any]] = {}
    for stage, pairs in rows.items():
        row: dict[str, Any] = dict(summarize([lat for lat, _ in pairs]))
        latency = sum(max(lat, 0.0) for lat, _ in pairs)
        queue = [q for _, q in pairs if q is not None]
        row["queued_s"] = round(sum(queue), 4) if queue else None
        row["queued_share"] = (round(sum(queue) / latency, 4) if queue and latency > 0 else
                               (0.0 if queue else None))
        out[stage] = row
    return out


def stage_cpu(visits: Iterable[DetectorVisit], stages: Sequence[str] = ("prepare", "ingest", "run")
              ) -> dict[str, float]:
    """CPU seconds each of ``stages`` recorded, summed over ``visits``."""
    out = dict.fromkeys(stages, 0.0)
    for dv in visits:
        for stage in stages:
            out[stage] += dv.cpu.get(stage, 0.0)
    return {stage: round(seconds, 4) for stage, seconds in out.items()}


def stage_samples(visits: Iterable[DetectorVisit], compute: Mapping[tuple[str, int], float] | None = None
                  ) -> dict[str, list[float]]:
    """Samples of every per-detector stage (see the module doc) over ``visits``.

    ``compute`` overrides the pipeline's execution time per ``(group, detector)`` (the
    baseline borrows the in-process measurement of the same detector-visit).
    """
    out: dict[str, list[float]] = {stage: [] for stage in (*STAGES, *BREAKDOWN) if stage != "last snap→summary"}

    def add(stage: str, value: float | None) -> None:
        if value is not None:
            out[stage].append(value)

    visits = list(visits)
    waits = queued(visits)
    for dv in visits:
        times = dv.times
        own = dv.compute if compute is None else compute.get((dv.group, dv.detector), dv.compute)
        run_end, last_put = times.get("run.end"), dv.last_put
        add("next_visit→prepared", _diff(times.get("prepare.end"), dv.received))
        first_put = min(dv.puts.values()) if dv.puts else None
        add("prepared→first snap", _diff(first_put, times.get("prepare.end")))
        for snap, when in sorted(dv.indexed.items()):
            add("PUT→snap indexed", _diff(when, dv.puts.get(snap)))
        waiting = times.get("wait.start")
        if waiting is not None and last_put is not None and waiting <= last_put:
            add("PUT→snap seen", _diff(times.get("wait.end"), last_put))
        start = None if run_end is None or own is None else run_end - own
        add("last snap→pipeline start", _diff(start, last_put))
        add("pipeline run", own if run_end is not None else None)
        add("pipeline end→summary", _diff(dv.summarized, run_end))
        add("export lag", _diff(dv.exported, run_end))
        add("last snap→exported", _diff(dv.exported, last_put))
        add("wait→ingest", _diff(times.get("ingest.start"), times.get("wait.end")))
        add("ingest", _diff(times.get("ingest.end"), times.get("ingest.start")))
        add("ingest→run", _diff(times.get("run.start"), times.get("ingest.end")))
        graph = dv.run_parts.get("graph")
        add("graph build", graph)
        if graph is not None and start is not None and "run.start" in times:
            add("run set-up", start - times["run.start"] - graph)
        critical = _diff(run_end, last_put)
        overhead = None if critical is None or own is None else critical - own
        add("overhead", overhead)
        if overhead is not None:
            add("queued for a worker", waits.get((dv.group, dv.detector), 0.0))
            add("overhead excl. queueing", overhead - waits.get((dv.group, dv.detector), 0.0))
    return out


def visit_samples(by_visit: Mapping[str, Sequence[DetectorVisit]]) -> list[float]:
    """Per visit: its summary's time after its last PUT (``last snap→summary``)."""
    out = []
    for visits in by_visit.values():
        puts = [dv.last_put for dv in visits if dv.last_put is not None]
        summarized = next((dv.summarized for dv in visits if dv.summarized is not None), None)
        if puts and summarized is not None:
            out.append(summarized - max(puts))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (linear interpolation between closest ranks)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """``n``, ``p50``, ``p95``, ``max`` and ``mean`` of ``values`` (None when empty)."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None, "mean": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 4),
        "p95": round(percentile(values, 95), 4),
        "max": round(max(values), 4),
        "mean": round(sum(values) / len(values), 4),
    }


def ratios(ours: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, Mapping[str, Any]]
           ) -> dict[str, dict[str, float | None]]:
    """Baseline / ours of ``p50`` and ``p95`` for every stage both have (None where undefined)."""
    out: dict[str, dict[str, float | None]] = {}
    for stage in ours:
        if stage not in baseline:
            continue
        row: dict[str, float | None] = {}
        for key in ("p50", "p95"):
            a, b = ours[stage].get(key), baseline[stage].get(key)
            row[key] = None if a is None or b is None or a <= 0 else round(b / a, 2)
        out[stage] = row
    return out


def throughput(visits: Iterable[DetectorVisit]) -> float | None:
    """Detector-visits run per minute, from the first PUT to the last pipeline end."""
    visits = list(visits)
    ends = [dv.times["run.end"] for dv in visits if "run.end" in dv.times]
    puts = [min(dv.puts.values()) for dv in visits if dv.puts]
    if not ends or not puts or max(ends) <= min(puts):
        return None
    return round(len(ends) / ((max(ends) - min(puts)) / 60.0), 2)


def first_vs_warm(visits: Iterable[DetectorVisit]) -> dict[str, Any]:
    """The critical path (last PUT → run end) and prepare time of each detector's first visit
    against its later (warm) ones: medians and the difference."""
    by_det: dict[int, list[DetectorVisit]] = {}
    for dv in visits:
        if dv.received is not None:
            by_det.setdefault(dv.detector, []).append(dv)
    first_crit, warm_crit, first_prep, warm_prep = [], [], [], []
    for dvs in by_det.values():
        dvs.sort(key=lambda dv: dv.received or 0.0)
        for k, dv in enumerate(dvs):
            crit = _diff(dv.times.get("run.end"), dv.last_put)
            prep = _diff(dv.times.get("prepare.end"), dv.times.get("prepare.start"))
            for value, first, warm in ((crit, first_crit, warm_crit), (prep, first_prep, warm_prep)):
                if value is not None:
                    (first if k == 0 else warm).append(value)

    def med(values: list[float]) -> float | None:
        return round(percentile(values, 50), 4) if values else None

    out: dict[str, Any] = {
        "first_critical_s": med(first_crit), "warm_critical_s": med(warm_crit),
        "first_prepare_s": med(first_prep), "warm_prepare_s": med(warm_prep),
    }
    for kind in ("critical", "prepare"):
        first, warm = out[f"first_{kind}_s"], out[f"warm_{kind}_s"]
        out[f"{kind}_slower_s"] = None if first is None or warm is None else round(first - warm, 4)
    return out


def warm(visits: Iterable[DetectorVisit]) -> list[DetectorVisit]:
    """The detector-visits of a warm worker: each detector's first visit (its cold one) left out."""
    by_det: dict[int, list[DetectorVisit]] = {}
    for dv in visits:
        by_det.setdefault(dv.detector, []).append(dv)
    return [dv for dvs in by_det.values() for dv in sorted(dvs, key=lambda v: v.received or 0.0)[1:]]


#: Stages also summarized over warm detector-visits only (:func:`warm_summaries`).
WARM_STAGES: tuple[str, ...] = ("next_visit→prepared", "graph build", "last snap→pipeline start")


def warm_summaries(visits: Iterable[DetectorVisit]) -> dict[str, dict[str, float | int | None]]:
    """``<stage> (warm)`` → :func:`summarize` of :data:`WARM_STAGES` over :func:`warm` visits."""
    warm_visits = warm(visits)
    samples = stage_samples(warm_visits)
    out = {f"{stage} (warm)": summarize(samples[stage]) for stage in WARM_STAGES}
    # the graph build's own CPU: what its wall time would be on an idle core
    out["graph build CPU (warm)"] = summarize([dv.run_parts["graph_cpu"] for dv in warm_visits
                                               if "graph_cpu" in dv.run_parts])
    return out


def payload_cpu(visits: Iterable[DetectorVisit]) -> float:
    """CPU seconds the pipelines' quanta used (``run.execute_cpu_s``), summed over ``visits``."""
    return round(sum(dv.run_parts.get("execute_cpu", 0.0) for dv in visits), 4)


def warm_framework_stage_cpu(visits: Iterable[DetectorVisit],
                              stages: Sequence[str] = ("prepare", "ingest", "run")) -> float | None:
    """Mean CPU seconds of ``stages`` per warm detector-visit without its pipeline's quanta
    (``run.execute_cpu``): the compute stages' framework cost in a worker past its first visit."""
    warm_visits = warm(dv for dv in visits if all(stage in dv.cpu for stage in stages))
    if not warm_visits:
        return None
    own = [sum(dv.cpu[stage] for stage in stages) - dv.run_parts.get("execute_cpu", 0.0) for dv in warm_visits]
    return round(sum(own) / len(own), 4)


def warm_stage_cpu(visits: Iterable[DetectorVisit], stages: Sequence[str] = ("prepare", "ingest", "run")
                   ) -> dict[str, Any]:
    """CPU seconds of ``stages`` per warm detector-visit (each detector's first visit left out):
    the median and mean of their sum, and each stage's median; ``n`` the warm detector-visits."""
    warm_visits = warm(dv for dv in visits if all(stage in dv.cpu for stage in stages))
    if not warm_visits:
        return {"n": 0, "median": None, "mean": None, "stages": {}}
    sums = [sum(dv.cpu[stage] for stage in stages) for dv in warm_visits]
    return {"n": len(warm_visits), "median": round(percentile(sums, 50), 4),
            "mean": round(sum(sums) / len(sums), 4),
            "stages": {stage: round(percentile([dv.cpu[stage] for dv in warm_visits], 50), 4) for stage in stages}}
