"""The committed results: one small JSON per scenario under ``benchmarks/results/``, plus PNGs.

A full ``result.json`` (``bench-results/``, ignored by git) keeps every sample and the raw
ledger so it can be analysed again; :func:`compact` keeps what a reader and the README need:
the machine, the date, its load and CPU busy share, every stage's p50 / p95 / max, the
latencies with their queued share, the CPU accounting, the ratios against the baseline run
in the same invocation and the goals. :func:`write_scenario` writes it as
``<scenario>.json`` with the scenario's PNGs beside it (``<scenario>-stages.png``,
``<scenario>-cpu.png``, ``<scenario>-timeline.png``); :mod:`benchmarks.readme` renders the
README's tables from these files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA", "compact", "load_results", "write_json", "write_scenario"]

#: Version of the committed result format.
SCHEMA = 1
#: Option fields worth keeping (paths and switches of the run itself are left out).
_OPTIONS = ("detectors", "size", "pipeline", "visits", "snaps", "exptime", "cadence", "lead", "workers", "bands",
            "speed", "payload", "unsaturated", "visit_work_s", "baseline_visits", "baseline_detectors",
            "baseline_workers")


def _run(run: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("detector_visits", "outcomes", "throughput_per_min", "prepared_late", "stages", "latency", "cpu",
            "machine_window", "first_vs_warm", "workers", "visits", "detectors", "late_events", "startup")
    out = {k: run[k] for k in keep if k in run}
    res = run.get("resources") or {}
    out["resources"] = {k: res.get(k) for k in ("machine_cpu_mean_pct", "machine_cpu_busy_fraction",
                                                "stack_cpu_mean_cores", "load_mean", "load_max")}
    out["rss_peak_mb"] = {name: usage["rss_peak_mb"] for name, usage in (res.get("roles") or {}).items()}
    return out


def compact(result: Mapping[str, Any]) -> dict[str, Any]:
    """The committed summary of a full benchmark result (see the module doc)."""
    options = result.get("options", {})
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": result.get("kind", "night"),
        "scenario": result.get("scenario") or options.get("name") or "",
        "date": result.get("date"),
        "machine": result.get("machine"),
        "options": {k: options[k] for k in _OPTIONS if k in options},
        "ours": _run(result["ours"]),
    }
    if result.get("baseline"):
        out["baseline"] = _run(result["baseline"])
        out["ratios"] = result.get("ratios")
        out["cpu_ratios"] = result.get("cpu_ratios")
    for key in ("goals", "cold_start", "announce"):
        if result.get(key) is not None:
            out[key] = result[key]
    return out


def write_json(data: Mapping[str, Any], path: Path) -> Path:
    """Write ``data`` as stable, diff-friendly JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False, default=str) + "\n")
    return path


def write_scenario(result: Mapping[str, Any], directory: Path) -> Path:
    """``<directory>/<scenario>.json`` and the scenario's PNGs; the JSON's path."""
    from benchmarks.plots import cpu_plot

    summary = compact(result)
    name = summary["scenario"] = summary["scenario"] or Path(str(result["options"]["out"])).name
    directory.mkdir(parents=True, exist_ok=True)
    plots = []
    for plot in result.get("plots") or ():
        source = Path(plot)
        if source.name in ("stages.png", "timeline.png") and source.exists():
            target = directory / f"{name}-{source.name}"
            shutil.copyfile(source, target)
            plots.append(target.name)
    ours_cpu = result["ours"].get("cpu")
    if ours_cpu:
        base_cpu = (result.get("baseline") or {}).get("cpu")
        target = cpu_plot(ours_cpu, base_cpu, directory / f"{name}-cpu.png",
                          f"{name}: CPU-seconds per detector-visit by stage")
        plots.append(target.name)
    summary["plots"] = sorted(plots)
    return write_json(summary, directory / f"{name}.json")


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    """Scenario → committed summary, for every result of this benchmark in ``directory``
    (other files there, such as the science engineer's ``science_*``, are left alone)."""
    out = {}
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith("science_"):
            continue
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            out[path.stem] = data
    return out
