"""The queue controller: keeps each detector queue consumed by exactly one live compute worker.

A :class:`QueueController` runs as a thread of the intake process. Twice a second it reads every
worker's heartbeat from Redis (:mod:`prompt_tasks.fleet.heartbeat`: which queues it consumes;
also the liveness check, a worker whose beat has expired in two rounds in a row is gone),
computes the assignment of the managed detector queues to the live compute workers (node
names starting with ``detector-``, see ``workers.detector_hostname``) with
:func:`prompt_tasks.fleet.affinity.rebalance`, and applies the difference with
``cancel_consumer`` / ``add_consumer``. Reconciling against what the workers report, rather
than against what it last did, also heals a worker that restarted under the same name, a lost
control message, or a queue someone added by hand; a worker just told to change is left alone
until its beats can show the change (:func:`hold_back`).

Reading beats costs the controller two Redis round trips a round whatever the fleet's size;
the ``active_queues`` broadcast it replaces made every worker answer every round, and cost the
controller about 10 ms of CPU per round collecting the replies.

The assignment and each rebalance are recorded in Redis for ``prompt-tasks workers``:
:data:`AFFINITY_ASSIGNMENT` (worker → JSON list of queues), :data:`AFFINITY_EVENTS` (newest first, JSON
records with the time taken and the moved queues) and :data:`AFFINITY_STATE`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

from prompt_tasks.butler.central import central_cameras
from prompt_tasks.context import Context
from prompt_tasks.fleet import affinity
from prompt_tasks.fleet.heartbeat import PERIOD_S, queues_by_node, read_beats
from prompt_tasks.fleet.roles import detector_hostname
from prompt_tasks.flow.router import detector_queue, instrument_detectors, parse_detector_spec
from prompt_tasks.instruments import known_instruments, load_plugin
from prompt_tasks.store.keys import AFFINITY_ASSIGNMENT, AFFINITY_EVENTS, AFFINITY_STATE

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from prompt_tasks.settings import Settings

__all__ = [
    "WORKER_PREFIX",
    "QueueController",
    "adopted_assignment",
    "central_queues",
    "configured_queues",
    "hold_back",
    "managed_queues",
    "plan_actions",
    "read_assignment",
    "read_events",
    "read_state",
]

log = logging.getLogger(__name__)

#: Node names of compute workers start with this (``detector-<index>@<host>``).
WORKER_PREFIX = detector_hostname(0).removesuffix("0")
_EVENTS_KEPT = 200


def managed_queues(instruments: Iterable[str]) -> list[str]:
    """The detector queues of ``instruments`` (their active science detectors)."""
    return sorted(
        detector_queue(instrument, det) for instrument in instruments for det in instrument_detectors(instrument)
    )


def central_queues(settings: Settings, instruments: Iterable[str]) -> list[str]:
    """The detector queues of the cameras stored in the central repo, when it has any.

    A simulated camera's focal plane is chosen when its central repo is built (its plugin's
    ``read_camera``), so the plugin's default geometry may list fewer detectors than the
    visits name; their queues must have a consumer too. An unreadable or absent repo gives none.
    """
    out = []
    for instrument, camera in central_cameras(settings, instruments).items():
        geometry = load_plugin(instrument).geometry(camera)
        out += [detector_queue(instrument, getattr(d, "id", d)) for d in getattr(geometry, "detectors", ())]
    return out


def configured_queues(settings: Settings, instruments: Iterable[str]) -> list[str]:
    """The detector queues to balance: an instrument's ``active_detectors`` from settings when
    named there (so the active ones are spread evenly), else its plugin's and central camera's.
    """
    configured = parse_detector_spec(settings.active_detectors)
    named = [i for i in instruments if configured.get(i)]
    rest = [i for i in instruments if not configured.get(i)]
    queues = [detector_queue(i, det) for i in named for det in configured[i]]
    return queues + (managed_queues(rest) + central_queues(settings, rest) if rest else [])


def plan_actions(
    desired: Mapping[str, str], observed: Mapping[str, Iterable[str]], managed: Iterable[str]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(cancel, add) lists of (worker, queue) that turn ``observed`` into ``desired``.

    Only ``managed`` queues are touched; a worker's other queues (``catchup``...) stay.
    """
    managed = set(managed)
    cancel, add = [], []
    for worker, queues in sorted(observed.items()):
        have = set(queues) & managed
        want = {q for q, w in desired.items() if w == worker}
        cancel += [(worker, q) for q in sorted(have - want)]
        add += [(worker, q) for q in sorted(want - have)]
    return cancel, add


