"""CPU accounting of a benchmark night: CPU-seconds by component and by stage, per detector-visit.

Wall-clock latencies on a shared 2-core machine describe the machine; CPU-seconds per unit of
work do not. :func:`snapshot` reads the cumulative CPU time (user + system) of every
component's process tree at the start and at the end of the night: the live processes' own
times plus the times of the children they reaped (a prefork worker's replaced pool children,
the baseline's ``pipetask`` subprocesses), so nothing that ran and exited in between is lost.
:func:`account` turns two snapshots, the per-stage CPU the stage tasks recorded in the ledger
(``dNNN.<stage>.cpu_s``) and the number of detector-visits into the figures, and
:func:`check` says whether they add up. The night starts once the fleet has settled
(:func:`settle`): a worker answers ping before its pool processes have opened their repos and
loaded their pipelines, and that start-up, paid once before a night, is reported apart.

Components are grouped as the fleet's roles (:data:`GROUPS`): ``compute`` (every
``detector-N`` worker with its pool children), ``wait``, ``dispatcher``, ``intake`` (the
next_visit intake, the router and the queue controller), ``summary`` (summaries, deadlines and
the export writer), ``beat``, ``redis`` and ``s3``. By stage: ``prepare``, ``ingest`` and
``run`` are what the compute workers' pool children spent inside those stage tasks; ``celery
consumer`` is the compute workers' main processes (Celery's consumer: messages in from the
broker, handed to the pool, acknowledged, task events), read apart by :func:`own_cpu`;
``compute outside stages`` is the rest of the pool children (Celery's tracing, results and chord
bookkeeping around each task); every other component is its own stage.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psutil

__all__ = [
    "COMPUTE_STAGES",
    "GROUPS",
    "IDLE_OK",
    "account",
    "check",
    "group_of",
    "machine_times",
    "machine_window",
    "own_cpu",
    "settle",
    "snapshot",
    "tree_cpu",
]

#: Component groups in report order (``compute`` gathers every ``detector-N``).
GROUPS: tuple[str, ...] = ("compute", "wait", "dispatcher", "intake", "summary", "beat", "redis", "s3")
#: Stages whose CPU the compute workers' pool children record in the ledger.
COMPUTE_STAGES: tuple[str, ...] = ("prepare", "ingest", "run")


def group_of(component: str) -> str:
    """The group of a component name (``detector-2`` → ``compute``)."""
    return "compute" if component.startswith("detector-") else component


def tree_cpu(root: psutil.Process) -> float:
    """CPU seconds (user + system) so far of ``root``'s tree, reaped children included."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def snapshot(pids: Mapping[str, int], of: Callable[[psutil.Process], float] = tree_cpu) -> dict[str, float]:
    """Component → cumulative CPU seconds of its process tree, or what ``of`` reads of its main
    process (components that are gone: left out)."""
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = of(psutil.Process(pid))
        except psutil.Error:
            continue
    return out


