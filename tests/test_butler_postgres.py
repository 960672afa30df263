"""The Butler worker against a central registry on PostgreSQL (marker ``postgres``).

The server is named by ``PROMPT_TASKS_TEST_POSTGRES_URL`` (e.g.
``postgresql://postgres@127.0.0.1:5432/test``); each run uses fresh schemas and drops them.
Skipped on a developer's machine without the variable, a failure under CI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from prompt_tasks.butler.export import ExportMessage, enqueue
from prompt_tasks.butler.localrepo import repos_of
from prompt_tasks.butler.stages import export_pending, ingest, prepare, run
from prompt_tasks.context import Context
from prompt_tasks.settings import Settings
from prompt_tasks.store.keys import EXPORT_REQUESTS
from tests.butlerkit import (
    EPOCH1_START,
    NIGHT_START,
    next_visit,
    put_raws,
    visit_spec,
    wait_status,
    world,
)
from tests.servers import postgres_schema

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_central(servers: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A central repo whose registry is in a fresh PostgreSQL schema (APDB on SQLite)."""
    from prompt_tasks.instruments.simcam.central import init_central

    with postgres_schema("butler") as (url, schema):
        settings = servers.model_copy(update={"state_dir": tmp_path_factory.mktemp("pg-central")})
        init_central(settings, config=world(), registry_db=url, registry_namespace=schema)
        yield settings


@pytest.fixture
def ctx(pg_central: Settings, settings: Settings, tmp_path: Path) -> Iterator[Context]:
    selection = tmp_path / "selection.yaml"
    from prompt_tasks.instruments import load_plugin

    selection.write_text(json.dumps({"instruments": {"SimCam": {
        "pipelines_dir": str(load_plugin("SimCam").pipelines_dir),
        "rules": [{"survey": "trivial", "pipelines": ["Trivial"]}, {"pipelines": ["ApPipe", "SingleFrame"]}]}}}))
    context = Context(pg_central.model_copy(update={"local_repo_root": tmp_path / "local",
                                                    "pipelines_config": selection}))
    yield context
    context.close()


def test_preload_from_postgresql(ctx: Context) -> None:
    assert "postgresql" in str(repos_of(ctx).central._config["registry", "db"])
    early = prepare(ctx, next_visit(visit_spec(EPOCH1_START)), 1)
    assert early.ok and early.data["preload"]["transferred"]["calibration"] == 3
    late = prepare(ctx, next_visit(visit_spec(NIGHT_START)), 1)
    assert late.ok and late.data["preload"]["transferred"]["calibration"] == 3
    again = prepare(ctx, next_visit(visit_spec(NIGHT_START + 60)), 1)
    assert again.ok and again.data["preload"]["transferred"] == {}
    local = repos_of(ctx).local("SimCam", 1)
    runs = {r.run for r in local.query_datasets("bias", collections="SimCam/calib", find_first=False,
                                                explain=False)}
    assert runs == {"SimCam/calib/epoch1", "SimCam/calib/epoch2"}


def test_export_to_postgresql_is_batched_and_idempotent(ctx: Context) -> None:
    spec = visit_spec(NIGHT_START + 7200, snaps=1, survey="trivial")
    keys = put_raws(ctx.settings, spec, [0, 1])
    for det in (0, 1):
        assert prepare(ctx, next_visit(spec), det).ok
        status = ingest(ctx, next_visit(spec), det, wait_status(spec, det, keys))
        assert run(ctx, next_visit(spec), det, status.to_dict()).ok
    requests = [ExportMessage.from_json(x) for x in ctx.redis.lrange(EXPORT_REQUESTS, 0, -1)]
    result = export_pending(ctx, lambda delay: None, force=True)
    assert result["batches"] == 1 and result["requests"] == 2
    central = repos_of(ctx).central
    central.registry.refresh()

    def state() -> tuple[int, int]:
        raws = central.query_datasets("raw", collections="SimCam/raw/all", find_first=False, explain=False,
                                      data_id={"instrument": "SimCam"}, where="group = g",
                                      bind={"g": spec.group})
        outputs = central.query_datasets("raw_summary", collections=requests[0].run, find_first=False,
                                         explain=False)
        return len(raws), len(outputs)

    assert state() == (2, 2)
    for request in requests:
        enqueue(ctx.redis, request)
    assert export_pending(ctx, lambda delay: None, force=True)["requests"] == 2
    central.registry.refresh()
    assert state() == (2, 2)
