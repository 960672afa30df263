"""The router: queue names, the chord plan, the deadline (pure) and idempotent announcement."""

from __future__ import annotations

import json

import pytest
import redis
from celery import Celery

from prompt_tasks.errors import InvalidVisit
from prompt_tasks.flow.router import (
    SUMMARY_QUEUE,
    WAIT_QUEUE,
    announce,
    detector_queue,
    freeze_chord,
    instrument_detectors,
    kwargs_repr,
    parse_detector_queue,
    plan_chord,
    plan_deadline,
)
from prompt_tasks.model.visit import NextVisit, tai_now
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger


def _visit(group: str = "2026-11-24T01:00:00.000", **extra: object) -> NextVisit:
    values: dict[str, object] = {"instrument": "LSSTCam", "groupId": group, "startTime": 1000.0,
                                 "duration": 30.0, "nimages": 2}
    values.update(extra)
    return NextVisit.model_validate(values)


def test_detector_queue() -> None:
    assert detector_queue("LSSTCam", 5) == "detector.LSSTCam.005"
    assert detector_queue("LSSTCam", 188) == "detector.LSSTCam.188"
    assert detector_queue("X", 1234) == "detector.X.1234"
    assert parse_detector_queue("detector.LSSTCam.005") == ("LSSTCam", 5)
    assert parse_detector_queue("wait") is None and parse_detector_queue("detector.x") is None
    with pytest.raises(ValueError):
        detector_queue("LSSTCam", -1)


def test_plan_chord_sets_a_queue_on_every_signature() -> None:
    visit = _visit(detector=4)
    plan = plan_chord(visit, [2, 0, 2, 1])
    assert len(plan.chains) == 3
    for det, chain in zip((0, 1, 2), plan.chains, strict=True):
        names = [task.name for task in chain]
        assert names == ["prompt_tasks.prepare_repo", "prompt_tasks.wait_for_snap",
                         "prompt_tasks.ingest", "prompt_tasks.run_pipeline"]
        own = f"detector.LSSTCam.{det:03d}"
        assert [task.queue for task in chain] == [own, WAIT_QUEUE, own, own]
        # only the last stage's result goes to the result backend (the chord needs it)
        assert [task.options.get("ignore_result", False) for task in chain] == [True, True, True, False]
        for task in chain:
            assert task.kwargs["detector"] == det
            assert task.kwargs["visit"]["groupId"] == visit.groupId
            assert "detector" not in task.kwargs["visit"]  # the fan-out field is dropped
    assert plan.callback.name == "prompt_tasks.summarize_visit" and plan.callback.queue == SUMMARY_QUEUE
    assert plan.callback.kwargs == {"instrument": "LSSTCam", "group": visit.groupId}


def test_plan_deadline() -> None:
    visit = _visit()  # starts at TAI 1000, lasts 30 s
    assert visit.expected_end == pytest.approx(1030.0 - 8.0, abs=0.5)  # TAI - UTC was ~8 s in 1970
    task, countdown = plan_deadline(visit, 120.0, now=1000.0)
    assert (task.name, task.queue) == ("prompt_tasks.visit_deadline", SUMMARY_QUEUE)
    assert countdown == pytest.approx(visit.expected_end + 120.0 - 1000.0)
    assert plan_deadline(visit, 120.0, now=5000.0)[1] == 0.0