def hold_back(
    actions: Iterable[tuple[str, str]], acted: Mapping[str, float], now: float, settle_s: float
) -> list[tuple[str, str]]:
    """``actions`` without those on workers told to change less than ``settle_s`` ago.

    A worker's beats show a change only from its next beat after the control message: until
    then the controller would see the old queues and send the same change again.
    """
    return [(worker, queue) for worker, queue in actions if now - acted.get(worker, -settle_s) >= settle_s]


def adopted_assignment(observed: Mapping[str, Iterable[str]], managed: Iterable[str]) -> dict[str, str]:
    """Queue → worker from what workers consume (a queue consumed twice goes to the first)."""
    managed = set(managed)
    owner: dict[str, str] = {}
    for worker, queues in sorted(observed.items()):
        for queue in sorted(set(queues) & managed):
            owner.setdefault(queue, worker)
    return owner


class QueueController:
    """Assigns detector queues to live compute workers (see the module docstring).

    Parameters
    ----------
    app
        The Celery app whose workers are controlled.
    settings
        Settings of the process (Redis for the recorded assignment).
    queues
        The detector queues to manage; default: those of ``instruments``.
    instruments
        Instruments whose active science detectors' queues are managed; default: every
        instrument of the plugin registry.
    period
        Seconds between two observations.
    miss_limit
        Observations in a row a known worker's beat must be missing before it counts as gone
        (a loaded worker can beat late once; moving its queues for that would break affinity).
    settle_s
        Seconds a worker told to change is left alone (:func:`hold_back`).
    """

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        queues: Sequence[str] | None = None,
        instruments: Sequence[str] | None = None,
        period: float = 0.5,
        miss_limit: int = 2,
        settle_s: float = 2 * PERIOD_S + 0.5,
    ) -> None:
        self.app = app
        self.ctx = Context(settings)
        self.period = period
        self.miss_limit = max(int(miss_limit), 1)
        self.settle_s = settle_s
        self._missed: dict[str, int] = {}
        #: Worker → when (monotonic) it was last told to change.
        self._acted: dict[str, float] = {}
        self._unrecorded: dict[str, Any] | None = None
        self._first = True
        if queues is None:
            if instruments is None:
                instruments = sorted(known_instruments())
            queues = configured_queues(settings, instruments)
        self.queues: list[str] = sorted(set(queues))
        #: Queue → worker, as last applied.
        self.assignment: dict[str, str] = {}
        self.workers: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Run the control loop in a daemon thread."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="queue-controller", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and close its Redis client (the assignment stays in force)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.ctx.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.warning("queue controller tick failed", exc_info=True)
            self._stop.wait(self.period)

    # ------------------------------------------------------------------ one round
    def observe(self) -> dict[str, set[str]]:
        """Live compute workers → the queues each consumes, from their last beats."""
        observed = queues_by_node(read_beats(self.ctx.redis))
        return {worker: queues for worker, queues in observed.items() if worker.startswith(WORKER_PREFIX)}

    def tick(self) -> dict[str, Any] | None:
        """Observe, rebalance, apply; the rebalance event recorded, or None if nothing changed."""
        with self._lock:
            started = time.time()
            observed = self.observe()
            workers = self._live(observed)
            if self._first:
                # A restarted controller adopts what the workers consume instead of reshuffling.
                current: Mapping[str, str] = adopted_assignment(observed, self.queues)
                joined: set[str] | None = None
                self._first = False
            else:
                current, joined = self.assignment, set(workers) - set(self.workers)
            desired = affinity.rebalance(self.queues, workers, current, joined=joined)
            cancel, add = plan_actions(desired, observed, self.queues)
            now = time.monotonic()
            self._acted = {w: t for w, t in self._acted.items() if now - t < self.settle_s}
            cancel = hold_back(cancel, self._acted, now, self.settle_s)
            add = hold_back(add, self._acted, now, self.settle_s)
            changed = desired != self.assignment or workers != self.workers
            if not (changed or cancel or add):
                if self._unrecorded is not None:  # Redis was down when it changed
                    self._record(self._unrecorded)
                    self._unrecorded = None
                self.ctx.redis.hset(AFFINITY_STATE, "checked", repr(time.time()))
                return None
            failures = self._apply(cancel, add)
            self._acted.update(dict.fromkeys((worker for worker, _ in [*cancel, *add]), time.monotonic()))
            event = {
                "t": started,
                "took_s": round(time.time() - started, 4),
                "workers": workers,
                "joined": sorted(set(workers) - set(self.workers)),
                "left": sorted(set(self.workers) - set(workers)),
                "moved": [list(move) for move in affinity.moves(current, desired)],
                "added": len(add),
                "cancelled": len(cancel),
                "failures": failures,
            }
            self.assignment, self.workers = desired, workers
            self._unrecorded = event
            self._record(event)
            self._unrecorded = None
            log.info(
                "rebalanced %d queues over %d workers in %.3f s (%d moved, +%d -%d)",
                len(self.queues), len(workers), event["took_s"], len(event["moved"]), len(add), len(cancel),
            )
            return event

    def _live(self, observed: Mapping[str, Iterable[str]]) -> list[str]:
        """Workers whose beat was read, and known ones missing from fewer than ``miss_limit`` rounds."""
        for worker in self.workers:
            self._missed[worker] = 0 if worker in observed else self._missed.get(worker, 0) + 1
        for worker in observed:
            self._missed[worker] = 0
        live = {w for w, missed in self._missed.items() if missed < self.miss_limit}
        self._missed = {w: n for w, n in self._missed.items() if w in live}
        return sorted(live)

    def _apply(self, cancel: list[tuple[str, str]], add: list[tuple[str, str]]) -> list[str]:
        control = self.app.control
        failures: list[str] = []
        for worker, queue in cancel:
            replies = control.cancel_consumer(queue, destination=[worker], reply=True, timeout=2.0)
            if not replies:
                failures.append(f"cancel {queue} on {worker}: no reply")
        for worker, queue in add:
            replies = control.add_consumer(queue, destination=[worker], reply=True, timeout=2.0)
            if not replies or any("error" in reply.get(worker, {}) for reply in replies):
                failures.append(f"add {queue} on {worker}: {replies!r}")
        return failures

    def _record(self, event: Mapping[str, Any]) -> None:
        by_worker = affinity.assignment_by_worker(self.assignment, self.workers)
        pipe = self.ctx.redis.pipeline(transaction=True)
        pipe.delete(AFFINITY_ASSIGNMENT)
        if by_worker:
            pipe.hset(AFFINITY_ASSIGNMENT, mapping={w: json.dumps(qs) for w, qs in by_worker.items()})
        pipe.lpush(AFFINITY_EVENTS, json.dumps(event, sort_keys=True))
        pipe.ltrim(AFFINITY_EVENTS, 0, _EVENTS_KEPT - 1)
        pipe.hset(AFFINITY_STATE, mapping={
            "updated": repr(event["t"]), "checked": repr(time.time()),
            "queues": json.dumps(self.queues), "workers": json.dumps(self.workers),
        })
        pipe.execute()


# ---------------------------------------------------------------------- readers (CLI)


def read_assignment(client: redis.Redis) -> dict[str, list[str]]:
    """Worker → its detector queues, as last applied by the controller."""
    return {str(w): json.loads(qs) for w, qs in sorted(client.hgetall(AFFINITY_ASSIGNMENT).items())}


def read_events(client: redis.Redis, limit: int = 10) -> list[dict[str, Any]]:
    """The newest rebalance events, newest first."""
    return [json.loads(raw) for raw in client.lrange(AFFINITY_EVENTS, 0, max(limit, 1) - 1)]


def read_state(client: redis.Redis) -> dict[str, Any]:
    """When the controller last changed (``updated``) and last looked (``checked``)."""
    raw = client.hgetall(AFFINITY_STATE)
    out: dict[str, Any] = {}
    for name in ("updated", "checked"):
        if raw.get(name):
            out[name] = float(raw[name])
    for name in ("queues", "workers"):
        if raw.get(name):
            out[name] = json.loads(raw[name])
    return out
