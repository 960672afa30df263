"""The README's Performance tables and its "Against the goals" table, from the committed results.

``python -m benchmarks.readme`` (or ``make bench-readme``) reads ``benchmarks/results/*.json``
(:mod:`benchmarks.results`) and rewrites the README between ``<!-- perf:begin -->`` and
``<!-- perf:end -->``; nothing else in the README changes. ``--check`` exits non-zero when the
README is not what the results would generate.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.capacity import describe, from_results
from benchmarks.results import load_results

__all__ = ["BEGIN", "END", "GOALS", "goal_rows", "main", "render", "rewrite"]

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
RESULTS = "benchmarks/results"
#: The unsaturated latencies, in report order.
LATENCIES = ("PUT→snap seen", "last snap→pipeline start", "last snap→exported", "last snap→summary",
             "next_visit→prepared")
#: CPU rows in report order: the detector-visit's path, then the rest of the fleet.
CPU_ORDER = ("prepare", "wait", "dispatcher", "ingest", "run", "export", "summary", "celery consumer", "compute outside stages",
             "jobs outside stages", "intake", "beat", "redis", "s3")
CPU_LABELS = {
    "prepare": "prepare (compute stage)", "ingest": "ingest (compute stage)", "run": "run (compute stage)",
    "wait": "wait: ours the gevent wait worker, the baseline's polling", "dispatcher": "dispatcher (bucket events)",
    "export": "export (the baseline's job exports itself)", "summary": "summary worker (summaries, batched export)",
    "celery consumer": "compute workers' Celery consumer (broker, pool, acks, events)",
    "compute outside stages": "compute pool outside the stages (task tracing, results, chord)",
    "jobs outside stages": "baseline jobs outside their stages", "intake": "intake (announce, router, controller)",
    "beat": "beat", "redis": "Redis", "s3": "S3 server"}
#: The goals the README reports against (label, limit).
GOALS: dict[str, tuple[str, float]] = {
    "framework": ("framework ≤ 0.15 CPU-s per detector-visit", 0.15),
    "start": ("unsaturated last snap → pipeline start p95 ≤ 0.5 s", 0.5),
    "seen": ("PUT → snap seen p95 ≤ 50 ms", 0.05),
    "prepared": ("100 % of prepares before the first snap", 1.0),
    "memory": ("memory after 100 visits within 10 % of after 10", 10.0),
}

#: The scenarios measuring the fleet → the beginnings of their goals the README reports (the
#: 189-detector night is saturated on purpose: its latencies are not goals).
FLEET_GOALS: dict[str, tuple[str, ...]] = {
    "fleet-189": ("warm quantum-graph build", "189-detector announce"),
    "appipe-overlap": ("next_visit→prepared (warm)",),
}


def _s(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s" if abs(value) < 10 else f"{value:.1f} s"


def _cpu(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}×"


def _machine(result: Mapping[str, Any]) -> str:
    m = result.get("machine") or {}
    window = (result.get("ours") or {}).get("machine_window") or {}
    load = m.get("load_avg") or ["?"]
    end = m.get("load_avg_end") or ["?"]
    busy = window.get("cpu_busy_share")
    text = (f"{str(result.get('date', '?'))[:10]}, {m.get('cpus', '?')} CPUs ({m.get('cpu_model', '?')}), "
            f"{m.get('memory_gb', '?')} GB, Python {m.get('python', '?')}; load average {load[0]} at the start, "
            f"{end[0]} at the end")
    if busy is not None:
        text += (f"; the machine's CPU was {100 * busy:.0f} % busy during the night, "
                 f"{window.get('other_cpu_s', 0):.0f} of its {window.get('busy_cpu_s', 0):.0f} busy CPU-s not the stack's")
    return text


def _sizes(result: Mapping[str, Any]) -> str:
    o = result.get("options", {})
    payload = "noop payload" if o.get("payload") == "noop" else o.get("pipeline")
    text = (f"{o.get('detectors')} detectors of {o.get('size')}², {payload}, {o.get('visits')} visits × "
            f"{o.get('snaps')} snaps of {o.get('exptime'):g} s, cadence {o.get('cadence'):g} s, lead "
            f"{o.get('lead'):g} s, {o.get('workers')} compute workers")
    base = result.get("baseline")
    if base:
        text += (f"; baseline: {base.get('visits')} visits × {base.get('detectors')} detectors, "
                 f"{base.get('workers')} processes")
    outcomes = ", ".join(f"{n} {k}" for k, n in result["ours"].get("outcomes", {}).items())
    return text + f". Detector-visits: {outcomes}" + (
        f" (baseline {', '.join(f'{n} {k}' for k, n in base.get('outcomes', {}).items())})" if base else "") + "."


def latency_table(result: Mapping[str, Any]) -> list[str]:
    """Latencies p50 / p95 / max with the queued share, beside the baseline's."""
    ours, base = result["ours"], result.get("baseline") or {}
    lines = ["| latency | p50 | p95 | max | queued for a busy worker | baseline p50 / p95 | baseline / ours (p50, p95) |",
             "|---|---|---|---|---|---|---|"]
    ratios = result.get("ratios") or {}
    noisy = []
    for stage in LATENCIES:
        row = (ours.get("latency") or {}).get(stage)
        if not row:
            continue
        share = row.get("queued_share")
        b = (base.get("stages") or {}).get(stage) or {}
        r = ratios.get(stage) or {}
        lines.append(f"| {stage.replace('→', ' → ')} | {_s(row['p50'])} | {_s(row['p95'])} | {_s(row['max'])} | "
                     f"{'–' if share is None else f'{100 * share:.1f} %'} | "
                     f"{_s(b.get('p50'))} / {_s(b.get('p95'))} | {_x(r.get('p50'))}, {_x(r.get('p95'))} |")
        if share is not None and share > 0.05:
            noisy.append(f"{stage.replace('→', ' → ')} ({100 * share:.0f} %)")
    lines.append("")
    if noisy:
        lines.append(f"**Not unsaturated**: part of these latencies was queueing for a busy compute worker: "
                     f"{', '.join(noisy)}.")
    else:
        lines.append("Nothing queued: no latency spent more than 5 % of its time waiting for a busy compute worker "
                     "(PUT → snap seen runs on the gevent wait worker, which has no queue per detector).")
    return lines


