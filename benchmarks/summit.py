"""The benchmark's summit: raws simulated once to disk, then played on schedule with PUT times.

:func:`simulate_raws` renders every raw of a plan before anything is measured (the simulator
must not compete with the stack for the CPU) and keeps them on disk, so the baseline is fed
exactly the same bytes. :func:`play` replays the plan's events at their planned times (shifted
to start now, optionally sped up), calls ``announce`` for each visit and PUTs each snap's raws
in parallel, recording when every PUT completed: the start of the ``PUT→snap`` stages.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.night import PlannedVisit, events_of, raw_key

__all__ = ["Played", "bucket_put", "play", "raw_path", "simulate_raws"]


def raw_path(root: Path, group: str, detector: int, snap: int) -> Path:
    """Where the simulated raw of ``(group, detector, snap)`` is kept."""
    return root / group.replace(":", "-") / f"{detector:03d}_{snap}.fits"


@functools.lru_cache(maxsize=1)
def _world(config_text: str) -> tuple[SimConfig, Any]:
    """The config and its sky, built once per simulator process."""
    from prompt_tasks.instruments.simcam.sky import Sky

    config = SimConfig.model_validate_json(config_text)
    return config, Sky(config)


def _simulate_one(config_text: str, visit: PlannedVisit, detector: int, snap: int, path: str) -> None:
    from prompt_tasks.instruments.simcam.raws import simulate_snap

    config, sky = _world(config_text)
    Path(path).write_bytes(simulate_snap(config, visit.spec, detector, snap, sky))


def simulate_raws(config: SimConfig, plan: Sequence[PlannedVisit], detectors: Sequence[int], root: Path,
                  processes: int = 2, progress: Callable[[int], None] | None = None) -> int:
    """Render every raw of ``plan`` into ``root`` (skipping those already there); the count."""
    jobs = []
    for visit in plan:
        for det in detectors:
            for snap in range(visit.spec.snaps):
                path = raw_path(root, visit.spec.group, det, snap)
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    jobs.append((visit, det, snap, str(path)))
    if not jobs:
        return 0
    config_text = config.model_dump_json()
    with ProcessPoolExecutor(processes) as pool:
        futures = [pool.submit(_simulate_one, config_text, *job) for job in jobs]
        for future in futures:
            future.result()
            if progress:
                progress(1)
    return len(jobs)


@dataclass
class Played:
    """What :func:`play` did: when each visit was announced and each raw's PUT completed."""

    #: group → unix time the announcement was sent.
    announced: dict[str, float] = field(default_factory=dict)
    #: group → {(detector, snap): unix time the PUT completed}.
    puts: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    #: Seconds each event was late on its schedule.
    late: list[float] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0


def play(config: SimConfig, plan: Sequence[PlannedVisit], detectors: Sequence[int], root: Path,
         announce: Callable[[PlannedVisit], None], put: Callable[[str, bytes], None], *,
         speed: float = 1.0, start_in: float = 1.0, threads: int = 8,
         on_put: Callable[[int], None] | None = None) -> Played:
    """Replay ``plan`` now: announcements through ``announce``, raws through ``put(key, data)``.

    Event times keep their spacing divided by ``speed``; the first event happens ``start_in``
    seconds from now.
    """
    events = events_of(plan)
    by_index = {p.index: p for p in plan}
    played = Played(started=time.time())
    origin = events[0].at
    zero = time.time() + start_in

    def put_one(key: str, path: Path) -> float:
        put(key, path.read_bytes())
        return time.time()

    with ThreadPoolExecutor(threads) as pool:
        for event in events:
            visit = by_index[event.visit]
            due = zero + (event.at - origin) / speed
            time.sleep(max(0.0, due - time.time()))
            played.late.append(max(0.0, time.time() - due))
            group = visit.spec.group
            if event.kind == "announce":
                played.announced[group] = time.time()
                announce(visit)
                continue
            futures = {
                (det, event.snap): pool.submit(put_one, raw_key(config, visit.spec, det, event.snap),
                                               raw_path(root, group, det, event.snap))
                for det in detectors
            }
            done = played.puts.setdefault(group, {})
            for where, future in futures.items():
                done[where] = future.result()
            if on_put:
                on_put(len(futures))
    played.ended = time.time()
    return played


def bucket_put(client: Any, bucket: str) -> Callable[[str, bytes], None]:
    """A ``put(key, data)`` into ``bucket`` with a minio client."""

    def put(key: str, data: bytes) -> None:
        client.put_object(bucket, key, io.BytesIO(data), len(data), content_type="application/fits")

    return put
