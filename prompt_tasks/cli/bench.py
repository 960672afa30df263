"""``prompt-tasks bench``: the main benchmark (:mod:`benchmarks.night`)."""

from __future__ import annotations

import click

from benchmarks.night import command as bench

__all__ = ["COMMANDS"]

COMMANDS: list[click.Command] = [bench]