def cpu_table(result: Mapping[str, Any]) -> list[str]:
    """CPU-seconds per detector-visit by stage and component, ours beside the baseline."""
    ours = result["ours"]["cpu"]
    base = (result.get("baseline") or {}).get("cpu")
    mine, theirs = ours["per_detector_visit"], (base or {}).get("per_detector_visit") or {}
    lines = ["| CPU-s per detector-visit | ours | baseline | baseline / ours |", "|---|---|---|---|"]

    def ratio(a: float | None, b: float | None) -> str:
        return "" if a is None or b is None or a <= 0 else _x(round(b / a, 2))

    stages = dict(mine["stages"])
    other = dict(theirs.get("stages") or {})
    for stage in [s for s in CPU_ORDER if s in stages or s in other] + sorted(set(stages) - set(CPU_ORDER)):
        value, them = stages.get(stage), other.get(stage)
        label = CPU_LABELS.get(stage, stage)
        if value is None:
            label += " (baseline only)"
        lines.append(f"| {label} | {_cpu(value) if value is not None else ''} | {_cpu(them) if them is not None else ''} | "
                     f"{ratio(value, them)} |")
    lines.append(f"| **total** | **{_cpu(mine['total'])}** | **{_cpu(theirs.get('total'))}** | "
                 f"**{ratio(mine['total'], theirs.get('total'))}** |")
    warm = ours.get("warm_stages_per_detector_visit") or {}
    lines.append("")
    text = (f"Total {ours['total_cpu_s']:.1f} CPU-s over {ours['detector_visits']} detector-visits "
            f"(components sum to the total: {'yes' if not ours.get('check') else 'NO: ' + '; '.join(ours['check'])})")
    if warm.get("median") is not None:
        text += (f"; warm compute stages (each detector's first visit left out) {warm['median']:.3f} CPU-s "
                 f"per detector-visit (median of {warm['n']})")
    if ours.get("redis_commands_per_detector_visit") is not None:
        text += f"; {ours['redis_commands_per_detector_visit']} Redis commands per detector-visit"
    lines.append(text + ".")
    return lines


