"""A tiny benchmark run (2 visits, 2 detectors, Trivial, baseline included) keeps the benchmark working.

It brings up its own embedded stack on free ports in a temporary directory, as the full runs
do; it checks that every stage was measured, every artefact written, the committed summary's
shape and that the CPU accounting adds up (components sum to the total, nothing that ran shows
zero), never a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from benchmarks.cpu import GROUPS, IDLE_OK, check
from benchmarks.night import BenchOptions, run_bench
from benchmarks.readme import render
from benchmarks.results import load_results
from benchmarks.stats import STAGES
from prompt_tasks.settings import Settings

pytestmark = pytest.mark.slow


def test_tiny_benchmark_with_baseline(tmp_path: Path) -> None:
    options = BenchOptions(detectors=2, size=64, pipeline="Trivial", visits=2, snaps=1, exptime=1.0, cadence=10.0,
                           lead=3.0, out=tmp_path / "out", wait_s=120.0, quiet=True, results=tmp_path / "results")
    console = Console(file=(tmp_path / "console.txt").open("w"), width=150)
    result = run_bench(options, Settings(state_dir=tmp_path / "unused"), console)
    out = tmp_path / "out" / options.scenario
    assert json.loads((out / "result.json").read_text())["options"]["detectors"] == 2
    assert {Path(p).name for p in result["plots"]} == {"stages.png", "timeline.png", "resources.png"}
    for run in ("ours", "baseline"):
        assert result[run]["outcomes"] == {"ok": 4}, result[run].get("errors")
        measured = {stage for stage, row in result[run]["stages"].items() if row["n"]}
        assert set(STAGES) - {"PUT→snap indexed"} <= measured or run == "baseline"
    assert set(STAGES) <= {s for s, row in result["ours"]["stages"].items() if row["n"]}
    assert set(result["ratios"]) >= {"overhead", "PUT→snap seen", "next_visit→prepared"}
    assert result["cold_start"]["worker_ready_s"] is not None
    assert result["ours"]["resources"]["roles"].keys() >= {"detector-1", "wait", "summary", "intake"}
    assert {goal["goal"] for goal in result["goals"]} and "load_avg_end" in result["machine"]
    _check_cpu_accounting(result)
    _check_committed_summary(tmp_path / "results", options.scenario)
    # the stack is down again: nothing answers on its pid files
    from benchmarks.resources import pid_files

    state = tmp_path / "out" / f"state-{options.scenario}"
    import psutil

    assert not [pid for pid in pid_files(state / "run").values() if psutil.pid_exists(pid)]


def _check_cpu_accounting(result: dict) -> None:
    ours, base = result["ours"]["cpu"], result["baseline"]["cpu"]
    for acc in (ours, base):
        assert acc["check"] == [] and check(acc) == []
        assert sum(acc["components"].values()) == pytest.approx(acc["total_cpu_s"], abs=0.05)
        assert sum(acc["stages"].values()) == pytest.approx(acc["total_cpu_s"], abs=0.05)
        assert acc["detector_visits"] == 4
        assert acc["per_detector_visit"]["total"] == pytest.approx(acc["total_cpu_s"] / 4, abs=1e-3)
    # every component of the stack ran and used CPU; the stages the compute workers ran too
    assert set(ours["groups"]) == set(GROUPS)
    # (beat and the dispatcher may stay under the clock's 10 ms tick in a night this short)
    assert all(seconds > 0 for name, seconds in ours["components"].items() if name not in IDLE_OK), ours["components"]
    assert all(ours["stages"][stage] > 0 for stage in ("prepare", "ingest", "run"))
    assert ours["stages"]["compute outside stages"] >= 0
    assert all(base["stages"][stage] > 0 for stage in ("prepare", "wait", "ingest", "run", "export"))
    assert ours["warm_stages_per_detector_visit"]["n"] == 2
    # the pipelines' quanta are the payload; the framework is everything else, and they add up
    assert 0 < ours["payload_cpu_s"] < ours["total_cpu_s"]
    assert ours["framework_cpu_s"] + ours["payload_cpu_s"] == pytest.approx(ours["total_cpu_s"], abs=1e-3)
    assert result["ours"]["stages"]["graph build CPU (warm)"]["n"] == 2
    assert result["cpu_ratios"]["total"] is not None
    window = result["ours"]["machine_window"]
    assert 0 < window["cpu_busy_share"] <= 1 and window["load_start"] >= 0
    assert set(result["ours"]["latency"]) >= {"PUT→snap seen", "last snap→pipeline start", "last snap→exported",
                                              "last snap→summary", "next_visit→prepared"}


def _check_committed_summary(directory: Path, scenario: str) -> None:
    summary = json.loads((directory / f"{scenario}.json").read_text())
    assert load_results(directory) == {scenario: summary}
    assert summary["schema"] == 1 and summary["scenario"] == scenario and summary["date"]
    assert {"cpus", "load_avg", "load_avg_end"} <= set(summary["machine"])
    for run in ("ours", "baseline"):
        assert {"stages", "cpu", "machine_window", "outcomes", "detector_visits"} <= set(summary[run])
        assert "samples" not in summary[run] and "ledger" not in summary[run]
    assert {"ratios", "cpu_ratios", "goals"} <= set(summary)
    assert sorted(summary["plots"]) == sorted(f"{scenario}-{n}.png" for n in ("cpu", "stages", "timeline"))
    assert all((directory / name).stat().st_size > 0 for name in summary["plots"])
    assert len((directory / f"{scenario}.json").read_bytes()) < 60_000  # small enough to commit
    # the README block renders from it
    assert "| **total** |" in render(load_results(directory))
