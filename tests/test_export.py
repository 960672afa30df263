"""Batched export to a real central repo: few transactions, idempotent, bad requests set aside."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prompt_tasks.butler_stages import ingest, prepare, run
from prompt_tasks.context import Context
from prompt_tasks.export import (
    EXPORT_FAILED,
    EXPORT_LIST,
    EXPORT_SCHEDULED,
    ExportRequest,
    decide_flush,
    drain,
    enqueue,
    is_exported,
    pending,
)
from prompt_tasks.localrepo import repos_of
from prompt_tasks.settings import Settings
from tests.butlerkit import (
    NIGHT_START,
    central_fixture,
    next_visit,
    put_raws,
    visit_spec,
    wait_status,
    worker_settings,
)

DETECTORS = [0, 1, 2]


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    return central_fixture(tmp_path_factory, servers)


@pytest.fixture
def trivial_selection(tmp_path: Path) -> Path:
    from prompt_tasks.instruments import load_plugin

    path = tmp_path / "selection.yaml"
    path.write_text(json.dumps({"instruments": {"SimCam": {
        "pipelines_dir": str(load_plugin("SimCam").pipelines_dir), "rules": [{"pipelines": ["Trivial"]}]}}}))
    return path


@pytest.fixture
def ctx(central: Settings, settings: Settings, tmp_path: Path, trivial_selection: Path) -> Iterator[Context]:
    context = Context(worker_settings(central, tmp_path / "local", pipelines_config=trivial_selection,
                                      export_batch=50, export_max_age_s=3600.0))
    yield context
    context.close()


def _process(ctx: Context, start: float) -> list[str]:
    """Run one visit on every detector through prepare, ingest and run; its group."""
    spec = visit_spec(start, snaps=1)
    keys = put_raws(ctx.settings, spec, DETECTORS)
    for det in DETECTORS:
        assert prepare(ctx, next_visit(spec), det).ok
        status = ingest(ctx, next_visit(spec), det, wait_status(spec, det, keys))
        assert status.ok, status.reason
        ran = run(ctx, next_visit(spec), det, status.to_dict())
        assert ran.ok and ran.data["pipeline"] == "Trivial", ran.reason
    return spec.group


@contextlib.contextmanager
def central_commits(settings: Settings) -> Iterator[list[str]]:
    """Count the transactions committed on the central registry's database."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    commits: list[str] = []
    central_db = str(Path(settings.central_repo_uri))

    def on_commit(conn: Any) -> None:
        if central_db in str(conn.engine.url):
            commits.append(str(conn.engine.url))

    event.listen(Engine, "commit", on_commit)
    try:
        yield commits
    finally:
        event.remove(Engine, "commit", on_commit)


def _count(central: Any, dataset_type: str, collection: str) -> int:
    from lsst.daf.butler import MissingCollectionError, MissingDatasetTypeError

    try:
        return len(central.query_datasets(dataset_type, collections=collection, find_first=False,
                                          explain=False, limit=None))
    except (MissingDatasetTypeError, MissingCollectionError):
        return 0


def _central_state(central: Any, run: str) -> tuple[int, int, int]:
    raws = _count(central, "raw", "SimCam/raw/all")
    outputs = _count(central, "raw_summary", run)
    definitions = list(central.query_dimension_records("visit_definition", instrument="SimCam", explain=False))
    return raws, outputs, len(definitions)


def test_flush_decision() -> None:
    assert decide_flush(0, 100.0, 10, 5.0, False) is None
    assert decide_flush(10, 0.0, 10, 5.0, False) == 0.0
    assert decide_flush(3, 6.0, 10, 5.0, False) == 0.0
    assert decide_flush(3, 1.0, 10, 5.0, True) == 0.0
    assert decide_flush(3, 1.0, 10, 5.0, False) == pytest.approx(4.0)


