"""The router: one announced visit becomes one chord and one deadline.

For each accepted ``next_visit`` the router decides the detectors (those named by fanned-out
messages, or the instrument's active science detectors), creates the visit's ledger record
(atomically: a second announcement of the same (instrument, group) is a duplicate and
publishes nothing) and publishes

- a chord whose header holds, per detector, the chain
  ``prepare_repo → wait_for_snap → ingest → run_pipeline`` with the queue set on *every*
  signature (a queue set on a chain routes only its first task): detector stages on
  ``detector.<instrument>.<NNN>``, the wait on ``wait``; its callback ``summarize_visit`` runs
  on ``summary``. The first three stages ignore their results (the next stage gets them in
  the message; the ledger records progress), so only ``run_pipeline`` writes to the result
  backend, as the chord needs;
- ``visit_deadline`` on ``summary``, due at the visit's expected end plus
  ``deadline_margin_s``: it writes the summary from the ledger if the chord has not (a lost
  message or an unconsumed queue must not leave a visit pending forever).

The chord is frozen here, not by Celery's canvas: :func:`freeze_chord` gives every task its id
and embeds, in each chain's first message, the rest of the chain as Celery signature dicts (the
last one carrying the callback, the group and its index), the exact messages the canvas would
send. The canvas clones each signature some twenty-five times while freezing a 189-detector
chord and sends each message through its own Redis client; frozen once, the visit is 189
messages sent in one batch (one Redis pipeline on a Redis broker), with the chord's size set
in the result backend first, as the canvas does.

The decisions (:func:`detector_queue`, :func:`plan_chord`, :func:`freeze_chord`,
:func:`deadline_eta`) are pure.
``startTime`` is TAI; :attr:`NextVisit.expected_end` converts it to the machine's UTC clock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prompt_tasks.context import Context
from prompt_tasks.errors import InvalidVisit
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger

if TYPE_CHECKING:
    from celery import Celery

    from prompt_tasks.model.visit import NextVisit

__all__ = [
    "DETECTOR_CHAIN",
    "SUMMARY_QUEUE",
    "WAIT_QUEUE",
    "Announcement",
    "ChainMessage",
    "ChordPlan",
    "FrozenChord",
    "PlannedTask",
    "active_detectors",
    "announce",
    "deadline_eta",
    "detector_queue",
    "freeze_chord",
    "instrument_detectors",
    "kwargs_repr",
    "parse_detector_queue",
    "parse_detector_spec",
    "plan_chord",
    "plan_deadline",
    "signature_dict",
]

WAIT_QUEUE = "wait"
SUMMARY_QUEUE = "summary"
#: The chain of one detector: (task name, runs on the detector's own queue).
DETECTOR_CHAIN: tuple[tuple[str, bool], ...] = (
    ("prompt_tasks.prepare_repo", True),
    ("prompt_tasks.wait_for_snap", False),
    ("prompt_tasks.ingest", True),
    ("prompt_tasks.run_pipeline", True),
)
SUMMARY_TASK = "prompt_tasks.summarize_visit"
DEADLINE_TASK = "prompt_tasks.visit_deadline"


@dataclass(frozen=True)
class PlannedTask:
    """One signature to publish: task name, queue, keyword arguments and message options."""

    name: str
    queue: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Extra message options (``ignore_result`` for the stages whose result only the next
    #: stage needs: no result-backend write, no result subscription for them).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChordPlan:
    """A visit's chord: one chain per detector, and the callback."""

    chains: list[list[PlannedTask]]
    callback: PlannedTask


@dataclass(frozen=True)
class Announcement:
    """What :func:`announce` did."""

    key: str
    duplicate: bool
    detectors: list[int]
    chord_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"key": self.key, "duplicate": self.duplicate, "detectors": self.detectors,
                "chord_id": self.chord_id}


def detector_queue(instrument: str, detector: int) -> str:
    """The queue of one detector: ``detector.<instrument>.<NNN>``."""
    detector = int(detector)
    if detector < 0:
        raise ValueError(f"detector {detector} is negative")
    return f"detector.{instrument}.{detector:03d}"


def parse_detector_queue(queue: str) -> tuple[str, int] | None:
    """(instrument, detector) of a detector queue name, or None for any other queue."""
    head, _, rest = queue.partition(".")
    instrument, _, number = rest.rpartition(".")
    if head != "detector" or not instrument or not number.isdigit():
        return None
    return instrument, int(number)


