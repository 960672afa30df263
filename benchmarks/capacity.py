"""How many cores a full camera needs, from the measured CPU cost per detector-visit.

``python -m benchmarks.capacity`` reads the committed results (``benchmarks/results/``), prints
the estimate with its assumptions and writes ``capacity.json`` beside them.

The estimate is throughput only: a camera of ``detectors`` detectors taking a visit every
``cadence`` seconds asks for ``detectors / cadence`` detector-visits per second; each costs

- the framework's CPU per detector-visit (every component: compute workers outside the
  pipeline's own work, wait worker, dispatcher, intake, summary and export, beat, Redis and the
  S3 server), taken from the noop-payload scale run at the largest detector count (or, without
  one, from the scenario's own run), plus
- the payload: the warm CPU of the compute stages (prepare, ingest, run; each detector's first
  visit left out) of the pipeline's scenario, less what those stages cost with the noop payload
  (their bookkeeping is already in the framework figure); for a scenario measured at 2048² or
  more, also with its run stage scaled by pixel area to the camera's detector size
  (``scale_to``; linear in pixels, an assumption). Smaller measurements are mostly per-quantum
  overhead and are not extrapolated.

``cores = cost × detectors / cadence / utilisation``: ``utilisation`` (default 0.75) leaves
head-room so that a visit does not queue behind the previous one. Latency needs more than
throughput: at least one compute worker per active detector (each with a core while it runs),
so the figure with ``one worker per detector`` is also given.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["estimate", "from_results", "main"]

#: LSSTCam science detectors and its cadence (s).
CAMERA_DETECTORS = 189
CADENCE_S = 37.0
#: LSSTCam science CCDs are 4k × 4k.
CAMERA_SIZE = 4096


def estimate(framework_s: float, payload_s: float, *, detectors: int = CAMERA_DETECTORS,
             cadence_s: float = CADENCE_S, utilisation: float = 0.75) -> dict[str, Any]:
    """Cores for ``detectors`` at ``cadence_s`` with ``framework_s + payload_s`` CPU-s per detector-visit."""
    per_dv = framework_s + payload_s
    busy = per_dv * detectors / cadence_s
    return {"framework_cpu_s": round(framework_s, 4), "payload_cpu_s": round(payload_s, 4),
            "cpu_s_per_detector_visit": round(per_dv, 4), "detectors": detectors, "cadence_s": cadence_s,
            "utilisation": utilisation, "busy_cores": round(busy, 2),
            "cores": math.ceil(busy / utilisation), "framework_cores": round(framework_s * detectors / cadence_s, 2)}


def _framework(results: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, float, str]:
    """The framework's CPU-s per detector-visit, the noop stages' share of it, and where it came from."""
    scale = results.get("scale-noop")
    if scale and scale.get("rows"):
        row = max(scale["rows"], key=lambda r: r["detectors"])
        stages = sum((row.get("stages_per_detector_visit") or {}).get(s) or 0.0 for s in ("prepare", "ingest", "run"))
        return row["total"], stages, f"noop scale run, {row['detectors']} detectors"
    return None, 0.0, "no scale run"


def from_results(results: Mapping[str, Mapping[str, Any]], *, utilisation: float = 0.75,
                 scale_to: int = CAMERA_SIZE) -> dict[str, Any]:
    """The estimate for every pipeline scenario in ``results`` (committed summaries by scenario)."""
    framework, noop_stages, source = _framework(results)
    out: dict[str, Any] = {"assumptions": {
        "detectors": CAMERA_DETECTORS, "cadence_s": CADENCE_S, "utilisation": utilisation,
        "framework": source, "payload": "warm compute-stage CPU (prepare+ingest+run, first visits left out) of "
                                        "the scenario, less the noop stages' bookkeeping",
        "pixel_scaling": f"the run stage × (camera {scale_to}² / measured size²), linear in pixels (an assumption), "
                         "only for scenarios measured at 2048² or more",
        "not_included": "the benchmark's driver (the camera's PUTs), cold starts, catch-up work, the central "
                        "registry's database server, memory"}, "pipelines": {}}
    for name, result in results.items():
        if result.get("kind", "night") != "night":
            continue
        acc = result["ours"].get("cpu") or {}
        warm = (acc.get("warm_stages_per_detector_visit") or {}).get("median")
        options = result.get("options", {})
        if warm is None or options.get("payload", "butler") == "noop":
            continue
        per_dv = acc["per_detector_visit"]
        own_framework = (per_dv["total"] or 0.0) - sum((per_dv["stages"].get(s) or 0.0) for s in ("prepare", "ingest", "run"))
        fw = framework if framework is not None else own_framework
        payload = max(warm - noop_stages, 0.0)
        size = int(options.get("size") or scale_to)
        factor = (scale_to / size) ** 2
        run = ((acc.get("warm_stages_per_detector_visit") or {}).get("stages") or {}).get("run") or 0.0
        pipeline = options.get("pipeline", name)
        entry = {"scenario": name, "measured_size": size,
                 "framework_source": source if framework is not None else f"{name} (outside the compute stages)",
                 "as_measured": estimate(fw, payload, utilisation=utilisation),
                 f"scaled_to_{scale_to}": (estimate(fw, payload + run * (factor - 1.0), utilisation=utilisation)
                                          if size >= 2048 else None),
                 "one_worker_per_detector": CAMERA_DETECTORS}
        if pipeline not in out["pipelines"] or size > out["pipelines"][pipeline]["measured_size"]:
            out["pipelines"][pipeline] = entry
    return out


def describe(capacity: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal: each pipeline's estimate, then the assumptions."""
    lines = []
    size = next((k for k in next(iter(capacity["pipelines"].values()), {}) if k.startswith("scaled_to_")), None)
    for pipeline, entry in capacity["pipelines"].items():
        a = entry["as_measured"]
        line = (f"{pipeline}: {a['cpu_s_per_detector_visit']:.3f} CPU-s per detector-visit at {entry['measured_size']}² "
                f"(framework {a['framework_cpu_s']:.3f} + payload {a['payload_cpu_s']:.3f}) → {a['busy_cores']} busy cores, "
                f"{a['cores']} cores at {int(100 * a['utilisation'])} % utilisation")
        if size and entry.get(size):
            s = entry[size]
            line += f"; at {size.removeprefix('scaled_to_')}² {s['busy_cores']} busy, {s['cores']} cores"
        lines.append(line)
    lines += [f"  assumption {k}: {v}" for k, v in capacity["assumptions"].items()]
    return lines


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.capacity [--results DIR]``."""
    from benchmarks.results import load_results, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--utilisation", type=float, default=0.75)
    args = parser.parse_args(argv)
    capacity = from_results(load_results(args.results), utilisation=args.utilisation)
    for line in describe(capacity):
        print(line)
    write_json({"schema": 1, "kind": "capacity", **capacity}, args.results / "capacity.json")


if __name__ == "__main__":
    main()
