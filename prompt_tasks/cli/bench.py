"""``prompt-tasks bench``: the main benchmark (:mod:`benchmarks.night`); ``prompt-tasks bench-suite``:
every committed scenario rerun, the results and the README's Performance tables regenerated
(:mod:`benchmarks.suite`); ``prompt-tasks bench-scale``: the framework's cost as detectors grow
(:mod:`benchmarks.scale`)."""

from __future__ import annotations

import click

from benchmarks.night import command as bench
from benchmarks.scale import command as scale
from benchmarks.suite import command as suite

__all__ = ["COMMANDS"]

COMMANDS: list[click.Command] = [bench, suite, scale]
