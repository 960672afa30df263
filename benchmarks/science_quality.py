"""Detection quality of the demo ApPipe against the simulator's ground truth, and its CPU cost.

``python -m benchmarks.science_quality [--size 2048] [--visits 4] [--detectors 2]`` simulates
detector-visits of the simulated camera (random pointings, rotations, seeing and nights),
builds their inputs in memory the way the central repository holds them (master
calibrations, template patches, reference-catalogue shards) and runs the pixel stages of the
pipeline (ISR of each snap, calibrate, subtract, detect) through each stage's
``PipelineTask.run``, twice: the current implementation (``prompt_tasks.science``) and the
frozen one before photutils and reproject (``benchmarks.science_baseline``), on the same
inputs in the same process.

It reports completeness against the expected S/N of each transient, false detections per
detector-visit, position and flux errors of the recovered transients, and CPU seconds per
detector-visit of both implementations side by side; it writes
``benchmarks/results/science_quality.json``, ``science_completeness.png`` and
``science_quality.md``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from astropy.nddata import CCDData
from astropy.table import Table

from prompt_tasks.instruments.simcam import calibs, templates
from prompt_tasks.instruments.simcam.central import survey_region
from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.formatter import read_ccd
from prompt_tasks.instruments.simcam.geometry import ZERO_POINTS
from prompt_tasks.instruments.simcam.raws import simulate_visit
from prompt_tasks.instruments.simcam.refcat import refcat_shards
from prompt_tasks.instruments.simcam.sky import Sky
from prompt_tasks.instruments.simcam.skymap import SimSkyMap
from prompt_tasks.instruments.simcam.visits import VisitSpec

__all__ = ["SNR_BINS", "DetectorVisit", "main", "run_stages", "score", "world"]

RESULTS = Path(__file__).resolve().parent / "results"
#: Edges of the expected-S/N bins of the completeness table.
SNR_BINS = (3.0, 5.0, 6.5, 8.0, 12.0, 20.0, 50.0, math.inf)
#: A detection within this of a transient is that transient (arcsec).
MATCH_ARCSEC = 1.0
#: Transients nearer than this to the border are not expected (pixels, the detector's edge cut).
EDGE = 8
STAGES = ("isr", "calibrate", "subtract", "detect")


@dataclass
class DetectorVisit:
    """Everything one detector-visit's pixel stages read, built in memory."""

    visit: VisitSpec
    detector: int
    raws: list[CCDData]
    bias: CCDData
    dark: CCDData
    flat: CCDData
    templates: list[CCDData]
    refcat: list[Table]
    truth: Table


def world(size: int, detectors: int) -> SimConfig:
    """The simulated world: ``detectors`` detectors of ``size`` pixels, r band."""
    return SimConfig(n_detectors=detectors, size=size, bands=("r",))


def visits(config: SimConfig, n: int, seed: int = 7) -> Iterator[VisitSpec]:
    """``n`` visits on different nights, pointings, rotations and seeing."""
    rng = np.random.default_rng(seed)
    start = config.epoch_starts[-1] + 180 * 86400.0
    for k in range(n):
        yield VisitSpec(
            start=start + k * 86400.0 * rng.uniform(1.0, 9.0) + rng.uniform(0, 3600),
            ra=config.field_ra + rng.uniform(-0.5, 0.5) * config.field_radius,
            dec=config.field_dec + rng.uniform(-0.5, 0.5) * config.field_radius,
            camera_angle=float(rng.uniform(0, 360)),
            physical_filter="SimCam-r",
            snaps=2,
            seeing=float(rng.uniform(0.6, 1.1)),
        )


def detector_visit(
    config: SimConfig, skymap: SimSkyMap, visit: VisitSpec, detector: int, sky: Sky
) -> DetectorVisit:
    """Raws, calibrations, templates, refcat and truth of one detector-visit."""
    raws = [
        read_ccd(io.BytesIO(data))
        for data in simulate_visit(config, visit, [detector], sky=sky).values()
    ]
    plane = config.focal_plane
    region = plane.footprint(detector, visit.ra, visit.dec, visit.camera_angle)
    epoch = config.epoch_of(visit.start)
    patches = skymap.patches_overlapping(region)
    return DetectorVisit(
        visit=visit,
        detector=detector,
        raws=raws,
        bias=calibs.master_bias(config, detector, epoch),
        dark=calibs.master_dark(config, detector, epoch),
        flat=calibs.master_flat(config, detector, visit.band, epoch),
        templates=[
            templates.make_template(config, skymap, p.tract, p.id, visit.band, sky)
            for p in patches
        ],
        refcat=list(refcat_shards(config, region, sky).values()),
        truth=sky.truth(visit, detector),
    )


