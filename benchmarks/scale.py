"""The framework's cost per detector-visit as detectors grow: noop-payload nights at 4 … 189 detectors.

``python -m benchmarks.scale [--detectors 4,16,64,189] [--visits 10]`` plays one night per
detector count with the framework-only payload (``PROMPT_TASKS_PAYLOAD=noop``: the stages do
their bookkeeping, no Butler work) and tiny raws, on two compute workers, and reports for each
the CPU-seconds per detector-visit of every component (the intake's announce and routing, the
dispatcher, the wait worker, the compute workers' Celery and ledger work, the summary worker's
chord callback, Redis: broker, results, chord counters and ledger, and the S3 server), Redis
commands per detector-visit, and the chord join (the last detector's end → the visit's summary).
Flat rows mean the cost per detector-visit does not grow with the camera.

With ``--results DIR`` the table is written to ``DIR/scale-noop.json`` and ``DIR/scale-noop.png``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from benchmarks import stats
from benchmarks.night import BenchOptions, _machine, run_bench
from prompt_tasks.settings import Settings

__all__ = ["cadence_for", "chord_joins", "command", "row_of", "run_scale"]

#: The counts of the issue's table.
COUNTS = (4, 16, 64, 189)


def cadence_for(detectors: int) -> float:
    """A cadence (s) that lets the noop night of ``detectors`` drain on two shared cores."""
    return float(max(10, math.ceil(6 + 0.05 * detectors)))


def chord_joins(ledger: dict[str, dict[str, str]]) -> list[float]:
    """Per visit: the last detector's run end → the visit's summary (the chord join and callback)."""
    out = []
    for raw in ledger.values():
        dvs = stats.detector_visits(raw, {})
        ends = [dv.times["run.end"] for dv in dvs if "run.end" in dv.times]
        summarized = next((dv.summarized for dv in dvs if dv.summarized is not None), None)
        if ends and summarized is not None:
            out.append(summarized - max(ends))
    return out


def row_of(result: dict[str, Any]) -> dict[str, Any]:
    """One row of the table from a noop night's full result."""
    ours = result["ours"]
    acc = ours["cpu"]
    joins = stats.summarize(chord_joins(ours.get("ledger") or {}))
    return {
        "detectors": result["options"]["detectors"], "visits": result["options"]["visits"],
        "cadence_s": result["options"]["cadence"], "detector_visits": acc["detector_visits"],
        "outcomes": ours["outcomes"], "total": acc["per_detector_visit"]["total"],
        "per_detector_visit": acc["per_detector_visit"]["groups"],
        "stages_per_detector_visit": acc["per_detector_visit"]["stages"],
        "redis_commands_per_detector_visit": acc.get("redis_commands_per_detector_visit"),
        "chord_join_s": {k: joins[k] for k in ("p50", "p95", "max")},
        "last_snap_to_summary_s": {k: ours["stages"]["last snap→summary"][k] for k in ("p50", "p95", "max")},
        "machine_window": ours.get("machine_window"), "check": acc.get("check"),
    }


def run_scale(counts: Sequence[int], visits: int, size: int, base: Settings, console: Console, out: Path,
              results: Path | None = None) -> dict[str, Any]:
    """One noop night per detector count; the table (and, with ``results``, its committed files)."""
    rows = []
    date = datetime.now(UTC).isoformat(timespec="seconds")
    machine = _machine()
    for n in counts:
        options = BenchOptions(detectors=n, size=size, pipeline="Trivial", payload="noop", visits=visits, snaps=1,
                               exptime=1.0, cadence=cadence_for(n), lead=10.0, workers=2, baseline=False,
                               cold_start=False, plots=False, quiet=True, out=out, name=f"noop-{n}x{size}",
                               wait_s=300.0)
        result = run_bench(options, base, console)
        rows.append(row_of(result))
    machine["load_avg_end"] = _machine()["load_avg"]
    table = {"schema": 1, "kind": "scale", "scenario": "scale-noop", "date": date, "machine": machine,
             "options": {"size": size, "visits": visits, "snaps": 1, "workers": 2, "payload": "noop",
                         "counts": list(counts)}, "rows": rows}
    print_table(table, console)
    if results is not None:
        from benchmarks.plots import scale_plot
        from benchmarks.results import write_json

        results.mkdir(parents=True, exist_ok=True)
        scale_plot(rows, results / "scale-noop.png")
        table["plots"] = ["scale-noop.png"]
        console.print(f"committed summary: {write_json(table, results / 'scale-noop.json')}")
    return table


def print_table(table: dict[str, Any], console: Console) -> None:
    """CPU-milliseconds per detector-visit by component, one row per detector count."""
    rows = table["rows"]
    groups: list[str] = []
    for row in rows:
        groups += [g for g in row["per_detector_visit"] if g not in groups]
    out = Table(title="framework (noop payload): CPU-ms per detector-visit")
    for column in ("detectors", "det-visits", *groups, "total", "Redis cmds", "chord join p50"):
        out.add_column(column, justify="right")
    for row in rows:
        cells = [str(row["detectors"]), str(row["detector_visits"])]
        cells += [f"{1000 * (row['per_detector_visit'].get(g) or 0.0):.1f}" for g in groups]
        join = row["chord_join_s"]["p50"]
        cells += [f"{1000 * row['total']:.1f}", str(row["redis_commands_per_detector_visit"]),
                  "-" if join is None else f"{1000 * join:.0f} ms"]
        out.add_row(*cells)
    console.print(out)


@click.command("bench-scale")
@click.option("--detectors", "counts", default=",".join(str(c) for c in COUNTS), show_default=True,
              help="Comma-separated detector counts.")
@click.option("--visits", type=click.IntRange(1), default=10, show_default=True)
@click.option("--size", type=click.IntRange(16, 8192), default=16, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True)
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=None)
def command(counts: str, visits: int, size: int, out: Path, results: Path | None) -> None:
    """The framework's CPU per detector-visit at growing detector counts (noop payload)."""
    run_scale([int(c) for c in counts.split(",") if c.strip()], visits, size, Settings(),
              Console(highlight=False, width=None if sys.stdout.isatty() else 140), out, results)


if __name__ == "__main__":
    command.main(prog_name="python -m benchmarks.scale")
