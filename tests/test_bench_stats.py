"""The benchmark's arithmetic: stage extraction from ledger hashes, percentiles, ratios."""

from __future__ import annotations

import json

import pytest

from benchmarks.stats import (
    BREAKDOWN,
    STAGES,
    detector_visits,
    first_vs_warm,
    percentile,
    queued,
    ratios,
    stage_samples,
    summarize,
    throughput,
    visit_samples,
)

T = 1_800_000_000.0


def approx(value: float) -> object:
    """Equal to the microsecond (the times are large unix seconds)."""
    return pytest.approx(value, abs=1e-6)


def _raw(group: str = "g1", received: float = T, shift: float = 0.0) -> dict[str, str]:
    """A ledger hash of two detectors; detector 1 has not run yet."""
    s = shift
    return {
        "instrument": "SimCam", "group": group, "detectors": "[0, 1]",
        "received": repr(received), "summarized": repr(T + s + 40.0),
        "d000.prepare.start": repr(T + s + 0.1), "d000.prepare.end": repr(T + s + 1.5),
        "d000.wait.start": repr(T + s + 1.6), "d000.wait.end": repr(T + s + 30.02),
        "d000.snap.0": repr(T + s + 20.01), "d000.snap.1": repr(T + s + 30.015),
        "d000.ingest.start": repr(T + s + 30.1), "d000.ingest.end": repr(T + s + 30.3),
        "d000.run.start": repr(T + s + 30.35), "d000.run.end": repr(T + s + 35.0),
        "d000.run.graph_s": "0.15", "d000.run.execute_s": "4.0", "d000.prepare.query_s": "0.2",
        "d000.outcome": "ok", "d000.worker": "detector-1@h",
        "d001.prepare.start": repr(T + s + 0.2), "d001.prepare.end": repr(T + s + 2.0),
        "d001.outcome": "ok", "d001.stage": "prepare",
        "chord_id": "x", "d00x.bogus": "1",
    }


def _puts(shift: float = 0.0) -> dict[tuple[int, int], float]:
    return {(0, 0): T + shift + 20.0, (0, 1): T + shift + 30.0, (1, 0): T + shift + 20.0, (1, 1): T + shift + 30.0}


def test_detector_visits_read_every_field() -> None:
    dv0, dv1 = detector_visits(_raw(), _puts(), exported={0: T + 38.0})
    assert (dv0.group, dv0.detector, dv0.outcome, dv0.worker) == ("g1", 0, "ok", "detector-1@h")
    assert dv0.indexed == {0: approx(T + 20.01), 1: approx(T + 30.015)}
    assert dv0.run_parts == {"graph": 0.15, "execute": 4.0}
    assert dv0.last_put == T + 30.0 and dv0.exported == T + 38.0
    assert dv0.pipeline_start == approx(T + 31.0)
    assert "run.end" not in dv1.times and dv1.exported is None and dv1.pipeline_start is None
    # once the night is over, an ok that never reached the run is not counted as ok
    assert (dv0.final_outcome, dv1.final_outcome) == ("ok", "stopped after prepare")


def test_stage_samples_per_detector() -> None:
    samples = stage_samples(detector_visits(_raw(), _puts(), exported={0: T + 38.0}))
    assert set(samples) == (set(STAGES) | set(BREAKDOWN)) - {"last snap→summary"}
    assert samples["next_visit→prepared"] == [approx(1.5), approx(2.0)]
    assert samples["prepared→first snap"] == [approx(18.5), approx(18.0)]
    assert samples["PUT→snap indexed"] == [approx(0.01), approx(0.015)]
    assert samples["PUT→snap seen"] == [approx(0.02)]
    assert samples["last snap→pipeline start"] == [approx(1.0)]
    assert samples["pipeline run"] == [4.0]
    assert samples["pipeline end→summary"] == [approx(5.0)]
    assert samples["export lag"] == [approx(3.0)]
    assert samples["overhead"] == [approx(1.0)]
    assert samples["wait→ingest"] == [approx(0.08)]
    assert samples["ingest"] == [approx(0.2)]
    assert samples["ingest→run"] == [approx(0.05)]
    assert samples["graph build"] == [0.15]
    assert samples["run set-up"] == [approx(0.5)]  # run starts T+30.35, graph 0.15, pipeline at T+31


def test_compute_borrowed_for_the_baseline() -> None:
    samples = stage_samples(detector_visits(_raw(), _puts()), compute={("g1", 0): 2.0})
    assert samples["pipeline run"] == [2.0]
    assert samples["overhead"] == [approx(3.0)]