def _implementation(name: str) -> dict[str, Any]:
    """The task classes of an implementation (``current`` or ``baseline``)."""
    import importlib

    package = "prompt_tasks.science" if name == "current" else "benchmarks.science_baseline"

    def module(stage: str) -> ModuleType:
        return importlib.import_module(f"{package}.{stage}")

    return {
        "isr": module("isr").IsrTask,
        "calibrate": module("calibrate").CalibrateTask,
        "subtract": module("subtract").SubtractTask,
        "detect": module("detect").DetectDiaSourcesTask,
    }


def run_stages(
    tasks: dict[str, Any], dv: DetectorVisit
) -> tuple[Table, CCDData, dict[str, float]]:
    """Run ISR → detect on ``dv``; the DIA sources, the visit image and CPU s per stage."""
    cpu: dict[str, float] = {}

    def timed(stage: str, call: Callable[[], Any]) -> Any:
        begin = time.process_time()
        result = call()
        cpu[stage] = cpu.get(stage, 0.0) + time.process_time() - begin
        return result

    isr = tasks["isr"]()
    snaps = [
        timed("isr", lambda r=raw: isr.run(r, dv.bias, dv.dark, dv.flat)).post_isr_image
        for raw in dv.raws
    ]
    calibrated = timed(
        "calibrate",
        lambda: tasks["calibrate"]().run(snaps, dv.refcat, band=dv.visit.band),
    )
    subtracted = timed(
        "subtract",
        lambda: tasks["subtract"]().run(calibrated.visit_image, dv.templates),
    )
    detected = timed("detect", lambda: tasks["detect"]().run(subtracted.difference))
    return detected.dia_sources, calibrated.visit_image, cpu


def score(dv: DetectorVisit, sources: Table, science: CCDData) -> dict[str, Any]:
    """Truth rows scored against ``sources``: expected S/N, found, position and flux errors.

    The expected S/N of a transient is its true difference flux (the simulator's zero point)
    over the PSF-flux noise of the science image (``BGNOISE · sqrt(4π) · PSFSIG``); the flux
    error compares the measured flux (electrons) with that true flux.
    """
    from prompt_tasks.science.matching import match_sky

    meta = science.meta
    exptime = float(meta["EXPTIME"])
    zp = ZERO_POINTS[dv.visit.band]
    truth = dv.truth
    now = 10 ** (-0.4 * (np.asarray(truth["mag"]) - zp)) * exptime
    ref = np.asarray(truth["ref_mag"], float)
    before = np.where(np.isfinite(ref), 10 ** (-0.4 * (np.nan_to_num(ref, posinf=99) - zp)), 0) * exptime
    true_flux = now - before
    noise = float(meta["BGNOISE"]) * math.sqrt(4 * math.pi) * float(meta["PSFSIG"])
    ny, nx = science.data.shape
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    inside = (x >= EDGE) & (x < nx - EDGE) & (y >= EDGE) & (y < ny - EDGE)
    match = match_sky(truth["ra"], truth["dec"], sources["ra"], sources["dec"], MATCH_ARCSEC)
    found = np.zeros(len(truth), bool)
    found[match.first] = True
    dx = np.full(len(truth), np.nan)
    dflux = np.full(len(truth), np.nan)
    pull = np.full(len(truth), np.nan)
    if len(match):
        s, d = match.first, match.second
        dx[s] = np.hypot(np.asarray(sources["x"])[d] - x[s], np.asarray(sources["y"])[d] - y[s])
        measured = np.asarray(sources["psfFluxElectrons"])[d]
        err = np.asarray(sources["psfFluxErr"])[d] / np.abs(
            np.asarray(sources["psfFlux"])[d] / np.where(measured == 0, 1, measured)
        )
        dflux[s] = measured / true_flux[s] - 1
        pull[s] = (measured - true_flux[s]) / err
    matched = np.zeros(len(sources), bool)
    matched[match.second] = True
    return {
        "expected_snr": (np.abs(true_flux) / noise)[inside],
        "found": found[inside],
        "position_error": dx[inside],
        "flux_error": dflux[inside],
        "flux_pull": pull[inside],
        "n_false": int((~matched).sum()),
    }


