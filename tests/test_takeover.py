"""A host taking over a detector mid-visit (its first host died, its queue moved): real Butler repos.

The stages a dead host left in flight come back on a host that has not prepared the
detector-visit, maybe not even holding the detector's repo, and maybe two of them at once
(the dead host's two slots). Each must end as if the visit had been served here from the
start: the visit's calibrations and templates preloaded, ApPipe run, not a fallback.
"""

from __future__ import annotations

import multiprocessing
import queue
from pathlib import Path
from typing import Any

import pytest

from prompt_tasks.context import Context
from prompt_tasks.settings import Settings
from tests.butlerkit import NIGHT_START, central_fixture, next_visit, put_raws, visit_spec, wait_status, worker_settings

pytestmark = pytest.mark.slow

DETECTOR = 2
#: Visits of these tests: their own hour of the test night, one minute apart.
START = NIGHT_START + 7200


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    return central_fixture(tmp_path_factory, servers)


def _prepared_and_ingested(central: Settings, root: Path, n: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``n`` visits prepared and ingested on a first host (root ``root``): (next_visit, ingest status)."""
    from prompt_tasks.butler import stages

    ctx = Context(worker_settings(central, root))
    out = []
    try:
        for i in range(n):
            spec = visit_spec(START + 60 * i, snaps=1)
            keys = put_raws(ctx.settings, spec, [DETECTOR])
            assert stages.prepare(ctx, next_visit(spec), DETECTOR).ok
            ingested = stages.ingest(ctx, next_visit(spec), DETECTOR, wait_status(spec, DETECTOR, keys))
            assert ingested.ok, ingested.reason
            out.append((next_visit(spec), ingested.to_dict()))
    finally:
        ctx.close()
    return out


def test_an_ingest_on_a_host_that_did_not_prepare_prepares_first(central: Settings, tmp_path: Path) -> None:
    """The ingest of a visit prepared on a dead host, delivered to one that never held the detector
    (it ingested into an empty repo, and the run found neither calibrations nor collections)."""
    from prompt_tasks.butler import stages
    from prompt_tasks.butler.localrepo import repos_of

    spec = visit_spec(START + 600, snaps=1)
    keys = put_raws(central, spec, [DETECTOR])
    ctx = Context(worker_settings(central, tmp_path / "taker"))
    try:
        repos = repos_of(ctx)
        assert not repos.was_prepared("SimCam", DETECTOR, spec.group)
        ingested = stages.ingest(ctx, next_visit(spec), DETECTOR, wait_status(spec, DETECTOR, keys))
        assert ingested.ok, ingested.reason
        assert repos.was_prepared("SimCam", DETECTOR, spec.group)
        ran = stages.run(ctx, next_visit(spec), DETECTOR, ingested.to_dict())
        assert ran.ok and ran.data["pipeline"] == "ApPipe", ran.reason
    finally:
        ctx.close()


def _redo(settings: Settings, visit: dict[str, Any], ingest_status: dict[str, Any], start: Any,
          results: Any) -> None:
    """One pool process of the new host: the redelivered run of ``visit``."""
    from prompt_tasks.butler import stages

    ctx = Context(settings)
    try:
        start.wait(60)
        status = stages.run(ctx, visit, DETECTOR, ingest_status)
        results.put((visit["groupId"], status.outcome.value, status.data.get("pipeline"), status.reason))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put((visit["groupId"], "raised", None, f"{type(exc).__name__}: {exc}"))
    finally:
        ctx.close()


def test_two_runs_redelivered_at_once_to_a_new_host_both_run(central: Settings, tmp_path: Path) -> None:
    """Two runs of one detector (same night, same pipeline) start at once in two processes of a
    host that never held the detector: both prepare, ingest and run ApPipe (the first run of a
    night writes the output run's init-outputs; two at once each wrote their own and one failed)."""
    visits = _prepared_and_ingested(central, tmp_path / "dead", 2)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter each, as a pool process
    start, results = spawn.Barrier(2), spawn.Queue()
    settings = worker_settings(central, tmp_path / "taker")
    procs = [spawn.Process(target=_redo, args=(settings, visit, status, start, results)) for visit, status in visits]
    for proc in procs:
        proc.start()
    try:
        outcomes = sorted(results.get(timeout=300) for _ in procs)
    except queue.Empty:
        pytest.fail("a redelivered run did not finish in 300 s")
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert [(o[1], o[2]) for o in outcomes] == [("ok", "ApPipe")] * 2, outcomes
