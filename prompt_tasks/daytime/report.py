"""A visit's timeline: detectors × stages, drawn from the ledger as a PNG.

:func:`timeline` turns a :class:`~prompt_tasks.store.ledger.VisitRecord` into bars (pure): one per
detector and stage, from the stage's start to its end (or to ``now`` while it runs), in
seconds since the visit was received. :func:`draw` plots them with matplotlib (Agg, no
display): one row per detector, one colour per stage, snap arrivals as ticks, a failed
detector's last stage outlined in red with its code, and the visit's expected end, deadline
and summary as vertical lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prompt_tasks.store.ledger import STAGES

if TYPE_CHECKING:
    from prompt_tasks.store.ledger import VisitRecord

__all__ = ["STAGE_COLOURS", "Bar", "draw", "markers", "timeline"]

STAGE_COLOURS: dict[str, str] = {"prepare": "#4c72b0", "wait": "#dd8452", "ingest": "#55a868", "run": "#8172b3"}


@dataclass(frozen=True)
class Bar:
    """One stage of one detector on the timeline (seconds since the visit was received)."""

    detector: int
    stage: str
    start: float
    end: float
    running: bool = False
    failed: bool = False
    label: str = ""


def _origin(record: VisitRecord) -> float:
    if record.received is not None:
        return record.received
    starts = [t for det in record.detectors.values() for t in det.times.values()]
    return min(starts) if starts else 0.0


def timeline(record: VisitRecord, now: float) -> list[Bar]:
    """The bars of ``record``; a stage still running ends at ``now``."""
    origin = _origin(record)
    bars = []
    for det, rec in sorted(record.detectors.items()):
        for stage in STAGES:
            start = rec.times.get(f"{stage}.start")
            end = rec.times.get(f"{stage}.end")
            if start is None and end is None:
                continue
            running = end is None
            start = end if start is None else start
            end = max(now, start) if end is None else end
            failed = rec.stage == stage and rec.outcome not in ("", "ok")
            bars.append(Bar(det, stage, start - origin, end - origin, running, failed,
                            rec.code if failed else ""))
    return bars


def markers(record: VisitRecord) -> dict[str, float]:
    """Visit-wide times (seconds since received): expected end, deadline, summary."""
    origin = _origin(record)
    out = {}
    for name, value in (("expected end", record.expected_end), ("deadline", record.deadline),
                        ("summary", record.summarized)):
        if value is not None:
            out[name] = value - origin
    return out


def draw(record: VisitRecord, path: Path, now: float) -> Path:
    """Draw the timeline of ``record`` into the PNG ``path``; the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    bars = timeline(record, now)
    detectors = sorted(record.detectors) or [0]
    row = {det: i for i, det in enumerate(detectors)}
    height = max(2.5, 0.35 * len(detectors) + 1.5)
    fig, ax = plt.subplots(figsize=(10, height))
    try:
        for bar in bars:
            ax.barh(row[bar.detector], max(bar.end - bar.start, 0.002), left=bar.start, height=0.6,
                    color=STAGE_COLOURS.get(bar.stage, "grey"), alpha=0.5 if bar.running else 0.9,
                    edgecolor="red" if bar.failed else "none", linewidth=1.5 if bar.failed else 0)
            if bar.failed:
                ax.text(bar.end, row[bar.detector], f" {bar.label or 'failed'}", va="center",
                        fontsize=7, color="red")
        origin = _origin(record)
        for det, rec in record.detectors.items():
            for t in rec.snaps.values():
                ax.plot([t - origin] * 2, [row[det] - 0.35, row[det] + 0.35], color="black", linewidth=1)
        for (name, t), style in zip(markers(record).items(), ("--", ":", "-."), strict=False):
            ax.axvline(t, color="grey", linestyle=style, linewidth=1)
            ax.text(t, len(detectors) - 0.4, f" {name}", fontsize=7, color="grey")
        ax.set_yticks(range(len(detectors)), [str(d) for d in detectors])
        ax.invert_yaxis()
        ax.set_ylabel("detector")
        ax.set_xlabel("seconds since next_visit received")
        counts = ", ".join(f"{k} {v}" for k, v in sorted(record.counts().items()))
        ax.set_title(f"{record.instrument} {record.group}  ({counts})", fontsize=10)
        handles = [Patch(color=c, label=s) for s, c in STAGE_COLOURS.items()]
        ax.legend(handles=handles, loc="lower right", fontsize=7, ncol=4)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
