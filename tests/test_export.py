"""Export to a real central repo: compute side writes the files, one writer registers them in batches.

The central repo's datastore is on the session's S3 server (the default). The writer is run
after the compute side's local repos are deleted: it opens no local repo and reads no compute
host's disk. Few transactions, idempotent, unusable messages parked with their reason.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prompt_tasks.butler.export import (
    ExportMessage,
    ExportWriteError,
    Queued,
    enqueue,
    is_exported,
    pending,
    stage_outputs,
)
from prompt_tasks.butler.localrepo import repos_of
from prompt_tasks.butler.stages import central_datastore, ingest, prepare, run
from prompt_tasks.butler.writer import decide_flush, drain, needs_drain
from prompt_tasks.context import Context
from prompt_tasks.settings import Settings
from prompt_tasks.store.keys import EXPORT_FAILED, EXPORT_LOCK, EXPORT_REQUESTS, EXPORT_SCHEDULED
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


def test_a_queued_message_sends_a_drain_only_when_none_has_it_covered() -> None:
    assert needs_drain(Queued(1, flush_scheduled=False, writing=False), 50)  # nothing will look at the list
    assert not needs_drain(Queued(7, flush_scheduled=True, writing=False), 50)  # the delayed drain will
    assert needs_drain(Queued(50, flush_scheduled=True, writing=False), 50)  # a full batch: write it now
    assert needs_drain(Queued(100, flush_scheduled=True, writing=False), 50)
    assert not needs_drain(Queued(51, flush_scheduled=True, writing=False), 50)
    # the writer holding the lock looks at the list again before it lets go
    assert not needs_drain(Queued(1, flush_scheduled=False, writing=True), 50)
    assert not needs_drain(Queued(50, flush_scheduled=False, writing=True), 50)


def test_a_queued_message_learns_the_writer_state_in_the_same_round_trip(settings: Settings) -> None:
    context = Context(settings)
    client = context.redis
    message = ExportMessage("SimCam", "2026-12-07T00:00:00", 1, "SimCam/prompt/run")
    client.delete(EXPORT_REQUESTS, EXPORT_SCHEDULED, EXPORT_LOCK)
    try:
        assert enqueue(client, message) == Queued(1, flush_scheduled=False, writing=False)
        client.set(EXPORT_SCHEDULED, "1", px=60_000)
        assert enqueue(client, message) == Queued(2, flush_scheduled=True, writing=False)
        lock = client.lock(EXPORT_LOCK, timeout=60, blocking=False)  # the writer's own lock
        assert lock.acquire(blocking=False)
        assert enqueue(client, message) == Queued(3, flush_scheduled=True, writing=True)
        lock.release()
        assert [ExportMessage.from_json(item) for item in client.lrange(EXPORT_REQUESTS, 0, -1)] == [message] * 3
    finally:
        client.delete(EXPORT_REQUESTS, EXPORT_SCHEDULED, EXPORT_LOCK)
        context.close()


def _messages(ctx: Context) -> list[ExportMessage]:
    return [ExportMessage.from_json(item) for item in ctx.redis.lrange(EXPORT_REQUESTS, 0, -1)]


def _forget_local_repos(ctx: Context) -> None:
    """Close and delete every local repo: the writer must not need them."""
    repos = repos_of(ctx)
    for instrument, detector, _path in repos.existing():
        repos.purge(instrument, detector)
        shutil.rmtree(repos.template_of(instrument), ignore_errors=True)  # the repo they were copied from
    assert not any(Path(ctx.settings.local_repo_path).rglob("butler.yaml"))


def test_many_detector_visits_few_transactions_and_rerun_changes_nothing(ctx: Context) -> None:
    groups = [_process(ctx, NIGHT_START + 3000 + 60 * i) for i in range(2)]
    assert pending(ctx.redis) == len(groups) * len(DETECTORS)
    messages = _messages(ctx)
    central = repos_of(ctx).central
    root = central_datastore(central)
    assert str(root).startswith("s3://")  # the default central datastore is on the S3 server
    assert all(str(root) == m.datastore_root and m.files for m in messages)
    assert all(root.join(f.path).exists() for m in messages for f in m.files)  # written by the compute side
    # a raw is not copied: its file is the raw bucket's object it was ingested from
    raw_files = [f for m in messages for f in m.files if f.ref["datasetType"]["name"] == "raw"]
    assert len(raw_files) == 6 and all(f.path.startswith(f"s3://{ctx.settings.raw_bucket}/") for f in raw_files)
    run_name = messages[0].run
    before = _central_state(central, run_name)
    _forget_local_repos(ctx)
    scheduled: list[float] = []
    # young partial batch: waits, and schedules one delayed flush
    waited = drain(ctx, central, scheduled.append)
    assert waited.batches == 0 and waited.flush_in is not None and len(scheduled) == 1
    assert drain(ctx, central, scheduled.append).batches == 0 and len(scheduled) == 1
    ctx.redis.delete(EXPORT_SCHEDULED)

    with central_commits(ctx.settings) as commits:
        result = drain(ctx, central, scheduled.append, force=True)
    assert result.batches == 1 and result.requests == 6 and pending(ctx.redis) == 0
    assert 1 <= len(commits) <= 3, commits  # one batch: a handful of transactions, not one per detector-visit
    central.registry.refresh()
    after = _central_state(central, run_name)
    assert after[0] - before[0] == 6  # one raw per detector-visit
    assert after[1] - before[1] == 6  # one raw_summary per detector-visit
    assert after[2] - before[2] == 2 * 1  # one exposure per visit, shared by the detectors
    assert all(is_exported(ctx.redis, "SimCam", g, d) for g in groups for d in DETECTORS)
    regions = {(r.visit, r.detector) for r in central.query_dimension_records(
        "visit_detector_region", instrument="SimCam", explain=False)}
    sent = {(r["record"]["visit"], r["record"]["detector"]) for m in messages for r in m.records["visit_detector_region"]}
    assert len(sent) == 6 and sent <= regions
    ref = central.query_datasets("raw_summary", collections=run_name, explain=False)[0]
    assert central.get(ref) is not None and str(central.getURI(ref)).startswith(str(root))
    raw = central.get_dataset(uuid.UUID(raw_files[0].ref["id"]))
    assert raw is not None and str(central.getURI(raw)) == raw_files[0].path and central.get(raw) is not None

    # a message applied twice registers once
    for message in messages:
        enqueue(ctx.redis, message)
    again = drain(ctx, central, scheduled.append, force=True)
    assert again.batches == 1 and again.requests == 6
    central.registry.refresh()
    assert _central_state(central, run_name) == after

    # and so does one without the files' datastore records (registered by Butler.ingest instead)
    assert all(f.stored for m in messages for f in m.files)
    for message in messages:
        for staged in message.files:
            staged.stored = None
        enqueue(ctx.redis, message)
    bare = drain(ctx, central, scheduled.append, force=True)
    assert bare.batches == 1 and bare.requests == 6 and bare.dropped == 0
    central.registry.refresh()
    assert _central_state(central, run_name) == after
    # a new detector-visit sent that way is registered too
    _process(ctx, NIGHT_START + 3000 + 60 * 2)
    fresh = _messages(ctx)
    ctx.redis.delete(EXPORT_REQUESTS)
    for message in fresh:
        for staged in message.files:
            staged.stored = None
        enqueue(ctx.redis, message)
    assert drain(ctx, central, scheduled.append, force=True).requests == len(DETECTORS)
    central.registry.refresh()
    assert _central_state(central, run_name)[1] == after[1] + len(DETECTORS)


def test_batches_are_bounded_by_count(ctx: Context) -> None:
    _process(ctx, NIGHT_START + 4000)
    small = Context(ctx.settings.model_copy(update={"export_batch": 2}))
    try:
        result = drain(small, repos_of(ctx).central, lambda delay: None)
        # 3 messages, batch 2: one full batch at once; the last one waits for its age
        assert result.batches == 1 and result.requests == 2 and pending(ctx.redis) == 1
        final = drain(small, repos_of(ctx).central, lambda delay: None, force=True)
        assert final.batches == 1 and pending(ctx.redis) == 0
    finally:
        small.close()


def test_unusable_messages_are_parked_with_their_reason_and_the_rest_registered(ctx: Context) -> None:
    _process(ctx, NIGHT_START + 5000)
    central = repos_of(ctx).central
    messages = _messages(ctx)
    lost = messages[0]
    central_datastore(central).join(lost.files[0].path).remove()  # its file never made it
    ctx.redis.rpush(EXPORT_REQUESTS, "{not json", json.dumps({"hello": "world"}), json.dumps([1, 2]))
    result = drain(ctx, central, lambda delay: None, force=True)
    assert result.requests == 2 and result.dropped == 4 and pending(ctx.redis) == 0
    parked = [json.loads(x) for x in ctx.redis.lrange(EXPORT_FAILED, 0, -1)]
    reasons = [p["reason"] for p in parked]
    assert sum(r.startswith("unreadable") for r in reasons) == 3
    assert any("missing" in r and lost.files[0].path in r for r in reasons)
    assert not is_exported(ctx.redis, "SimCam", lost.group, lost.detector)
    assert all(is_exported(ctx.redis, "SimCam", m.group, m.detector) for m in messages[1:])


@pytest.mark.parametrize("through", ["lsst-resources", "the S3 client"])
def test_an_object_store_write_that_keeps_failing_fails_with_its_reason(ctx: Context, through: str) -> None:
    from lsst.resources import ResourcePath

    _process(ctx, NIGHT_START + 5500 + (through == "the S3 client") * 300)
    message = _messages(ctx)[0]
    local = repos_of(ctx).local("SimCam", message.detector)
    outputs = [f.ref["id"] for f in message.files]
    with pytest.raises(ExportWriteError, match=r"no-such-bucket.*failed 4 times"):
        stage_outputs(local, ResourcePath("s3://no-such-bucket/central/", forceDirectory=True),
                      instrument="SimCam", group=message.group, detector=message.detector, visit=1,
                      run=message.run, outputs=outputs, raws={}, dataset_types=None,
                      client=ctx.s3 if through == "the S3 client" else None)


def test_refs_the_graph_predicted_are_taken_as_they_are_and_an_unwritten_one_left_out(ctx: Context) -> None:
    from lsst.daf.butler import DatasetRef
    from lsst.resources import ResourcePath

    _process(ctx, NIGHT_START + 6200)
    message = _messages(ctx)[0]
    local = repos_of(ctx).local("SimCam", message.detector)
    outputs = [f.ref["id"] for f in message.files]
    refs = {str(ref.id): ref for ref in local.get_many_datasets([uuid.UUID(i) for i in outputs])}
    some = next(iter(refs.values()))
    never = DatasetRef(some.datasetType, some.dataId, run="SimCam/never-written")  # a quantum with no work
    known = {**refs, str(never.id): never}
    root = central_datastore(repos_of(ctx).central)
    visit = message.records["visit"][0]["record"]["id"]
    args = {"instrument": "SimCam", "group": message.group, "detector": message.detector, "visit": visit,
            "run": message.run, "raws": {}, "dataset_types": None, "client": ctx.s3}
    again = stage_outputs(local, root, outputs=[*outputs, str(never.id)], graph_refs=known, **args)
    assert sorted(f.ref["id"] for f in again.files) == sorted(outputs)
    assert {k: len(v) for k, v in again.records.items()} == {k: len(v) for k, v in message.records.items()}

    # registered in the local repo but its file record gone: an error, not a silent omission
    local._datastore.forget([some])
    with pytest.raises(ExportWriteError, match="has no file"):
        stage_outputs(local, ResourcePath(str(root)), outputs=outputs, graph_refs=known, **args)


def test_a_run_is_initialized_once_per_process_and_again_for_a_new_repo(
        ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output dataset types, init-outputs and configs of a night's run are written (or
    checked) by the first visit a process runs into it, not by every visit."""
    from lsst.pipe.base.separable_pipeline_executor import SeparablePipelineExecutor

    calls: list[str] = []
    pre_execute = SeparablePipelineExecutor.pre_execute_qgraph

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(str(self._butler.run))
        pre_execute(self, *args, **kwargs)

    monkeypatch.setattr(SeparablePipelineExecutor, "pre_execute_qgraph", counted)
    _process(ctx, NIGHT_START + 6600)
    _process(ctx, NIGHT_START + 6640)
    assert len(calls) == len(DETECTORS)  # the second visit of each detector initialized nothing
    repos_of(ctx).purge("SimCam", DETECTORS[0])
    _process(ctx, NIGHT_START + 6680)
    assert len(calls) == len(DETECTORS) + 1  # the recreated repo's run, once