def plan_chord(visit: NextVisit, detectors: Iterable[int]) -> ChordPlan:
    """The chord of ``visit`` over ``detectors`` (sorted, duplicates dropped)."""
    payload = visit.without_detector().to_json_dict()
    chains = []
    last = len(DETECTOR_CHAIN) - 1
    for det in sorted({int(d) for d in detectors}):
        own = detector_queue(visit.instrument, det)
        chains.append([
            PlannedTask(name, own if on_detector_queue else WAIT_QUEUE, {"visit": payload, "detector": det},
                        {} if step == last else {"ignore_result": True})
            for step, (name, on_detector_queue) in enumerate(DETECTOR_CHAIN)
        ])
    callback = PlannedTask(SUMMARY_TASK, SUMMARY_QUEUE, {"instrument": visit.instrument, "group": visit.groupId})
    return ChordPlan(chains, callback)


@dataclass(frozen=True)
class ChainMessage:
    """The one message that starts a detector's chain: its first task, the rest embedded."""

    first: PlannedTask
    task_id: str
    #: The chain's later steps as Celery signature dicts, the last step first (the order in which
    #: a worker pops them); the last step carries the chord's callback, group and index.
    rest: list[dict[str, Any]]
    #: Id of the chain's last task: its result is the chain's part of the chord.
    result_id: str


@dataclass(frozen=True)
class FrozenChord:
    """A chord with every id decided: its group, its callback and one message per chain."""

    group_id: str
    callback: dict[str, Any]
    messages: list[ChainMessage]

    @property
    def callback_id(self) -> str:
        """Id of the callback task (what the ledger records as the visit's chord id)."""
        return str(self.callback["options"]["task_id"])


def signature_dict(task: PlannedTask, **options: Any) -> dict[str, Any]:
    """``task`` as the dict of a Celery signature (what a worker rebuilds with ``signature()``)."""
    return {"task": task.name, "args": [], "kwargs": task.kwargs,
            "options": {"queue": task.queue, "kwargsrepr": kwargs_repr(task.kwargs), **task.options, **options},
            "subtask_type": None, "immutable": False}


def freeze_chord(plan: ChordPlan, new_id: Callable[[], str] = lambda: str(uuid.uuid4())) -> FrozenChord:
    """Every id of ``plan``'s chord and the message that starts each chain."""
    group_id = new_id()
    callback = signature_dict(plan.callback, task_id=new_id(), group_id=group_id)
    messages = []
    for index, chain in enumerate(plan.chains):
        ids = [new_id() for _ in chain]
        last = len(chain) - 1
        rest = [signature_dict(task, task_id=ids[step],
                               **({"group_id": group_id, "chord": callback, "group_index": index}
                                  if step == last else {}))
                for step, task in enumerate(chain) if step > 0]
        rest.reverse()
        messages.append(ChainMessage(chain[0], ids[0], rest, ids[last]))
    return FrozenChord(group_id, callback, messages)


def deadline_eta(visit: NextVisit, margin_s: float) -> float:
    """When the visit's deadline falls (unix s): its expected end plus ``margin_s``."""
    return visit.expected_end + margin_s


def plan_deadline(visit: NextVisit, margin_s: float, now: float) -> tuple[PlannedTask, float]:
    """The deadline task of ``visit`` and its countdown from ``now`` (never negative)."""
    task = PlannedTask(DEADLINE_TASK, SUMMARY_QUEUE, {"instrument": visit.instrument, "group": visit.groupId})
    return task, max(0.0, deadline_eta(visit, margin_s) - now)


def parse_detector_spec(spec: str) -> dict[str, list[int]]:
    """``'MyCam=0-3,5;LSSTCam=0-188'`` → ``{"MyCam": [0, 1, 2, 3, 5], "LSSTCam": [0, ..., 188]}``.

    Raises
    ------
    ValueError
        A part that is not ``INSTRUMENT=RANGES``.
    """
    out: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, ranges = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"active_detectors: {part!r} is not INSTRUMENT=RANGES")
        chosen: set[int] = set()
        for item in filter(None, (r.strip() for r in ranges.split(","))):
            low, dash, high = item.partition("-")
            try:
                first, last = int(low), int(high if dash else low)
            except ValueError:
                raise ValueError(f"active_detectors: {item!r} is not a detector or a range") from None
            if first < 0 or last < first:
                raise ValueError(f"active_detectors: bad range {item!r}")
            chosen.update(range(first, last + 1))
        out[name.strip()] = sorted(chosen)
    return out


def active_detectors(settings: Settings, instrument: str) -> list[int]:
    """The detectors a visit of ``instrument`` runs on: from settings, else from its plugin."""
    configured = parse_detector_spec(settings.active_detectors).get(instrument)
    return configured if configured else instrument_detectors(instrument)


