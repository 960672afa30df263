"""What the demo's steps share: the run's state, a step, and the error that stops the demo."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from prompt_tasks.settings import Settings
from prompt_tasks.stack import launcher

__all__ = ["DemoError", "DemoRun", "Step"]


class DemoError(RuntimeError):
    """A step of the demo did not reach its goal."""


@dataclass
class DemoRun:
    """What the steps of one demo share."""

    settings: Settings
    skip: Collection[str] = ()
    report: launcher.Reporter = field(default=lambda component, message: None)
    #: Values steps hand to later steps (the test object's key, the stack's status...).
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One step: a title shown while it runs, and the function that runs it."""

    title: str
    run: Callable[[DemoRun], str]
