"""Every committed benchmark scenario, rerun in one command, and the README regenerated.

``python -m benchmarks.suite`` (``make bench``) runs, one after the other, each sized to be as
small as its purpose allows on a shared 2-core machine:

``unsaturated-trivial``
    2 detectors of 256², Trivial, 6 visits, one compute worker per detector, a cadence above
    one visit's work: the latency goals with nothing queued, and the CPU accounting against
    the baseline (2 visits × 2 detectors) in the same invocation;
``unsaturated-appipe``
    2 detectors of 2048², ApPipe, 3 visits, sized the same way: ApPipe's CPU per
    detector-visit for the capacity estimate (baseline 1 visit × 2 detectors);
``fleet-189``
    benchmark (b)'s shape: 189 detectors of 64², Trivial, 5 visits × 2 snaps at the real 37 s cadence on
    4 compute workers (saturated: it measures cost, not latency): the framework's CPU per
    detector-visit, the warm quantum-graph build, and 20 announcements of 189 detectors
    (baseline: 1 visit × 4 detectors);
``appipe-overlap``
    2 detectors of 1024², ApPipe, 4 visits at a cadence that announces each visit while the
    previous one's pipelines run: the next visit's prepare must not wait behind them;
``scale-noop``
    the framework-only payload at 4, 16, 64 and 189 detectors × 10 visits, 16² raws
    (:mod:`benchmarks.scale`);
``memory``
    100 quick Trivial visits on 2 detectors, each compute worker's memory after every visit;

then writes ``benchmarks/results/capacity.json`` (:mod:`benchmarks.capacity`) and rewrites the
README's Performance block (:mod:`benchmarks.readme`). ``--only NAME`` (repeatable) reruns
some scenarios and keeps the others' committed results.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console

from benchmarks.night import BenchOptions, run_bench, run_memory
from prompt_tasks.settings import Settings

__all__ = ["SCENARIOS", "command"]

RESULTS = Path(__file__).parent / "results"


def _fresh(out: Path, scenario: str) -> None:
    """Remove a previous run's state of ``scenario``: a central repo left by an earlier run
    points at that run's servers (and compute workers must start cold anyway)."""
    shutil.rmtree(out / f"state-{scenario}", ignore_errors=True)


def _unsaturated_trivial(out: Path, console: Console) -> None:
    _fresh(out, "unsaturated-trivial")
    run_bench(BenchOptions(name="unsaturated-trivial", detectors=2, size=256, pipeline="Trivial", visits=6, snaps=2,
                           exptime=2.0, lead=10.0, unsaturated=True, baseline_visits=2, out=out, results=RESULTS,
                           quiet=True), Settings(), console)


def _unsaturated_appipe(out: Path, console: Console) -> None:
    _fresh(out, "unsaturated-appipe")
    run_bench(BenchOptions(name="unsaturated-appipe", detectors=2, size=2048, pipeline="ApPipe", visits=3, snaps=2,
                           exptime=5.0, lead=20.0, unsaturated=True, baseline_visits=1, out=out, results=RESULTS,
                           quiet=True), Settings(), console)


def _fleet_189(out: Path, console: Console) -> None:
    _fresh(out, "fleet-189")
    run_bench(BenchOptions(name="fleet-189", detectors=189, size=64, pipeline="Trivial", visits=5, snaps=2,
                           exptime=2.0, cadence=37.0, lead=20.0, workers=4, baseline_visits=1, baseline_detectors=4,
                           announce_visits=20, cold_start=False, out=out, results=RESULTS, quiet=True),
              Settings(), console)


def _appipe_overlap(out: Path, console: Console) -> None:
    _fresh(out, "appipe-overlap")
    run_bench(BenchOptions(name="appipe-overlap", detectors=2, size=1024, pipeline="ApPipe", visits=4, snaps=2,
                           exptime=5.0, cadence=38.0, lead=20.0, workers=2, baseline=False, cold_start=False,
                           out=out, results=RESULTS, quiet=True), Settings(), console)


def _scale(out: Path, console: Console) -> None:
    from benchmarks.scale import COUNTS, run_scale

    run_scale(COUNTS, 10, 16, Settings(), console, out, RESULTS)


def _memory(out: Path, console: Console) -> None:
    _fresh(out, "memory-2x64")
    run_memory(BenchOptions(detectors=2, size=64, speed=4.0, cadence=10.0, out=out, results=RESULTS, quiet=True),
               Settings(), 100, console)


#: Scenario → its run, in order.
SCENARIOS: dict[str, Callable[[Path, Console], None]] = {
    "unsaturated-trivial": _unsaturated_trivial,
    "unsaturated-appipe": _unsaturated_appipe,
    "fleet-189": _fleet_189,
    "appipe-overlap": _appipe_overlap,
    "scale-noop": _scale,
    "memory": _memory,
}


@click.command("bench-suite")
@click.option("--only", multiple=True, type=click.Choice(list(SCENARIOS)), help="Rerun only these scenarios.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True,
              help="Where the full results and the stacks' state go (not committed).")
def command(only: tuple[str, ...], out: Path) -> None:
    """Rerun every committed benchmark scenario, then regenerate the capacity estimate and the README."""
    from benchmarks import capacity, readme

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    for name, run in SCENARIOS.items():
        if only and name not in only:
            continue
        console.rule(name)
        run(out, console)
    console.rule("capacity")
    capacity.main(["--results", str(RESULTS)])
    sys.exit(readme.main(["--results", str(RESULTS)]))


if __name__ == "__main__":
    command.main(prog_name="python -m benchmarks.suite")