def test_a_failed_batch_is_retried_without_rerunning_the_pipeline(ctx: Context) -> None:
    import sqlalchemy

    from prompt_tasks.butler.stages import export_pending
    from prompt_tasks.errors import RetryLater

    _process(ctx, NIGHT_START + 3 * 86400)
    messages = _messages(ctx)
    central = repos_of(ctx).central
    engine = sqlalchemy.create_engine(f"sqlite:///{Path(ctx.settings.central_repo_uri) / 'gen3.sqlite3'}")
    with engine.begin() as conn:  # every new dataset fails as a broken database would (OperationalError)
        conn.execute(sqlalchemy.text(
            "CREATE TRIGGER refuse_datasets BEFORE INSERT ON dataset BEGIN SELECT * FROM gone_table; END"))
    try:
        with pytest.raises(RetryLater, match="export failed, will retry"):
            export_pending(ctx, lambda delay: None, force=True)
        assert pending(ctx.redis) == 3  # nothing lost, nothing half-written
        central.registry.refresh()
        assert _count(central, "raw_summary", messages[0].run) == 0
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("DROP TRIGGER refuse_datasets"))
        engine.dispose()
    _forget_local_repos(ctx)  # the retry needs no pipeline, nor any local repo
    result = export_pending(ctx, lambda delay: None, force=True)
    assert result["requests"] == 3 and pending(ctx.redis) == 0
    central.registry.refresh()
    assert _count(central, "raw_summary", messages[0].run) == 3