def scale_table(scale: Mapping[str, Any]) -> list[str]:
    """The noop scale run: CPU-ms per detector-visit by component at each detector count."""
    rows = scale["rows"]
    groups: list[str] = []
    for row in rows:
        groups += [g for g in row["per_detector_visit"] if g not in groups]
    names = {"compute": "compute workers", "intake": "intake (announce)", "summary": "summary (chord callback)",
             "redis": "Redis (broker, ledger, chord)", "wait": "wait", "s3": "S3 server"}
    lines = ["| detectors | detector-visits | " + " | ".join(names.get(g, g) for g in groups)
             + " | total | Redis commands | chord join p50 | last snap → summary p50 |",
             "|" + "---|" * (len(groups) + 6)]
    for row in rows:
        cells = [str(row["detectors"]), str(row["detector_visits"])]
        cells += [f"{1000 * (row['per_detector_visit'].get(g) or 0.0):.1f}" for g in groups]
        cells += [f"**{1000 * row['total']:.1f}**", str(row.get("redis_commands_per_detector_visit")),
                  _s(row["chord_join_s"]["p50"]), _s(row["last_snap_to_summary_s"]["p50"])]
        lines.append("| " + " | ".join(cells) + " |")
    o = scale.get("options", {})
    lines += ["", f"CPU-milliseconds per detector-visit; {o.get('visits')} visits per count, raws of {o.get('size')}², "
                  f"{o.get('workers')} compute workers, noop payload. {_machine(scale)}."]
    return lines


def capacity_table(capacity: Mapping[str, Any]) -> list[str]:
    """The cores a full camera needs, per pipeline, with the assumptions."""
    if not capacity.get("pipelines"):
        return ["No pipeline scenario with per-stage CPU in the results yet."]
    a = capacity["assumptions"]
    lines = [f"| pipeline | measured at | CPU-s per detector-visit (framework + payload) | busy cores | cores at "
             f"{int(100 * a['utilisation'])} % | run stage scaled to 4096²: CPU-s, cores |", "|---|---|---|---|---|---|"]
    for pipeline, entry in capacity["pipelines"].items():
        m = entry["as_measured"]
        s = next((v for k, v in entry.items() if k.startswith("scaled_to_")), None)
        scaled = f"{s['cpu_s_per_detector_visit']:.2f}, **{s['cores']}**" if s else "– (measured too small to extrapolate)"
        lines.append(f"| {pipeline} | {entry['measured_size']}² | {m['cpu_s_per_detector_visit']:.3f} "
                     f"({m['framework_cpu_s']:.3f} + {m['payload_cpu_s']:.3f}) | {m['busy_cores']} | **{m['cores']}** | "
                     f"{scaled} |")
    lines += ["", f"{a['detectors']} detectors, a visit every {a['cadence_s']:g} s. Assumptions: framework: "
                  f"{a['framework']}; payload: {a['payload']}; {a['pixel_scaling']}; not included: {a['not_included']}. "
                  "Throughput only: the latency goals also need one compute worker per active detector "
                  f"({a['detectors']} processes, each with a core while it runs)."]
    return lines


