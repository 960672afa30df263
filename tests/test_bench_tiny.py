"""A tiny benchmark run (2 visits, 2 detectors, Trivial, baseline included) keeps the benchmark working.

It brings up its own embedded stack on free ports in a temporary directory, as the full runs
do; it checks that every stage was measured and every artefact written, never a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from benchmarks.night import BenchOptions, run_bench
from benchmarks.stats import STAGES
from prompt_tasks.settings import Settings

pytestmark = pytest.mark.slow


def test_tiny_benchmark_with_baseline(tmp_path: Path) -> None:
    options = BenchOptions(detectors=2, size=64, pipeline="Trivial", visits=2, snaps=1, exptime=1.0, cadence=10.0,
                           lead=3.0, out=tmp_path / "out", wait_s=120.0, quiet=True)
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
    # the stack is down again: nothing answers on its pid files
    from benchmarks.resources import pid_files

    state = tmp_path / "out" / f"state-{options.scenario}"
    import psutil

    assert not [pid for pid in pid_files(state / "run").values() if psutil.pid_exists(pid)]