def instrument_detectors(instrument: str) -> list[int]:
    """The active science detectors of ``instrument``, from its plugin in the registry.

    A plugin may list them (``science_detectors``); otherwise every detector of its default
    focal-plane geometry is active.

    Raises
    ------
    InvalidVisit
        The instrument is not known (or no registry is installed).
    """
    try:
        from prompt_tasks.instruments import UnknownInstrument, load_plugin
    except ImportError:
        raise InvalidVisit(f"instrument: unknown instrument {instrument}") from None
    try:
        plugin = load_plugin(instrument)
    except UnknownInstrument:
        raise InvalidVisit(f"instrument: unknown instrument {instrument}") from None
    listed = getattr(plugin, "science_detectors", None)
    if listed is None:
        listed = [getattr(det, "id", det) for det in getattr(plugin.geometry(None), "detectors", ())]
    detectors = sorted({int(d) for d in (listed() if callable(listed) else listed)})
    if not detectors:
        raise InvalidVisit(f"instrument: {instrument} has no active science detectors")
    return detectors


def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """A short readable form of a task's keyword arguments (the visit as ``instrument/group``).

    Sent as the message's ``kwargsrepr`` (what Flower and the logs show), it spares Celery a
    ``saferepr`` of the whole visit for each of a visit's hundreds of messages.
    """
    visit = kwargs.get("visit")
    if isinstance(visit, dict):
        kwargs = {**kwargs, "visit": f"{visit.get('instrument')}/{visit.get('groupId')}"}
    return repr(kwargs)


def _signature(app: Celery, task: PlannedTask) -> Any:
    return app.signature(task.name, kwargs=task.kwargs, queue=task.queue, kwargsrepr=kwargs_repr(task.kwargs),
                         **task.options)


def _send_chord(app: Celery, frozen: FrozenChord, producer: Any) -> None:
    """Register ``frozen`` with the result backend as the canvas does, then send its messages."""
    backend = app.backend
    callback = app.signature(frozen.callback)
    # a backend that joins by polling or by counting saves the group here; Redis only records
    # the chord's size, which every header task's result is counted against
    backend.apply_chord((frozen.group_id, [app.AsyncResult(m.result_id) for m in frozen.messages]), callback)
    backend.set_chord_size(frozen.group_id, len(frozen.messages))
    for message in frozen.messages:
        _signature(app, message.first).apply_async(task_id=message.task_id, root_id=message.task_id,
                                                   chain=message.rest, producer=producer)


def announce(
    app: Celery,
    settings_or_ctx: Settings | Context,
    visit: NextVisit,
    detectors: Sequence[int] | None = None,
) -> Announcement:
    """Start ``visit`` once: create its ledger record, publish its chord and its deadline.

    ``detectors`` are the detectors to process (fan-out: exactly those received); by default
    the instrument's active science detectors. Idempotent per (instrument, group): a repeated
    announcement returns ``duplicate=True`` and publishes nothing.

    Raises
    ------
    InvalidVisit
        Unknown instrument (with no detectors given), or an empty detector list.
    """
    ctx = settings_or_ctx if isinstance(settings_or_ctx, Context) else Context(settings_or_ctx)
    own_ctx = ctx is not settings_or_ctx
    try:
        if detectors is None:
            detectors = active_detectors(ctx.settings, visit.instrument)
        chosen = sorted({int(d) for d in detectors})
        if not chosen:
            raise InvalidVisit("detector: no detectors to process")
        if chosen[0] < 0:
            raise InvalidVisit(f"detector: {chosen[0]} is negative")
        settings = ctx.settings
        now = time.time()
        deadline_task, countdown = plan_deadline(visit, settings.deadline_margin_s, now)
        created = ledger.create_visit(ctx.redis, visit, chosen, settings.ledger_ttl_s,
                                      deadline=now + countdown, received=now)
        if not created:
            return Announcement(visit.key, True, chosen, None)
        try:
            frozen = freeze_chord(plan_chord(visit, chosen))
            # one producer for every message; on a Redis broker its batch sends them in one
            # pipeline, and nothing at all if anything fails before the end
            with app.producer_or_acquire() as producer, producer.batch():
                _send_chord(app, frozen, producer)
                _signature(app, deadline_task).apply_async(countdown=countdown, producer=producer)
        except Exception:
            ledger.delete_visit(ctx.redis, visit.instrument, visit.groupId)
            raise
        ledger.set_fields(ctx.redis, visit.instrument, visit.groupId, {"chord_id": frozen.callback_id},
                          settings.ledger_ttl_s)
        return Announcement(visit.key, False, chosen, frozen.callback_id)
    finally:
        if own_ctx:
            ctx.close()