def test_a_message_the_registry_refuses_is_parked_and_its_batch_still_registered(ctx: Context) -> None:
    import uuid

    _process(ctx, NIGHT_START + 6000)
    central = repos_of(ctx).central
    first, *others = _messages(ctx)
    ctx.redis.delete(EXPORT_REQUESTS)
    enqueue(ctx.redis, first)
    assert drain(ctx, central, lambda delay: None, force=True).requests == 1
    # the same data ids under other dataset ids: a conflict no retry can resolve
    clash = ExportMessage.from_json(first.to_json())
    for staged in clash.files:
        staged.ref["id"] = str(uuid.uuid4())
    for message in (clash, *others):
        enqueue(ctx.redis, message)
    result = drain(ctx, central, lambda delay: None, force=True)
    assert result.requests == len(others) and result.dropped == 1 and pending(ctx.redis) == 0
    (parked,) = [json.loads(x) for x in ctx.redis.lrange(EXPORT_FAILED, 0, -1)]
    assert parked["reason"].startswith("refused by the registry") and clash.files[0].ref["id"] in parked["message"]
    assert all(is_exported(ctx.redis, "SimCam", m.group, m.detector) for m in others)


def test_an_existence_check_the_server_cannot_answer_is_a_retry_not_a_missing_file(settings: Settings) -> None:
    """The writer parks a message whose files are missing; an S3 server that does not answer
    must not pass for "missing" (the batch is retried later instead)."""
    from prompt_tasks.flow.retry import is_transient
    from prompt_tasks.objstore import exists_many, make_client

    dead = make_client(settings.model_copy(update={"s3_endpoint": "http://127.0.0.1:9"}))
    with pytest.raises(ConnectionError, match="could not be checked") as caught:
        exists_many(dead, ["s3://central/SimCam/prompt/x.fits"])
    assert is_transient(caught.value)


