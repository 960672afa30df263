"""The benchmark's PNGs: stage latencies (ours vs baseline), a visit's timeline, memory curves.

- ``stages.png``: the distribution of every stage, ours beside the baseline (log time axis);
- ``timeline.png``: one visit, detectors × stages (the project's own
  :func:`prompt_tasks.daytime.report.draw`), taken from the middle of the night so it is warm;
- ``resources.png``: resident memory and CPU of each component over the night;
- ``memory.png`` (memory mode): each compute worker's RSS after every visit;
- ``cpu.png``: CPU-seconds per detector-visit by stage, ours beside the baseline;
- ``scale.png``: the framework's CPU per detector-visit by component against the detectors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

__all__ = ["cpu_plot", "draw_all", "memory_plot", "resources_plot", "scale_plot", "stage_plot", "timeline_plot"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_plot(ours: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]] | None,
               path: Path, title: str = "") -> Path:
    """Box plots of every stage's samples (absolute values, log axis), ours and baseline."""
    plt = _pyplot()
    stages = [s for s in ours if ours[s] or (baseline and baseline.get(s))]
    fig, ax = plt.subplots(figsize=(10, 0.55 * max(len(stages), 1) * (2 if baseline else 1) + 1.5))
    try:
        rows, labels, colours = [], [], []
        for stage in stages:
            if baseline is not None:
                rows.append([max(abs(v), 1e-4) for v in baseline.get(stage) or [float("nan")]])
                labels.append(f"{stage} (baseline)")
                colours.append("tab:red")
            rows.append([max(abs(v), 1e-4) for v in ours[stage] or [float("nan")]])
            labels.append(stage)
            colours.append("tab:blue")
        parts = ax.boxplot(rows, vert=False, patch_artist=True, whis=(5, 95), showfliers=True)
        for patch, colour in zip(parts["boxes"], colours, strict=False):
            patch.set_facecolor(colour)
            patch.set_alpha(0.5)
        ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("seconds (|value|; whiskers p5-p95)")
        ax.set_title(title or "stage latencies: ours (blue) vs baseline (red)", fontsize=10)
        ax.grid(axis="x", alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def timeline_plot(raw: Mapping[str, str], path: Path) -> Path | None:
    """One visit's timeline from its raw ledger hash (None when the hash is empty)."""
    from prompt_tasks.daytime.report import draw
    from prompt_tasks.store.ledger import parse_record

    # The benchmark replays visits after their planned start with wide margins: the expected
    # end and deadline markers would only stretch the axis.
    record = parse_record({k: v for k, v in raw.items() if k not in ("deadline", "expected_end")})
    return None if record is None else draw(record, path, time.time())


def resources_plot(samples: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """RSS (MB) and CPU (%) of each component over the night."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    try:
        if samples:
            t0 = samples[0]["t"]
            names = sorted({n for s in samples for n in s["roles"]})
            for name in names:
                ts = [s["t"] - t0 for s in samples if name in s["roles"]]
                top.plot(ts, [s["roles"][name]["rss_mb"] for s in samples if name in s["roles"]], label=name)
                bottom.plot(ts, [s["roles"][name]["cpu"] for s in samples if name in s["roles"]], label=name)
            cores = psutil.cpu_count() or 1
            bottom.plot([s["t"] - t0 for s in samples], [s["machine_cpu"] * cores for s in samples], "k--",
                        label="machine (x cores)", linewidth=1)
        top.set_ylabel("RSS (MB)")
        bottom.set_ylabel("CPU (% of one core)")
        bottom.set_xlabel("seconds")
        top.legend(fontsize=7, ncol=3)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def memory_plot(curve: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Each compute worker's resident memory (process tree) after every visit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    try:
        names = sorted({k for p in curve for k in p if k.startswith("detector-") and not k.endswith(".pids")})
        for name in names:
            ax.plot([p["visits"] for p in curve if name in p], [p[name] for p in curve if name in p],
                    marker=".", label=name)
        ax.axvline(10, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("visits summarized")
        ax.set_ylabel("RSS of the worker (MB, parent + pool child)")
        ax.set_title("compute worker memory over visits", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def draw_all(result: Mapping[str, Any], hashes: Mapping[str, Mapping[str, str]], played: Any, out: Path) -> list[Path]:
    """Every PNG of a benchmark run into ``out``; their paths."""
    paths = [stage_plot(result["ours"]["samples"],
                        result["baseline"]["samples"] if result.get("baseline") else None,
                        out / "stages.png",
                        f"{result['options']['pipeline']}, {result['options']['detectors']} detectors: "
                        "ours (blue) vs baseline (red)")]
    groups = [g for g, raw in hashes.items() if raw]
    if groups:
        timeline = timeline_plot(hashes[groups[len(groups) // 2]], out / "timeline.png")
        if timeline is not None:
            paths.append(timeline)
    paths.append(resources_plot(result["ours"].get("resource_samples", []), out / "resources.png"))
    return paths


def cpu_plot(ours: Mapping[str, Any], baseline: Mapping[str, Any] | None, path: Path, title: str = "") -> Path:
    """CPU-seconds per detector-visit by stage (stacked bars), ours beside the baseline."""
    plt = _pyplot()
    runs = [("ours", ours)] + ([("baseline", baseline)] if baseline else [])
    stages: list[str] = []
    for _, acc in runs:
        stages += [s for s in acc["per_detector_visit"]["stages"] if s not in stages]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.9 * len(runs)))
    try:
        cmap = plt.get_cmap("tab20")
        labelled: set[str] = set()
        for row, (_label, acc) in enumerate(runs):
            left = 0.0
            for k, stage in enumerate(stages):
                value = max(acc["per_detector_visit"]["stages"].get(stage) or 0.0, 0.0)
                if value <= 0:
                    continue
                ax.barh(row, value, left=left, color=cmap(k % 20), label=None if stage in labelled else stage)
                labelled.add(stage)
                left += value
            ax.text(left, row, f"  {acc['per_detector_visit']['total']:.2f} s", va="center", fontsize=8)
        ax.set_yticks(range(len(runs)), [label for label, _ in runs])
        ax.invert_yaxis()
        ax.set_xlabel("CPU-seconds per detector-visit")
        ax.set_title(title or "CPU per detector-visit by stage", fontsize=10)
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(runs) > 1 else -0.6))
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def scale_plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """CPU-seconds per detector-visit of each component against the number of detectors."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        xs = [row["detectors"] for row in rows]
        groups: list[str] = []
        for row in rows:
            groups += [g for g in row["per_detector_visit"] if g not in groups]
        for group in groups:
            ax.plot(xs, [1000 * (row["per_detector_visit"].get(group) or 0.0) for row in rows], marker="o", label=group)
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("detectors per visit")
        ax.set_ylabel("CPU-milliseconds per detector-visit")
        ax.set_title(title or "framework cost per detector-visit (noop payload)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
