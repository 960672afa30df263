"""How fast a waiting detector learns that its raw is in the bucket.

``python -m benchmarks.snap_latency [--detectors N] [--rounds R] [--gap S] [--worker]`` starts a private
Redis and S3 gateway (with real bucket notifications) in a temporary directory, runs the
event dispatcher in a thread, and for each round starts N waiters (one per detector, each a
:func:`prompt_tasks.flow.snap.wait_for_snaps` call in a thread) before PUTting one raw per
detector. It reports PUT-complete → wait-returned (p50, p95, max), then does the same with
a baseline where each waiter lists its bucket prefix every ``--poll`` seconds, and prints
the ratio. ``--worker`` adds the production path: the real ``wait_for_snap`` task on a gevent
``wait`` worker process (``prompt-tasks worker wait``), measured to the moment the wait
returned inside the worker. Goal (issue 5): p95 ≤ 50 ms on a quiet machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from celery import Celery

from prompt_tasks.context import Context
from prompt_tasks.flow.dispatcher import Dispatcher, counters, dispatcher_for
from prompt_tasks.flow.snap import wait_for_snaps
from prompt_tasks.model.objectkeys import format_key, scheme_for
from prompt_tasks.model.status import Outcome
from prompt_tasks.objstore import ensure_bucket, make_client, wait_live
from prompt_tasks.settings import Settings
from prompt_tasks.stack.servers import free_port, start_redis, start_s3, wait_redis

__all__ = ["main", "percentile"]

INSTRUMENT = "SimCam"
RAW = b"\0" * 2880 * 4  # a few FITS blocks: the benchmark is about notification, not bandwidth


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@contextmanager
def private_stack(root: Path) -> Iterator[Settings]:
    """A private Redis and S3 gateway (with notifications to Redis) under ``root``."""
    settings = Settings(state_dir=root, redis_port=free_port(), s3_port=free_port(), redis_aof=False)
    run_dir = root / "run"
    redis_proc = start_redis(settings, root / "redis", run_dir)
    s3_proc = None
    try:
        if not wait_redis(settings):
            raise RuntimeError(f"redis did not start:\n{redis_proc.tail()}")
        s3_proc = start_s3(settings, root / "s3", run_dir)
        if not wait_live(settings, timeout=30):
            raise RuntimeError(f"S3 gateway did not start:\n{s3_proc.tail()}")
        ensure_bucket(make_client(settings), settings)
        yield settings
    finally:
        if s3_proc is not None:
            s3_proc.stop()
        redis_proc.stop()


def _poll_listing(ctx: Context, group: str, detector: int, timeout: float, poll: float) -> bool:
    """Baseline waiter: list the detector-visit prefix every ``poll`` s until a raw is there."""
    prefix = scheme_for(INSTRUMENT).listing_prefix(INSTRUMENT, group, detector)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(True for _ in ctx.s3.list_objects(ctx.settings.raw_bucket, prefix=prefix, recursive=True)):
            return True
        time.sleep(poll)
    return False


def _event_waiter(ctx: Context, group: str, detector: int, timeout: float, poll: float) -> bool:
    status = wait_for_snaps(ctx, INSTRUMENT, group, detector, 1, time.time(), timeout=timeout)
    return status.outcome is Outcome.OK and not status.data["listed"]


def run_round(ctx: Context, waiter: Callable[[Context, str, int, float, float], bool], group: str,
              detectors: int, gap: float, timeout: float, poll: float) -> list[float]:
    """One visit: start the waiters, PUT one raw per detector; PUT-done → returned latencies."""
    returned: dict[int, float] = {}
    ok: dict[int, bool] = {}

    def wait(detector: int) -> None:
        ok[detector] = waiter(ctx, group, detector, timeout, poll)
        returned[detector] = time.perf_counter()

    threads = [threading.Thread(target=wait, args=(d,), daemon=True) for d in range(detectors)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # every waiter is blocked (or polling) before the first PUT
    put_done: dict[int, float] = {}
    for detector in range(detectors):
        key = format_key(INSTRUMENT, detector, group, 0)
        ctx.s3.put_object(ctx.settings.raw_bucket, key, io.BytesIO(RAW), len(RAW))
        put_done[detector] = time.perf_counter()
        if gap:
            time.sleep(gap)
    for thread in threads:
        thread.join(timeout + 5)
    failed = [d for d in range(detectors) if not ok.get(d)]
    if failed:
        raise RuntimeError(f"{len(failed)} waiters did not see their raw (detectors {failed[:5]}...)")
    return [returned[d] - put_done[d] for d in range(detectors)]


def _summary(latencies: list[float]) -> dict[str, float]:
    return {
        "n": len(latencies),
        "p50_ms": round(statistics.median(latencies) * 1e3, 2),
        "p95_ms": round(percentile(latencies, 95) * 1e3, 2),
        "max_ms": round(max(latencies) * 1e3, 2),
    }


@contextmanager
def running_dispatcher(ctx: Context, mode: str) -> Iterator[None]:
    """The dispatcher as in production (``prompt-tasks dispatcher``, its own process) or a thread."""
    if mode == "thread":
        dispatcher: Dispatcher = dispatcher_for(ctx)
        stop = threading.Event()
        thread = threading.Thread(target=dispatcher.run, args=(stop, 0.5), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(10)
        return
    with _subprocess(ctx.settings, "dispatcher", ["dispatcher"]):
        yield


@contextmanager
def _subprocess(settings: Settings, name: str, args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``prompt-tasks ARGS`` on ``settings`` until the block ends (then SIGTERM it)."""
    from prompt_tasks.stack.env import child_env

    log = (settings.state_path / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from prompt_tasks.cli import main; main()", *args],
        env=child_env(settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the session we created: the worker and its pool
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def run_worker_round(ctx: Context, app: Celery, group: str, detectors: int, gap: float,
                     timeout: float) -> list[float]:
    """One visit through the real ``wait_for_snap`` task on the gevent ``wait`` worker.

    The latency is PUT complete → the time the wait returned inside the worker (its status's
    ``data["ended"]``; same machine, same clock).
    """
    from prompt_tasks.model.status import StageStatus

    start = time.time()
    visit = {"instrument": INSTRUMENT, "groupId": group, "startTime": start, "duration": 0.0, "nimages": 1}
    previous = StageStatus("prepare", Outcome.OK, INSTRUMENT, group, 0).to_dict()
    results = [
        app.signature("prompt_tasks.wait_for_snap", args=[previous], kwargs={"visit": visit, "detector": d},
                      queue="wait").apply_async()
        for d in range(detectors)
    ]
    end = time.monotonic() + 30
    while ctx.redis.scard(f"waiters:{INSTRUMENT}:{group}") < detectors and time.monotonic() < end:
        time.sleep(0.05)  # every wait task is blocked on its wake key
    put_done: dict[int, float] = {}
    for detector in range(detectors):
        key = format_key(INSTRUMENT, detector, group, 0)
        ctx.s3.put_object(ctx.settings.raw_bucket, key, io.BytesIO(RAW), len(RAW))
        put_done[detector] = time.time()
        if gap:
            time.sleep(gap)
    latencies = []
    for detector, result in enumerate(results):
        status = StageStatus.from_dict(result.get(timeout=timeout + 30))
        if not status.ok or status.data.get("listed"):
            raise RuntimeError(f"detector {detector}: {status.outcome} {status.reason}")
        latencies.append(float(status.data["ended"]) - put_done[detector])
    return latencies


def measure_worker(settings: Settings, detectors: int, rounds: int, gap: float, timeout: float) -> dict[str, float]:
    """Events through the production path: dispatcher process, gevent ``wait`` worker process."""
    from prompt_tasks.celery import create_app

    ctx = Context(settings)
    app = create_app(settings)
    try:
        with running_dispatcher(ctx, "process"), _subprocess(settings, "wait", ["worker", "wait"]):
            end = time.monotonic() + 60
            while not (app.control.ping(timeout=1.0) or []):
                if time.monotonic() > end:
                    raise RuntimeError("the wait worker did not start")
            run_worker_round(ctx, app, "worker-warm-up", min(detectors, 4), gap, timeout)
            latencies: list[float] = []
            for index in range(rounds):
                group = f"2026-11-24T04:{index:02d}:00.{int(time.time() * 1e6) % 10**6:06d}"
                latencies += run_worker_round(ctx, app, group, detectors, gap, timeout)
            return _summary(latencies)
    finally:
        app.close()
        ctx.close()


def measure(settings: Settings, detectors: int, rounds: int, gap: float, poll: float,
            timeout: float, dispatcher_mode: str = "process") -> dict[str, object]:
    """Both methods on the same servers; their summaries and the ratios."""
    ctx = Context(settings)
    with running_dispatcher(ctx, dispatcher_mode), _closing(ctx):
        results: dict[str, object] = {"detectors": detectors, "rounds": rounds, "gap_s": gap, "poll_s": poll,
                                      "dispatcher": dispatcher_mode}
        # warm-up: the first visit pays for connections and the dispatcher's start-up
        run_round(ctx, _event_waiter, "warm-up", min(detectors, 4), gap, 60.0, poll)
        for name, waiter in (("events", _event_waiter), ("listing_poll", _poll_listing)):
            latencies: list[float] = []
            for index in range(rounds):
                group = f"2026-11-24T03:{index:02d}:00.{int(time.time() * 1e6) % 10**6:06d}"
                latencies += run_round(ctx, waiter, f"{name}-{group}", detectors, gap, timeout, poll)
            results[name] = _summary(latencies)
        events, baseline = results["events"], results["listing_poll"]
        assert isinstance(events, dict) and isinstance(baseline, dict)
        results["ratio_p50"] = round(baseline["p50_ms"] / max(events["p50_ms"], 1e-3), 1)
        results["ratio_p95"] = round(baseline["p95_ms"] / max(events["p95_ms"], 1e-3), 1)
        results["dispatcher_counters"] = counters(ctx.redis)
    return results


@contextmanager
def _closing(ctx: Context) -> Iterator[None]:
    try:
        yield
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", type=int, default=20, help="Waiters (one per detector) per round.")
    parser.add_argument("--rounds", type=int, default=5, help="Visits per method.")
    parser.add_argument("--gap", type=float, default=0.02, help="Seconds between PUTs.")
    parser.add_argument("--poll", type=float, default=0.5, help="Baseline listing period (s).")
    parser.add_argument("--timeout", type=float, default=30.0, help="Longest wait (s).")
    parser.add_argument("--dispatcher", choices=("process", "thread"), default="process",
                        help="Run the dispatcher as its own process (as deployed) or in a thread.")
    parser.add_argument("--worker", action="store_true",
                        help="Also measure through the real wait_for_snap task on a gevent wait worker.")
    parser.add_argument("--json", action="store_true", help="Print JSON only.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="snap-latency-") as root, private_stack(Path(root)) as settings:
        results = measure(settings, args.detectors, args.rounds, args.gap, args.poll, args.timeout,
                          args.dispatcher)
        if args.worker:
            results["wait_worker"] = measure_worker(settings, args.detectors, args.rounds, args.gap, args.timeout)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"PUT complete -> wait returned, {args.detectors} detectors x {args.rounds} rounds, "
          f"{args.gap * 1e3:.0f} ms between PUTs, dispatcher in a {args.dispatcher}")
    print(f"{'method':<28}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    rows = [("events", "bucket events + BLPOP"), ("listing_poll", f"listing every {args.poll} s")]
    if args.worker:
        rows.append(("wait_worker", "events, gevent wait worker"))
    for name, label in rows:
        row = results[name]
        assert isinstance(row, dict)
        print(f"{label:<28}{row['n']:>6}{row['p50_ms']:>10}{row['p95_ms']:>10}{row['max_ms']:>10}")
    print(f"baseline / events: p50 x{results['ratio_p50']}, p95 x{results['ratio_p95']}")
    goal = results["events"]["p95_ms"] <= 50  # type: ignore[index]
    print(f"goal p95 <= 50 ms: {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