def test_existence_of_many_files_is_one_listing_per_folder_and_exact_at_its_edges(settings: Settings) -> None:
    """The writer's check of a batch's files: a folder holding several of them is listed once,
    from its first file to its last; a file alone in its folder gets a HEAD. Files missing
    inside the listed range, next to it and alone are all reported missing."""
    from minio import Minio

    from prompt_tasks.objstore import ensure_plain_bucket, exists_many, make_client, put_bytes

    class Counting(Minio):
        requests = 0

        def _url_open(self, *args: Any, **kwargs: Any) -> Any:
            Counting.requests += 1
            return super()._url_open(*args, **kwargs)

    client = make_client(settings)
    client.__class__ = Counting
    ensure_plain_bucket(client, "listing")
    folder = f"run/out/{uuid.uuid4().hex}"
    for name in ("a0", "a1", "a2", "a4", "a5", "b0", "sub/a3"):  # a3 only in a subfolder
        put_bytes(client, f"s3://listing/{folder}/{name}", b"x")
    put_bytes(client, f"s3://listing/{folder}-alone/a", b"x")
    wanted = {name: f"s3://listing/{folder}/{name}" for name in ("a1", "a2", "a3", "a4", "a6")}
    wanted |= {"alone": f"s3://listing/{folder}-alone/a", "alone-missing": f"s3://listing/{folder}-other/a"}
    Counting.requests = 0
    found = exists_many(client, list(wanted.values()))
    assert {name: found[uri] for name, uri in wanted.items()} == {
        "a1": True, "a2": True, "a3": False, "a4": True, "a6": False, "alone": True, "alone-missing": False}
    assert Counting.requests == 3  # one listing, two HEADs

    dead = make_client(settings.model_copy(update={"s3_endpoint": "http://127.0.0.1:9"}))
    with pytest.raises(ConnectionError, match="could not be checked"):
        exists_many(dead, list(wanted.values())[:5])


