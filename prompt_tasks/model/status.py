"""Status objects: what every stage task returns instead of raising.

A chain passes the status of one stage to the next; a stage given a status that is not ``ok``
short-circuits and passes it on, so the visit's summary always runs and always sees every
detector. Statuses travel through the broker as JSON dictionaries.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Self

__all__ = ["Outcome", "StageStatus"]


class Outcome(StrEnum):
    """How a stage ended."""

    OK = "ok"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    ABORTED = "aborted"


@dataclass
class StageStatus:
    """The result of one stage of one detector-visit.

    Parameters
    ----------
    stage
        Stage name (``prepare``, ``wait``, ``ingest``, ``run``...).
    outcome
        How it ended.
    instrument, group, detector
        The detector-visit.
    reason
        Human-readable reason when the outcome is not ``ok``.
    code
        Stable error code (see :mod:`prompt_tasks.errors`).
    data
        Stage-specific JSON-ready details (datasets transferred, snaps found...).
    """

    stage: str
    outcome: Outcome
    instrument: str
    group: str
    detector: int
    reason: str = ""
    code: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    finished: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        """True when the stage succeeded and the chain should go on."""
        return self.outcome is Outcome.OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = asdict(self)
        out["outcome"] = self.outcome.value
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | Self) -> Self:
        """Inverse of :meth:`to_dict` (accepts an instance too)."""
        if isinstance(raw, cls):
            return raw
        values = dict(raw)
        values["outcome"] = Outcome(values["outcome"])
        return cls(**values)