def _collect(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Completeness per S/N bin, false detections and errors over all detector-visits."""
    snr = np.concatenate([s["expected_snr"] for s in scores])
    found = np.concatenate([s["found"] for s in scores])
    pos = np.concatenate([s["position_error"] for s in scores])
    flux = np.concatenate([s["flux_error"] for s in scores])
    pull = np.concatenate([s["flux_pull"] for s in scores])
    bins = []
    for low, high in itertools.pairwise(SNR_BINS):
        sel = (snr >= low) & (snr < high)
        bins.append({"snr_low": low, "snr_high": None if math.isinf(high) else high,
                     "n": int(sel.sum()), "found": int(found[sel].sum()),
                     "completeness": round(float(found[sel].mean()), 4) if sel.any() else None})
    bright = snr >= 8
    false = [s["n_false"] for s in scores]

    def stats(values: np.ndarray) -> dict[str, float | None]:
        v = values[np.isfinite(values)]
        return {"median": round(float(np.median(v)), 4) if len(v) else None,
                "p95": round(float(np.percentile(v, 95)), 4) if len(v) else None}

    return {
        "completeness": bins,
        "n_expected_snr_ge_8": int(bright.sum()),
        "n_missed_snr_ge_8": int((bright & ~found).sum()),
        "false_per_detector_visit": {"mean": round(float(np.mean(false)), 3), "max": int(max(false)),
                                     "per_detector_visit": false},
        "position_error_px_snr_ge_8": stats(pos[bright]),
        "abs_flux_error_snr_ge_8": stats(np.abs(flux[bright])),
        "flux_bias_snr_ge_8": round(float(np.nanmedian(flux[bright])), 4) if bright.any() else None,
        "abs_flux_pull_snr_ge_8": stats(np.abs(pull[bright])),
    }


def _cpu_stats(cpu: list[dict[str, float]]) -> dict[str, Any]:
    """Median and p95 CPU seconds per detector-visit, per stage and in total."""
    out: dict[str, Any] = {}
    for stage in (*STAGES, "total"):
        values = [c["total"] if stage == "total" else c[stage] for c in cpu]
        out[stage] = {"median": round(float(np.median(values)), 3),
                      "p95": round(float(np.percentile(values, 95)), 3)}
    return out


def _plot(quality: dict[str, dict[str, Any]], path: Path) -> None:
    """Completeness against expected S/N, one curve per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in quality.items():
        rows = [b for b in result["completeness"] if b["completeness"] is not None]
        centres = [math.sqrt(b["snr_low"] * (b["snr_high"] or b["snr_low"] * 2)) for b in rows]
        ax.plot(centres, [b["completeness"] for b in rows], "o-", label=name)
    ax.axvline(5.0, color="grey", ls=":", label="detection threshold (5σ)")
    ax.set_xscale("log")
    ax.set_xlabel("expected S/N of the transient")
    ax.set_ylabel("completeness")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Transient completeness on difference images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _markdown(report: dict[str, Any]) -> str:
    """The results as a short markdown section."""
    cur, old = report["quality"]["current"], report["quality"]["baseline"]
    lines = [
        "### Detection quality of the demo ApPipe (against the simulator's ground truth)",
        "",
        f"{report['detector_visits']} detector-visits of {report['size']}x{report['size']} pixels "
        f"(two 15 s snaps, r band, seeing 0.6-1.1\"), `python -m benchmarks.science_quality`, "
        f"{report['date']}, 2-core machine.",
        "",
        "| expected S/N | transients | completeness | (before) |",
        "|---|---|---|---|",
    ]
    for new, before in zip(cur["completeness"], old["completeness"], strict=True):
        high = new["snr_high"]
        label = f"{new['snr_low']:g}-{high:g}" if high else f"≥ {new['snr_low']:g}"
        lines.append(f"| {label} | {new['n']} | {_fmt(new['completeness'])} | {_fmt(before['completeness'])} |")
    fp, fp_old = cur["false_per_detector_visit"], old["false_per_detector_visit"]
    lines += [
        "",
        f"- False detections per detector-visit: {fp['mean']} (max {fp['max']}); before: "
        f"{fp_old['mean']} (max {fp_old['max']}).",
        f"- Missed at S/N ≥ 8: {cur['n_missed_snr_ge_8']} of {cur['n_expected_snr_ge_8']} "
        f"(before: {old['n_missed_snr_ge_8']}).",
        f"- Position error of recovered transients (S/N ≥ 8): median "
        f"{cur['position_error_px_snr_ge_8']['median']} px, p95 {cur['position_error_px_snr_ge_8']['p95']} px.",
        f"- Flux error |measured/true − 1| (S/N ≥ 8): median {cur['abs_flux_error_snr_ge_8']['median']}, "
        f"p95 {cur['abs_flux_error_snr_ge_8']['p95']}; median bias {cur['flux_bias_snr_ge_8']}.",
        f"- CPU per detector-visit (ISR of 2 snaps → detection), median: "
        f"{report['cpu']['current']['total']['median']} s now, "
        f"{report['cpu']['baseline']['total']['median']} s before (same inputs, same process):",
        "",
        "| CPU s per detector-visit | now (median / p95) | before (median / p95) |",
        "|---|---|---|",
        *(f"| {stage} | {report['cpu']['current'][stage]['median']} / {report['cpu']['current'][stage]['p95']} | "
          f"{report['cpu']['baseline'][stage]['median']} / {report['cpu']['baseline'][stage]['p95']} |"
          for stage in (*STAGES, "total")),
        "",
        "![completeness](benchmarks/results/science_completeness.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the scenario; print and write the results."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table as RichTable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="detector size (pixels)")
    parser.add_argument("--visits", type=int, default=4, help="visits to simulate")
    parser.add_argument("--detectors", type=int, default=2, help="detectors per visit")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the results")
    parser.add_argument("--only-current", action="store_true", help="skip the baseline")
    args = parser.parse_args(argv)
    console = Console()
    config = world(args.size, args.detectors)
    half, _ = survey_region(config)
    skymap = SimSkyMap.for_field(config.field_ra, config.field_dec, half, patch_inner=config.patch_size)
    sky = Sky(config)
    names = ["current"] if args.only_current else ["current", "baseline"]
    impls = {name: _implementation(name) for name in names}
    scores: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    cpu: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    jobs = [(v, d) for v in visits(config, args.visits) for d in range(args.detectors)]
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("detector-visits", total=len(jobs))
        for visit, detector in jobs:
            progress.update(bar, description=f"simulate v{visit.seq} d{detector}")
            dv = detector_visit(config, skymap, visit, detector, sky)
            for name in names:
                progress.update(bar, description=f"{name} v{visit.seq} d{detector}")
                sources, science, seconds = run_stages(impls[name], dv)
                seconds["total"] = sum(seconds.values())
                cpu[name].append(seconds)
                scores[name].append(score(dv, sources, science))
            progress.advance(bar)
    report: dict[str, Any] = {
        "size": args.size, "detector_visits": len(jobs), "date": time.strftime("%Y-%m-%d"),
        "snr_bins": [b if math.isfinite(b) else None for b in SNR_BINS],
        "quality": {n: _collect(scores[n]) for n in names},
        "cpu": {n: _cpu_stats(cpu[n]) for n in names},
    }
    table = RichTable(title=f"CPU s per detector-visit at {args.size}² (median / p95)")
    table.add_column("stage")
    for name in names:
        table.add_column(name)
    for stage in (*STAGES, "total"):
        table.add_row(stage, *(f"{report['cpu'][n][stage]['median']} / {report['cpu'][n][stage]['p95']}"
                               for n in names))
    console.print(table)
    for name in names:
        q = report["quality"][name]
        console.print(f"[bold]{name}[/]: completeness by S/N "
                      + ", ".join(f"{b['snr_low']:g}+: {b['completeness']} ({b['found']}/{b['n']})"
                                  for b in q["completeness"]))
        console.print(f"  false per detector-visit {q['false_per_detector_visit']}; missed at S/N≥8 "
                      f"{q['n_missed_snr_ge_8']}/{q['n_expected_snr_ge_8']}; position error px "
                      f"{q['position_error_px_snr_ge_8']}; |flux error| {q['abs_flux_error_snr_ge_8']} "
                      f"(bias {q['flux_bias_snr_ge_8']}); |pull| {q['abs_flux_pull_snr_ge_8']}")
    if not args.only_current:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "science_quality.json").write_text(json.dumps(report, indent=2) + "\n")
        _plot(report["quality"], args.out / "science_completeness.png")
        (args.out / "science_quality.md").write_text(_markdown(report))
        console.print(f"wrote {args.out}/science_quality.json, science_completeness.png, science_quality.md")
    return report


if __name__ == "__main__":
    main()
