"""CPU and memory of the stack's processes while a benchmark runs (psutil, sampled in a thread).

Each component of the embedded stack has a pid file in ``<state>/run/``; a component's usage
is that of its whole process tree (a prefork worker's pool children included). The machine's
own CPU use and load average are sampled too: on a shared 2-core machine they say whether the
CPU was the limit.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

__all__ = ["Sampler", "pid_files", "summarize_samples", "tree_usage"]


def pid_files(run_dir: Path) -> dict[str, int]:
    """Component name → pid, from the ``*.pid`` files of a stack's run directory."""
    out = {}
    for path in sorted(run_dir.glob("*.pid")):
        try:
            out[path.stem] = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def tree_usage(root: psutil.Process, cache: dict[int, psutil.Process]) -> tuple[float, float, dict[int, float]]:
    """CPU % (since the previous call), resident MB of ``root``'s tree, and RSS MB per pid."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0, {}
    cpu = rss = 0.0
    per_pid = {}
    for proc in procs:
        proc = cache.setdefault(proc.pid, proc)
        try:
            cpu += proc.cpu_percent(None)
            mb = proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
        rss += mb
        per_pid[proc.pid] = round(mb, 1)
    return cpu, rss, per_pid


class Sampler(threading.Thread):
    """Samples, every ``interval`` seconds, each component's CPU and RSS and the machine's CPU.

    ``pids`` is called at every sample (components may start late or be replaced).
    """

    def __init__(self, pids: Callable[[], Mapping[str, int]], interval: float = 1.0) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.pids, self.interval = pids, interval
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()
        self._cache: dict[int, psutil.Process] = {}

    def run(self) -> None:
        psutil.cpu_percent(None)
        while not self._halt.wait(self.interval):
            self.samples.append(self.sample())

    def sample(self) -> dict[str, Any]:
        """One sample of every component and of the machine."""
        roles: dict[str, Any] = {}
        for name, pid in self.pids().items():
            root = self._cache.get(pid)
            if root is None:
                try:
                    root = self._cache.setdefault(pid, psutil.Process(pid))
                except psutil.Error:
                    continue
            cpu, rss, per_pid = tree_usage(root, self._cache)
            roles[name] = {"cpu": round(cpu, 1), "rss_mb": round(rss, 1), "pids": per_pid}
        return {"t": time.time(), "machine_cpu": psutil.cpu_percent(None), "load": os.getloadavg()[0],
                "roles": roles}

    def stop(self) -> list[dict[str, Any]]:
        """Stop sampling; the samples."""
        self._halt.set()
        self.join(timeout=5)
        return self.samples


def summarize_samples(samples: list[dict[str, Any]], cores: int | None = None) -> dict[str, Any]:
    """Mean and peak CPU % and peak RSS per component, the machine's mean CPU and load."""
    cores = cores or psutil.cpu_count() or 1
    per_role: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        for name, usage in sample["roles"].items():
            entry = per_role.setdefault(name, {"cpu": [], "rss": []})
            entry["cpu"].append(usage["cpu"])
            entry["rss"].append(usage["rss_mb"])
    roles = {
        name: {
            "cpu_mean_pct": round(sum(v["cpu"]) / len(v["cpu"]), 1),
            "cpu_peak_pct": round(max(v["cpu"]), 1),
            "rss_peak_mb": round(max(v["rss"]), 1),
            "rss_last_mb": round(v["rss"][-1], 1),
        }
        for name, v in sorted(per_role.items()) if v["cpu"]
    }
    machine = [s["machine_cpu"] for s in samples]
    load = [s["load"] for s in samples]
    stack_cpu = [sum(u["cpu"] for u in s["roles"].values()) for s in samples]
    return {
        "cores": cores,
        "samples": len(samples),
        "machine_cpu_mean_pct": round(sum(machine) / len(machine), 1) if machine else None,
        "machine_cpu_busy_fraction": round(sum(m >= 95.0 for m in machine) / len(machine), 3) if machine else None,
        "stack_cpu_mean_cores": round(sum(stack_cpu) / len(stack_cpu) / 100.0, 2) if stack_cpu else None,
        "load_mean": round(sum(load) / len(load), 2) if load else None,
        "load_max": round(max(load), 2) if load else None,
        "roles": roles,
    }