def own_cpu(pids: Mapping[str, int]) -> dict[str, float]:
    """Component → CPU seconds of its main process alone (without its children, live or reaped):
    a prefork worker's consumer apart from its pool."""
    def main_process(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    return snapshot(pids, of=main_process)


def settle(pids: Callable[[], Mapping[str, int]], idle_cores: float = 0.15, window_s: float = 1.0,
           quiet_windows: int = 3, limit_s: float = 60.0) -> dict[str, Any]:
    """Wait until the components together use less than ``idle_cores`` for ``quiet_windows``
    windows in a row (their start-up done), at most ``limit_s``; how long that took and the
    CPU-seconds they spent meanwhile."""
    started = time.monotonic()
    first = before = snapshot(pids())
    quiet = 0
    while quiet < quiet_windows and time.monotonic() - started < limit_s:
        time.sleep(window_s)
        now = snapshot(pids())
        used = sum(now.get(name, 0.0) - before.get(name, now.get(name, 0.0)) for name in now)
        quiet = quiet + 1 if used < idle_cores * window_s else 0
        before = now
    spent = {name: round(before[name] - first.get(name, 0.0), 2) for name in before}
    return {"waited_s": round(time.monotonic() - started, 1), "settled": quiet >= quiet_windows,
            "cpu_s": round(sum(spent.values()), 2), "components": spent}


def machine_times() -> dict[str, float]:
    """The machine's cumulative CPU times (seconds, all cores) and the current load average."""
    t = psutil.cpu_times()
    busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    idle = t.idle + getattr(t, "iowait", 0.0)
    return {"busy": busy, "idle": idle, "load1": os.getloadavg()[0]}


def machine_window(before: Mapping[str, float], after: Mapping[str, float], stack_cpu_s: float) -> dict[str, Any]:
    """The machine over a window: its CPU busy share, the CPU-seconds the measured stack used
    and what the rest of the machine (other users, the benchmark's own driver) used."""
    busy = after["busy"] - before["busy"]
    total = busy + after["idle"] - before["idle"]
    return {
        "cpu_busy_share": round(busy / total, 3) if total > 0 else None,
        "busy_cpu_s": round(busy, 2),
        "stack_cpu_s": round(stack_cpu_s, 2),
        "other_cpu_s": round(max(busy - stack_cpu_s, 0.0), 2),
        "load_start": round(before["load1"], 2),
        "load_end": round(after["load1"], 2),
    }


def _round(value: float) -> float:
    return round(value, 4)


def account(before: Mapping[str, float], after: Mapping[str, float], detector_visits: int,
            stage_cpu: Mapping[str, float] | None = None, ran: Iterable[str] = (),
            consumers: tuple[Mapping[str, float], Mapping[str, float]] | None = None) -> dict[str, Any]:
    """The CPU accounting of a night from two :func:`snapshot` s.

    Parameters
    ----------
    before, after
        Snapshots at the start and the end of the night (a component only in ``after``
        started during the night and counts from zero).
    detector_visits
        Detector-visits processed in the window (the divisor).
    stage_cpu
        CPU seconds recorded by the compute stages, summed over the detector-visits
        (``prepare``, ``ingest``, ``run``); the baseline passes its own stages.
    ran
        Extra component names that must appear (and not be zero) in :func:`check`.
    consumers
        :func:`own_cpu` at the start and the end of the night: the compute workers' main
        processes become the ``celery consumer`` stage, apart from ``compute outside stages``.

    Returns
    -------
    dict
        ``components`` (per process name), ``groups``, ``stages`` (CPU seconds),
        ``total_cpu_s``, ``per_detector_visit`` of each group and stage and of the total,
        and ``detector_visits``.
    """
    components = {name: _round(max(after[name] - before.get(name, 0.0), 0.0)) for name in sorted(after)}
    groups: dict[str, float] = {}
    for name, seconds in components.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + seconds
    ordered = [g for g in GROUPS if g in groups] + sorted(g for g in groups if g not in GROUPS)
    groups = {g: _round(groups[g]) for g in ordered}
    total = _round(sum(components.values()))
    stages: dict[str, float] = {}
    if stage_cpu is not None:
        own = {s: _round(v) for s, v in stage_cpu.items()}
        compute = groups.get("compute")
        if compute is not None:  # ours: the stages run inside the compute workers
            stages.update(own)
            consumer = 0.0
            if consumers is not None:
                start, end = consumers
                consumer = sum(max(end[name] - start.get(name, 0.0), 0.0) for name in end if group_of(name) == "compute")
                stages["celery consumer"] = _round(consumer)
            stages["compute outside stages"] = _round(compute - sum(own.values()) - consumer)
            stages.update({g: v for g, v in groups.items() if g != "compute"})
        else:  # the baseline: its jobs are one component, split by its own stages
            jobs = sum(v for g, v in groups.items() if g not in GROUPS)
            stages.update(own)
            stages["jobs outside stages"] = _round(jobs - sum(own.values()))
            stages.update({g: v for g, v in groups.items() if g in GROUPS})
    n = max(int(detector_visits), 0)

    def per(values: Mapping[str, float]) -> dict[str, float | None]:
        return {k: (round(v / n, 4) if n else None) for k, v in values.items()}

    return {
        "detector_visits": n,
        "components": components,
        "groups": groups,
        "stages": stages,
        "total_cpu_s": total,
        "per_detector_visit": {"total": round(total / n, 4) if n else None, "groups": per(groups),
                               "stages": per(stages)},
        "ran": sorted(set(ran) | set(components)),
    }


#: Components that may show no CPU in a short night (see :func:`check`).
IDLE_OK: tuple[str, ...] = ("beat", "dispatcher")


def check(accounting: Mapping[str, Any], tolerance: float = 0.01,
          idle_ok: Iterable[str] = IDLE_OK) -> list[str]:
    """What does not add up in ``accounting`` (empty when everything does).

    The components sum to the total, the groups and the stages too (within ``tolerance``
    seconds per component), every component that ran used some CPU (but ``idle_ok``, which
    may stay under the clock's 10 ms tick in a short night: beat only wakes for periodic
    housekeeping, and the dispatcher moves a bucket event in about a millisecond, so a night
    of a few detector-visits can read 0), and no stage is negative beyond the clock's resolution.
    """
    problems = []
    comps, total = accounting["components"], accounting["total_cpu_s"]
    slack = tolerance * max(len(comps), 1)
    for label, parts in (("components", comps), ("groups", accounting["groups"]), ("stages", accounting["stages"])):
        if parts and abs(sum(parts.values()) - total) > slack:
            problems.append(f"{label} sum to {sum(parts.values()):.3f} s, total {total:.3f} s")
    for name in accounting.get("ran", ()):
        if comps.get(name, 0.0) <= 0.0 and name not in idle_ok:
            problems.append(f"{name} ran but shows no CPU")
    for stage, seconds in accounting["stages"].items():
        if seconds < -slack:
            problems.append(f"stage {stage} is negative ({seconds:.3f} s)")
    if accounting["detector_visits"] <= 0:
        problems.append("no detector-visits")
    return problems
