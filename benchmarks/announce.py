"""How long the router takes to publish a visit, and how affinity moves queues.

``python -m benchmarks.announce [--detectors 189] [--visits 10]`` starts a private Redis in a
temporary directory and announces ``--visits`` visits of ``--detectors`` detectors each
(nobody consumes them: this is the router's own cost: the ledger record, one chord of
four-step chains with a queue on every signature, and the deadline). It reports p50, p95 and
max of :func:`prompt_tasks.flow.router.announce` (:func:`measure`), the time to read a visit's
ledger back, and, for the affinity of those detectors' queues, how many queues a worker leaving, returning and a new
worker joining move. The design's figure was ~380 ms per 189-detector visit on a quiet 2-core
machine with Celery's canvas; the goal is 0.2 s.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from prompt_tasks.celery import create_app
from prompt_tasks.context import Context
from prompt_tasks.fleet import affinity
from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.settings import Settings
from prompt_tasks.stack.servers import free_port, start_redis, wait_redis
from prompt_tasks.store import ledger

__all__ = ["affinity_moves", "main", "measure", "percentile"]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def affinity_moves(n_queues: int, n_workers: int) -> dict[str, int]:
    """Queues moved when one of ``n_workers`` leaves, comes back, and a new worker joins."""
    queues = [detector_queue("LSSTCam", d) for d in range(n_queues)]
    workers = [f"detector-{i}@host" for i in range(1, n_workers + 1)]
    start = affinity.rebalance(queues, workers)
    left = affinity.rebalance(queues, workers[1:], start, joined=())
    back = affinity.rebalance(queues, workers, left, joined=workers[:1])
    grown = affinity.rebalance(queues, [*workers, "detector-new@host"], back, joined=["detector-new@host"])
    return {
        "leave": len(affinity.moves(start, left)),
        "return": len(affinity.moves(left, back)),
        "restored": int(back == start),
        "join": len(affinity.moves(back, grown)),
    }


def measure(detectors: int, visits: int) -> dict[str, Any]:
    """Announce ``visits`` visits of ``detectors`` detectors on a private Redis: p50, p95 and max
    seconds of :func:`prompt_tasks.flow.router.announce` and of reading the visit's ledger back."""
    import prompt_tasks.flow.tasks  # noqa: F401  (registers the task names the router sends)

    with tempfile.TemporaryDirectory(prefix="announce-bench-") as tmp:
        root = Path(tmp)
        settings = Settings(state_dir=root, redis_port=free_port(), redis_aof=False)
        proc = start_redis(settings, root / "redis", root / "run")
        try:
            if not wait_redis(settings):
                raise SystemExit(f"private redis did not start:\n{proc.tail()}")
            app = create_app(settings)
            ctx = Context(settings)
            base = time.time()
            announce(app, ctx, _visit(base, "warm-up"), detectors=range(detectors))
            publish, read = [], []
            for i in range(visits):
                visit = _visit(base, f"2026-11-24T05:00:{i:02d}.000")
                t0 = time.perf_counter()
                announce(app, ctx, visit, detectors=range(detectors))
                publish.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ledger.read_visit(ctx.redis, visit.instrument, visit.groupId)
                read.append(time.perf_counter() - t0)
            ctx.close()
            del app
            gc.collect()  # drop result objects while their backend still answers
        finally:
            proc.stop()

    def summary(values: list[float]) -> dict[str, float]:
        return {"p50": round(statistics.median(values), 4), "p95": round(percentile(values, 95), 4),
                "max": round(max(values), 4)}

    return {"detectors": detectors, "visits": visits, **summary(publish), "ledger_read": summary(read)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", type=int, default=189)
    parser.add_argument("--visits", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4, help="Workers for the affinity figures.")
    args = parser.parse_args(argv)

    measured = measure(args.detectors, args.visits)
    for name, values in (("announce", measured), ("ledger read", measured["ledger_read"])):
        print(f"{name:<12} {args.detectors} detectors: p50 {values['p50'] * 1000:.0f} ms, "
              f"p95 {values['p95'] * 1000:.0f} ms, max {values['max'] * 1000:.0f} ms "
              f"({args.visits} visits)")
    moved = affinity_moves(args.detectors, args.workers)
    print(f"affinity     {args.detectors} queues over {args.workers} workers: a worker leaving moves "
          f"{moved['leave']}, returning moves {moved['return']} (restored: {bool(moved['restored'])}), "
          f"a new worker joining moves {moved['join']}")


def _visit(start: float, group: str) -> NextVisit:
    return NextVisit.model_validate({"instrument": "LSSTCam", "groupId": group, "startTime": start,
                                     "duration": 30.0, "nimages": 2})


if __name__ == "__main__":
    main()