def test_the_visit_records_ingest_hands_on_are_those_the_registry_holds(ctx: Context) -> None:
    """Export takes the visit's records from ingest's status instead of querying the local
    registry again: the message must carry exactly what the query would have given."""
    from prompt_tasks.butler.export import VISIT_ELEMENTS

    spec = visit_spec(NIGHT_START + 6900, snaps=2)
    keys = put_raws(ctx.settings, spec, [1])
    assert prepare(ctx, next_visit(spec), 1).ok
    ingested = ingest(ctx, next_visit(spec), 1, wait_status(spec, 1, keys))
    assert ingested.ok and {r["definition"] for r in ingested.data["visit_records"]} == set(VISIT_ELEMENTS)
    ran = run(ctx, next_visit(spec), 1, ingested.to_dict())
    assert ran.ok, ran.reason
    (message,) = [m for m in _messages(ctx) if m.group == spec.group]
    local = repos_of(ctx).local("SimCam", 1)
    queried = stage_outputs(local, central_datastore(repos_of(ctx).central), instrument="SimCam",
                            group=spec.group, detector=1, visit=ingested.data["visit"], run=message.run,
                            outputs=[f.ref["id"] for f in message.files], raws={}, dataset_types=None,
                            client=ctx.s3)

    def canonical(records: list[dict[str, Any]]) -> list[str]:
        return sorted(json.dumps(r, sort_keys=True) for r in records)

    for element in VISIT_ELEMENTS:
        assert canonical(message.records[element]) == canonical(queried.records[element]), element