def test_freeze_chord_embeds_each_chain_in_its_first_message(celery_app: Celery) -> None:
    from celery import signature

    counter = iter(range(10_000))
    frozen = freeze_chord(plan_chord(_visit(), range(189)), new_id=lambda: f"id-{next(counter)}")
    assert len(frozen.messages) == 189
    ids = [frozen.group_id, frozen.callback_id]
    for index, message in enumerate(frozen.messages):
        assert message.first.name == "prompt_tasks.prepare_repo"
        assert message.first.queue == detector_queue("LSSTCam", index)
        # a worker pops the embedded chain from its end: the next step last
        assert [step["task"] for step in message.rest] == [
            "prompt_tasks.run_pipeline", "prompt_tasks.ingest", "prompt_tasks.wait_for_snap"]
        last, *earlier = [signature(step, app=celery_app) for step in message.rest]
        assert last.options["chord"] == frozen.callback and last.options["group_index"] == index
        assert last.options["group_id"] == frozen.group_id and last.id == message.result_id
        assert all("chord" not in step.options and step.options["ignore_result"] for step in earlier)
        assert [step["options"]["queue"] for step in message.rest] == [message.first.queue, message.first.queue,
                                                                      WAIT_QUEUE]
        ids += [message.task_id, *(step.id for step in earlier), last.id]
    assert len(set(ids)) == len(ids) == 2 + 189 * 4  # every task its own id
    callback = signature(frozen.callback, app=celery_app)
    assert (callback.task, callback.options["queue"]) == ("prompt_tasks.summarize_visit", SUMMARY_QUEUE)
    json.dumps([frozen.callback, *(m.rest for m in frozen.messages)])  # what the broker carries


def test_announce_is_idempotent(celery_app: Celery, settings: Settings, rdb: redis.Redis) -> None:
    visit = _visit(startTime=tai_now())
    first = announce(celery_app, settings, visit, detectors=[3, 1, 2])
    assert not first.duplicate and first.detectors == [1, 2, 3] and first.chord_id
    assert first.key == "LSSTCam/2026-11-24T01:00:00.000"
    again = announce(celery_app, settings, visit, detectors=[1, 2, 3])
    assert again.duplicate and again.chord_id is None
    record = ledger.read_visit(rdb, "LSSTCam", visit.groupId)
    assert record is not None and record.chord_id == first.chord_id
    assert record.deadline == pytest.approx(visit.expected_end + settings.deadline_margin_s, abs=1.0)
    # one message per first chain task, on each detector's queue, and one deadline: nothing twice
    for det in (1, 2, 3):
        assert rdb.llen(detector_queue("LSSTCam", det)) == 1
    assert rdb.llen("summary") == 1


def test_announce_unknown_instrument_without_detectors(celery_app: Celery, settings: Settings,
                                                       rdb: redis.Redis) -> None:
    with pytest.raises(InvalidVisit, match="instrument: unknown instrument NoSuchCam"):
        announce(celery_app, settings, _visit(instrument="NoSuchCam"))
    with pytest.raises(InvalidVisit):
        announce(celery_app, settings, _visit(), detectors=[])
    with pytest.raises(InvalidVisit, match="negative"):
        announce(celery_app, settings, _visit(), detectors=[3, -1])
    assert ledger.recent(rdb) == []


def test_instrument_detectors_from_the_plugin_registry(celery_app: Celery, settings: Settings) -> None:
    assert instrument_detectors("SimCam") == list(range(9))
    announced = announce(celery_app, settings, _visit(instrument="SimCam", startTime=tai_now()))
    assert announced.detectors == list(range(9)) and not announced.duplicate


def test_kwargs_repr_names_the_visit() -> None:
    visit = _visit()
    plan = plan_chord(visit, [7])
    assert kwargs_repr(plan.chains[0][0].kwargs) == f"{{'visit': 'LSSTCam/{visit.groupId}', 'detector': 7}}"
    assert kwargs_repr({"instrument": "X", "group": "g"}) == "{'instrument': 'X', 'group': 'g'}"


def test_detector_spec() -> None:
    from prompt_tasks.flow.router import parse_detector_spec

    assert parse_detector_spec("SimCam=0-3,5; LSSTCam=7") == {"SimCam": [0, 1, 2, 3, 5], "LSSTCam": [7]}
    assert parse_detector_spec("") == {}
    for bad in ("SimCam", "SimCam=a-b", "SimCam=5-3", "=1"):
        with pytest.raises(ValueError, match="active_detectors"):
            parse_detector_spec(bad)


def test_active_detectors_from_settings_then_plugin() -> None:
    from prompt_tasks.flow.router import active_detectors

    assert active_detectors(Settings(active_detectors="SimCam=0-1"), "SimCam") == [0, 1]
    assert active_detectors(Settings(), "SimCam") == list(range(9))
