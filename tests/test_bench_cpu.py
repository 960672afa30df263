"""The benchmark's CPU accounting, unsaturated sizing, capacity arithmetic and README rewriting."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from benchmarks.capacity import estimate, from_results
from benchmarks.cpu import account, check, group_of, machine_window, own_cpu, settle, snapshot, tree_cpu
from benchmarks.night import BenchOptions, unsaturated, warm_framework
from benchmarks.readme import BEGIN, END, goal_rows, rewrite
from benchmarks.stats import detector_visits, queue_shares, stage_cpu, warm_framework_stage_cpu, warm_stage_cpu

T = 1_800_000_000.0


def test_account_sums_components_groups_and_stages() -> None:
    before = {"detector-1": 10.0, "detector-2": 5.0, "wait": 1.0, "redis": 2.0, "s3": 0.5}
    after = {"detector-1": 14.0, "detector-2": 7.0, "wait": 1.5, "redis": 3.0, "s3": 1.0, "intake": 0.25}
    acc = account(before, after, 10, {"prepare": 1.0, "ingest": 1.0, "run": 3.0})
    assert acc["groups"] == {"compute": 6.0, "wait": 0.5, "intake": 0.25, "redis": 1.0, "s3": 0.5}
    assert acc["total_cpu_s"] == pytest.approx(8.25)
    assert acc["stages"]["compute outside stages"] == pytest.approx(1.0)
    assert sum(acc["stages"].values()) == pytest.approx(acc["total_cpu_s"])
    assert acc["per_detector_visit"]["total"] == pytest.approx(0.825)
    assert acc["per_detector_visit"]["groups"]["compute"] == pytest.approx(0.6)
    assert check(acc) == []
    assert group_of("detector-12") == "compute" and group_of("beat") == "beat"


def test_compute_workers_main_processes_are_their_own_stage() -> None:
    """The Celery consumer of each compute worker is read apart from its pool children."""
    before = {"detector-1": 10.0, "detector-2": 5.0, "wait": 1.0}
    after = {"detector-1": 14.0, "detector-2": 7.0, "wait": 1.5}
    consumers = ({"detector-1": 2.0, "detector-2": 1.0, "wait": 0.5}, {"detector-1": 2.5, "detector-2": 1.25, "wait": 1.0})
    acc = account(before, after, 10, {"prepare": 1.0, "ingest": 1.0, "run": 3.0}, consumers=consumers)
    assert acc["stages"]["celery consumer"] == pytest.approx(0.75)  # compute workers only: not the wait worker
    assert acc["stages"]["compute outside stages"] == pytest.approx(0.25)
    assert sum(acc["stages"].values()) == pytest.approx(acc["total_cpu_s"]) and check(acc) == []


def test_check_finds_what_does_not_add_up() -> None:
    acc = account({"detector-1": 1.0, "wait": 1.0, "beat": 1.0, "dispatcher": 1.0},
                  {"detector-1": 2.0, "wait": 1.0, "beat": 1.0, "dispatcher": 1.0}, 2, {"run": 3.0})
    problems = check(acc)
    assert any("wait ran but shows no CPU" in p for p in problems)
    # beat may idle through a short night, and the dispatcher stay under one clock tick
    assert not any("beat" in p or "dispatcher" in p for p in problems)
    assert any("compute outside stages is negative" in p for p in problems)
    acc["components"]["detector-1"] = 5.0
    assert any("components sum" in p for p in check(acc))
    assert any("no detector-visits" in p for p in check(account({}, {"x": 1.0}, 0)))


def test_baseline_jobs_split_by_their_own_stages() -> None:
    acc = account({"redis": 1.0, "jobs": 0.0}, {"redis": 1.5, "jobs": 10.0}, 4, {"prepare": 4.0, "run": 5.5})
    assert acc["stages"] == {"prepare": 4.0, "run": 5.5, "jobs outside stages": 0.5, "redis": 0.5}
    assert check(acc) == []


def test_snapshot_of_this_process_tree_counts_reaped_children() -> None:
    me = psutil.Process(os.getpid())
    start = tree_cpu(me)
    burn = "import time\nend = time.process_time() + 0.05\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)  # a child that burns CPU, then is reaped
    assert tree_cpu(me) - start >= 0.04
    assert set(snapshot({"me": os.getpid(), "gone": 2**22 + 12345})) == {"me"}


def test_own_cpu_leaves_the_children_out() -> None:
    me = psutil.Process(os.getpid())
    before = own_cpu({"me": os.getpid()})["me"]
    burn = "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    own = own_cpu({"me": os.getpid(), "gone": 2**22 + 12345})
    assert set(own) == {"me"} and own["me"] - before < 0.15  # the child's 0.2 s is not ours
    assert own["me"] <= tree_cpu(me)


def test_machine_window() -> None:
    window = machine_window({"busy": 10.0, "idle": 30.0, "load1": 1.0}, {"busy": 40.0, "idle": 40.0, "load1": 2.0}, 12.0)
    assert window == {"cpu_busy_share": 0.75, "busy_cpu_s": 30.0, "stack_cpu_s": 12.0, "other_cpu_s": 18.0,
                      "load_start": 1.0, "load_end": 2.0}


def test_unsaturated_sizing() -> None:
    sized = unsaturated(BenchOptions(detectors=4, workers=2, pipeline="Trivial", size=256, snaps=2, exptime=2.0,
                                     lead=10.0, cadence=12.0), readout_s=1.0)
    assert sized.workers == 4
    assert sized.cadence == 10 + 2 * 3 + 2 + 2  # lead + exposures + work (at least 2 s) + 2 s
    longer = unsaturated(BenchOptions(pipeline="ApPipe", size=2048, snaps=2, exptime=5.0, lead=20.0, cadence=12.0))
    assert longer.cadence >= 20 + 12 + 40


def _ledger(group: str, shift: float, cpu: dict[str, float]) -> dict[str, str]:
    raw = {"group": group, "detectors": "[0]", "received": repr(T + shift), "summarized": repr(T + shift + 12.0),
           "d000.prepare.start": repr(T + shift + 0.1), "d000.prepare.end": repr(T + shift + 0.5),
           "d000.wait.start": repr(T + shift + 0.6), "d000.wait.end": repr(T + shift + 10.02),
           "d000.ingest.start": repr(T + shift + 10.05), "d000.ingest.end": repr(T + shift + 10.2),
           "d000.run.start": repr(T + shift + 10.25), "d000.run.end": repr(T + shift + 11.0),
           "d000.run.execute_s": "0.5", "d000.outcome": "ok"}
    raw.update({f"d000.{stage}.cpu_s": repr(v) for stage, v in cpu.items()})
    for stage in ("prepare", "ingest", "run"):
        raw[f"d000.{stage}.worker"] = "detector-1@h"
    return raw


def test_stage_cpu_and_queue_shares() -> None:
    visits = [*detector_visits(_ledger("g1", 0.0, {"prepare": 0.6, "ingest": 0.2, "run": 0.5}),
                               {(0, 0): T + 10.0}, {0: T + 11.5}),
              *detector_visits(_ledger("g2", 20.0, {"prepare": 0.1, "ingest": 0.1, "run": 0.4}),
                               {(0, 0): T + 30.0}, {0: T + 31.5})]
    assert stage_cpu(visits) == {"prepare": 0.7, "ingest": pytest.approx(0.3), "run": 0.9}
    warm = warm_stage_cpu(visits)
    assert warm["n"] == 1 and warm["median"] == pytest.approx(0.6)
    visits[1].run_parts["execute_cpu"] = 0.25  # the quanta: payload, not framework
    assert warm_framework_stage_cpu(visits) == pytest.approx(0.35)
    # steady state: the warm compute stages plus everything outside the compute stages per dv
    accounting = {"detector_visits": 2, "total_cpu_s": 2.0, "stages": {"prepare": 0.7, "ingest": 0.3, "run": 0.9}}
    assert warm_framework(accounting, 0.35) == pytest.approx(0.35 + (2.0 - 1.9) / 2)
    assert warm_framework(accounting, None) is None
    shares = queue_shares(visits)
    assert shares["last snap→pipeline start"]["p50"] == pytest.approx(0.5)
    assert shares["last snap→pipeline start"]["queued_share"] == 0.0
    assert shares["PUT→snap seen"]["queued_share"] is None
    assert shares["last snap→exported"]["max"] == pytest.approx(1.5)
    assert shares["last snap→summary"]["n"] == 2


def test_capacity_estimate() -> None:
    out = estimate(0.1, 0.9, detectors=189, cadence_s=37.0, utilisation=0.75)
    assert out["busy_cores"] == pytest.approx(189 / 37, abs=0.01)
    assert out["cores"] == 7
    results = {
        "scale-noop": {"kind": "scale", "rows": [{"detectors": 189, "total": 0.1,
                                                  "stages_per_detector_visit": {"prepare": 0.01, "run": 0.01}}]},
        "t": {"kind": "night", "options": {"pipeline": "Trivial", "size": 2048},
              "ours": {"cpu": {"per_detector_visit": {"total": 1.0, "stages": {}},
                               "warm_stages_per_detector_visit": {"median": 0.52, "stages": {"run": 0.3}}}}},
        "small": {"kind": "night", "options": {"pipeline": "Small", "size": 256},
                  "ours": {"cpu": {"per_detector_visit": {"total": 1.0, "stages": {}},
                                   "warm_stages_per_detector_visit": {"median": 0.52, "stages": {"run": 0.3}}}}},
    }
    capacity = from_results(results)
    trivial = capacity["pipelines"]["Trivial"]
    assert trivial["as_measured"]["payload_cpu_s"] == pytest.approx(0.5)
    assert trivial["scaled_to_4096"]["payload_cpu_s"] == pytest.approx(0.5 + 0.3 * 3)  # the run stage × 4
    assert capacity["pipelines"]["Small"]["scaled_to_4096"] is None  # too small to extrapolate
    rows = {goal: met for goal, _, met in goal_rows(results)}
    assert rows["framework ≤ 0.15 CPU-s per detector-visit"] == "yes"


def test_readme_rewrite_only_between_the_markers() -> None:
    text = f"# x\nbefore\n{BEGIN}\nold\n{END}\nafter\n"
    assert rewrite(text, "new\n") == f"# x\nbefore\n{BEGIN}\nnew\n{END}\nafter\n"
    with pytest.raises(ValueError):
        rewrite("no markers", "new\n")


def test_the_night_starts_once_the_fleet_has_settled() -> None:
    """A component still busy starting up (a burst of CPU, then quiet) is waited for, and its
    start-up CPU reported apart."""
    burner = subprocess.Popen([sys.executable, "-c",
                               "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass\n"
                               "time.sleep(30)"])
    try:
        settled = settle(lambda: {"worker": burner.pid}, idle_cores=0.3, window_s=0.2, quiet_windows=3, limit_s=20)
        assert settled["settled"] and settled["waited_s"] >= 0.6
        assert settled["cpu_s"] >= 0.4 and set(settled["components"]) == {"worker"}
        # already quiet: settled after the quiet windows alone
        again = settle(lambda: {"worker": burner.pid}, idle_cores=0.3, window_s=0.2, quiet_windows=3, limit_s=20)
        assert again["settled"] and again["waited_s"] < 2.0 and again["cpu_s"] < 0.2
    finally:
        burner.kill()
        burner.wait()