def test_visit_samples_and_throughput() -> None:
    by_visit = {"g1": detector_visits(_raw(), _puts()),
                "g2": detector_visits(_raw("g2", T + 10, shift=10.0), _puts(10.0))}
    assert visit_samples(by_visit) == [approx(10.0), approx(10.0)]
    # two pipelines ended between the first PUT (T+20) and the last end (T+45): 2 per 25 s.
    assert throughput([dv for dvs in by_visit.values() for dv in dvs]) == approx(4.8)
    assert throughput([]) is None


def test_first_visit_against_warm_ones() -> None:
    visits = detector_visits(_raw(), _puts()) + detector_visits(_raw("g2", T + 10, shift=10.0), _puts(10.0))
    visits[2].times["prepare.end"] = visits[2].times["prepare.start"] + 0.4  # the warm one prepares faster
    result = first_vs_warm(visits)
    assert result["first_prepare_s"] == approx(1.6)  # median of 1.4 and 1.8
    assert result["warm_prepare_s"] == approx(1.1)  # median of 0.4 and 1.8
    assert result["prepare_slower_s"] == approx(0.5)
    assert result["critical_slower_s"] == approx(0.0)


def test_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == approx(50.5)
    assert percentile(values, 95) == approx(95.05)
    assert percentile([3.0], 95) == 3.0
    assert percentile([5.0, 1.0], 0) == 1.0 and percentile([5.0, 1.0], 100) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)
    assert summarize([]) == {"n": 0, "p50": None, "p95": None, "max": None, "mean": None}
    assert summarize([1.0, 2.0, 3.0]) == {"n": 3, "p50": 2.0, "p95": 2.9, "max": 3.0, "mean": 2.0}


def test_ratios() -> None:
    ours = {"a": {"p50": 0.5, "p95": 1.0}, "b": {"p50": 0.0, "p95": None}, "c": {"p50": 1.0, "p95": 1.0}}
    base = {"a": {"p50": 5.0, "p95": 4.0}, "b": {"p50": 1.0, "p95": 1.0}}
    assert ratios(ours, base) == {"a": {"p50": 10.0, "p95": 4.0}, "b": {"p50": None, "p95": None}}
    assert json.dumps(ratios(ours, base))  # JSON-ready


def test_a_late_wait_is_not_a_notification_latency() -> None:
    raw = _raw()
    raw["d000.wait.start"] = repr(T + 31.0)  # began waiting after the last PUT (T+30)
    raw["d000.wait.end"] = repr(T + 31.01)
    samples = stage_samples(detector_visits(raw, _puts()))
    assert samples["PUT→snap seen"] == []
    assert samples["PUT→snap indexed"] == [approx(0.01), approx(0.015)]


def test_time_queued_behind_other_detectors_on_the_same_worker() -> None:
    raw = _raw()
    for det in (0, 1):
        for stage in ("prepare", "ingest", "run"):
            raw[f"d00{det}.{stage}.worker"] = "detector-1@h"
    # detector 1 runs on the same worker during detector 0's wait→ingest gap (T+30.02..30.1)
    raw["d001.ingest.start"], raw["d001.ingest.end"] = repr(T + 30.0), repr(T + 30.07)
    visits = detector_visits(raw, _puts())
    assert visits[0].stage_workers == {"prepare": "detector-1@h", "ingest": "detector-1@h", "run": "detector-1@h"}
    assert queued(visits)[("g1", 0)] == approx(0.05)
    samples = stage_samples(visits)
    assert samples["queued for a worker"] == [approx(0.05)]
    assert samples["overhead excl. queueing"] == [approx(0.95)]


def test_a_prepare_queued_past_the_last_snap_counts_as_queued() -> None:
    raw = _raw()
    for det in (0, 1):
        for stage in ("prepare", "ingest", "run"):
            raw[f"d00{det}.{stage}.worker"] = "detector-1@h"
    # detector 0 is prepared late: its worker ran detector 1's prepare until T+30.5
    raw["d000.prepare.start"], raw["d000.prepare.end"] = repr(T + 30.5), repr(T + 30.6)
    raw["d001.prepare.start"], raw["d001.prepare.end"] = repr(T + 0.2), repr(T + 30.5)
    visits = detector_visits(raw, _puts())
    # from the last PUT (T+30) only: 0.5 s before its prepare, and the 0.08 + 0.05 s of its
    # hand-offs that detector 1's long prepare also covers
    assert queued(visits)[("g1", 0)] == approx(0.63)