def test_many_detector_visits_few_transactions_and_rerun_changes_nothing(ctx: Context) -> None:
    groups = [_process(ctx, NIGHT_START + 3000 + 60 * i) for i in range(2)]
    assert pending(ctx.redis) == len(groups) * len(DETECTORS)
    requests = [ExportRequest.from_json(item) for item in ctx.redis.lrange(EXPORT_LIST, 0, -1)]
    central = repos_of(ctx).central
    before = _central_state(central, requests[0].run)
    scheduled: list[float] = []
    # young partial batch: waits, and schedules one delayed flush
    waited = drain(ctx, central, _open_local, scheduled.append)
    assert waited.batches == 0 and waited.flush_in is not None and len(scheduled) == 1
    assert drain(ctx, central, _open_local, scheduled.append).batches == 0 and len(scheduled) == 1
    ctx.redis.delete(EXPORT_SCHEDULED)

    with central_commits(ctx.settings) as commits:
        result = drain(ctx, central, _open_local, scheduled.append, force=True)
    assert result.batches == 1 and result.requests == 6 and pending(ctx.redis) == 0
    assert 1 <= len(commits) <= 3, commits  # one batch: a handful of transactions, not one per detector-visit
    central.registry.refresh()
    after = _central_state(central, requests[0].run)
    assert after[0] - before[0] == 6  # one raw per detector-visit
    assert after[1] - before[1] == 6  # one raw_summary per detector-visit
    assert after[2] - before[2] == 2 * 1  # one exposure per visit, shared by the detectors
    assert all(is_exported(ctx.redis, "SimCam", g, d) for g in groups for d in DETECTORS)
    regions = {(r.visit, r.detector) for r in central.query_dimension_records(
        "visit_detector_region", instrument="SimCam", explain=False)}
    assert {(req.visit, req.detector) for req in requests} <= regions

    # a retried export (the same requests again) adds nothing
    for request in requests:
        enqueue(ctx.redis, request)
    again = drain(ctx, central, _open_local, scheduled.append, force=True)
    assert again.batches == 1 and again.requests == 6
    central.registry.refresh()
    assert _central_state(central, requests[0].run) == after


def test_batches_are_bounded_by_count(ctx: Context) -> None:
    _process(ctx, NIGHT_START + 4000)
    small = Context(ctx.settings.model_copy(update={"export_batch": 2}))
    try:
        result = drain(small, repos_of(ctx).central, _open_local, lambda delay: None)
        # 3 requests, batch 2: one full batch at once; the last one waits for its age
        assert result.batches == 1 and result.requests == 2 and pending(ctx.redis) == 1
        final = drain(small, repos_of(ctx).central, _open_local, lambda delay: None, force=True)
        assert final.batches == 1 and pending(ctx.redis) == 0
    finally:
        small.close()


def test_unusable_request_is_set_aside_and_the_rest_exported(ctx: Context, tmp_path: Path) -> None:
    _process(ctx, NIGHT_START + 5000)
    gone = ExportRequest("SimCam", "2026-11-24T09:00:00.000", 0, 1, str(tmp_path / "no-such-repo"), "x/run",
                         outputs=[], raws=[])
    enqueue(ctx.redis, gone)
    result = drain(ctx, repos_of(ctx).central, _open_local, lambda delay: None, force=True)
    assert result.requests == 3 and result.dropped == 1
    assert [ExportRequest.from_json(x).local_repo for x in ctx.redis.lrange(EXPORT_FAILED, 0, -1)] == [gone.local_repo]


def _open_local(path: str):
    from lsst.daf.butler import Butler

    if not Path(path, "butler.yaml").exists():
        raise FileNotFoundError(path)
    return Butler.from_config(path)


def test_a_failed_export_is_retried_without_rerunning_the_pipeline(ctx: Context) -> None:
    from prompt_tasks.butler_stages import export_pending
    from prompt_tasks.errors import RetryLater

    start = NIGHT_START + 3 * 86400  # a night of its own: its output directory is not there yet
    _process(ctx, start)
    requests = [ExportRequest.from_json(x) for x in ctx.redis.lrange(EXPORT_LIST, 0, -1)]
    day_dir = Path(ctx.settings.central_repo_uri) / requests[0].run.rsplit("/", 2)[0]
    assert not day_dir.exists()
    day_dir.parent.mkdir(parents=True, exist_ok=True)
    day_dir.write_text("a file where the datastore wants a directory: every copy fails")
    try:
        with pytest.raises(RetryLater, match="export failed, will retry"):
            export_pending(ctx, lambda delay: None, force=True)
        assert pending(ctx.redis) == 3  # nothing lost, nothing half-written
        central = repos_of(ctx).central
        central.registry.refresh()
        assert _count(central, "raw_summary", requests[0].run) == 0
    finally:
        day_dir.unlink()
    result = export_pending(ctx, lambda delay: None, force=True)
    assert result["requests"] == 3 and pending(ctx.redis) == 0
    central.registry.refresh()
    assert _count(central, "raw_summary", requests[0].run) == 3