def goal_rows(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(goal, measured, met) for each of :data:`GOALS`, from the committed results."""
    rows: list[tuple[str, str, str]] = []

    def met(ok: bool | None) -> str:
        return "–" if ok is None else ("yes" if ok else "**no**")

    scale = results.get("scale-noop")
    fleet = results.get("fleet-189")
    framework = ((fleet or {}).get("ours") or {}).get("cpu", {}).get("framework_per_detector_visit")
    if framework is not None:
        o = fleet["options"]  # type: ignore[index]
        rows.append((GOALS["framework"][0], f"{framework:.3f} CPU-s ({o['detectors']} detectors of {o['size']}², "
                     f"{o['pipeline']}: every component but the pipeline's quanta)",
                     met(framework <= GOALS["framework"][1])))
        steady = fleet["ours"]["cpu"].get("framework_per_warm_detector_visit")  # type: ignore[index]
        if steady is not None:
            rows.append((GOALS["framework"][0], f"{steady:.3f} CPU-s per warm detector-visit, the same run without "
                         "each detector's first visit: a night's steady state", met(steady <= GOALS["framework"][1])))
    if scale and scale.get("rows"):
        row = max(scale["rows"], key=lambda r: r["detectors"])
        rows.append((GOALS["framework"][0], f"{row['total']:.3f} CPU-s (noop payload, {row['detectors']} detectors, "
                     "every component)", met(row["total"] <= GOALS["framework"][1])))
    elif framework is None:
        rows.append((GOALS["framework"][0], "not measured", "–"))
    night = results.get("unsaturated-trivial") or next(
        (r for r in results.values() if r.get("kind", "night") == "night" and r.get("options", {}).get("unsaturated")), None)
    if night:
        lat = night["ours"].get("latency") or {}
        start = lat.get("last snap→pipeline start", {})
        share = start.get("queued_share")
        rows.append((GOALS["start"][0], f"{_s(start.get('p95'))} (p50 {_s(start.get('p50'))}; "
                     f"{'–' if share is None else f'{100 * share:.0f} %'} queued) in {night['scenario']}",
                     met(None if start.get("p95") is None else start["p95"] <= GOALS["start"][1])))
        seen = lat.get("PUT→snap seen", {})
        rows.append((GOALS["seen"][0], f"{_s(seen.get('p95'))} (p50 {_s(seen.get('p50'))}) in {night['scenario']}",
                     met(None if seen.get("p95") is None else seen["p95"] <= GOALS["seen"][1])))
    else:
        rows += [(GOALS["start"][0], "not measured", "–"), (GOALS["seen"][0], "not measured", "–")]
    nights = [r for r in results.values() if r.get("kind", "night") == "night" and r["ours"].get("detector_visits")
              and r.get("options", {}).get("payload", "butler") != "noop" and r.get("scenario") != "fleet-189"]
    if nights:
        late = sum(r["ours"].get("prepared_late") or 0 for r in nights)
        total = sum(r["ours"]["detector_visits"] for r in nights)
        rows.append((GOALS["prepared"][0], f"{total - late} of {total} ({', '.join(r['scenario'] for r in nights)})",
                     met(late == 0)))
    for name, wanted in FLEET_GOALS.items():
        for goal in (results.get(name) or {}).get("goals", ()):
            if goal["goal"].startswith(wanted) and goal.get("value") is not None:
                value = goal["value"]
                shown = _s(value) if isinstance(value, float) else f"{value} late"
                if goal.get("wall") is not None:
                    shown += f" (wall {_s(goal['wall'])})"
                rows.append((goal["goal"], f"{shown} in {name}", met(goal.get("met"))))
    memory = results.get("memory")
    if memory and memory.get("growth"):
        growths = {k: v["growth_pct"] for k, v in memory["growth"].items() if isinstance(v, dict)}
        worst = max(growths.values()) if growths else None
        rows.append((GOALS["memory"][0], ", ".join(f"{k} {v:+.1f} %" for k, v in growths.items())
                     + f" ({memory['growth'].get('early_visits')} → {memory['growth'].get('last_visits')} visits)",
                     met(None if worst is None else worst <= GOALS["memory"][1])))
    else:
        rows.append((GOALS["memory"][0], "not in the committed results (`python -m benchmarks.night "
                     "--memory-visits 100 --results benchmarks/results`)", "–"))
    return rows


def render(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The generated Markdown between the markers."""
    lines = [f"_Generated by `python -m benchmarks.readme` from `{RESULTS}/*.json`; `make bench` reruns every "
             "scenario, rewrites those files and regenerates this part._", ""]
    nights = {k: r for k, r in results.items() if r.get("kind", "night") == "night"}
    for name, result in nights.items():
        lines += [f"#### {name}", "", _sizes(result), "", f"Machine: {_machine(result)}.", ""]
        if result["ours"].get("latency"):
            lines += [*latency_table(result), ""]
        if result["ours"].get("cpu"):
            lines += [*cpu_table(result), ""]
        plots = result.get("plots") or []
        lines += [" ".join(f"![{p}]({RESULTS}/{p})" for p in plots if p.endswith(("-cpu.png", "-stages.png"))), ""]
    if results.get("scale-noop"):
        lines += ["#### Framework cost as detectors grow (noop payload)", "", *scale_table(results["scale-noop"])]
        lines += ["", f"![scale]({RESULTS}/scale-noop.png)", ""]
    capacity = from_results(results)
    lines += ["#### Capacity for a full camera", "", *capacity_table(capacity), ""]
    lines += ["### Against the goals", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {ok} |" for g, m, ok in goal_rows(results)]
    return "\n".join(lines).rstrip() + "\n"


def rewrite(readme: str, generated: str) -> str:
    """``readme`` with the text between the markers replaced by ``generated``."""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), flags=re.S)
    if not pattern.search(readme):
        raise ValueError(f"the README has no {BEGIN} … {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{generated}{END}", readme, count=1)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.readme [--check]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(RESULTS))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true", help="Only say whether the README is up to date.")
    args = parser.parse_args(argv)
    results = load_results(args.results)
    for line in describe(from_results(results)):
        print(line)
    text = args.readme.read_text()
    new = rewrite(text, render(results))
    if args.check:
        print("README up to date" if new == text else "README out of date: run python -m benchmarks.readme")
        return 0 if new == text else 1
    args.readme.write_text(new)
    print(f"{args.readme}: Performance tables regenerated from {len(results)} results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
