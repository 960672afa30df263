"""Ingest from the real S3 gateway into real local repos: idempotence and bad raws."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prompt_tasks.butler.ingest import REMEMBERED_RECORDS, VisitExpectation, check_header
from prompt_tasks.butler.localrepo import repos_of
from prompt_tasks.butler.stages import ingest
from prompt_tasks.context import Context
from prompt_tasks.errors import BadRaw
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


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    return central_fixture(tmp_path_factory, servers)


@pytest.fixture
def ctx(central: Settings, settings: Settings, tmp_path: Path) -> Iterator[Context]:
    context = Context(worker_settings(central, tmp_path / "local"))
    yield context
    context.close()


def _raws(ctx: Context, detector: int) -> list:
    local = repos_of(ctx).local("SimCam", detector)
    return local.query_datasets("raw", collections="SimCam/raw/all", find_first=False, explain=False)


def test_two_snaps_ingested_with_visit_records_and_twice_is_a_no_op(ctx: Context) -> None:
    spec = visit_spec(NIGHT_START + 600)
    keys = put_raws(ctx.settings, spec, [1])
    status = ingest(ctx, next_visit(spec), 1, wait_status(spec, 1, keys))
    assert status.ok, status.reason
    assert status.data["exposures"] == [spec.exposure(0), spec.exposure(1)]
    assert status.data["visit"] == spec.visit
    refs = _raws(ctx, 1)
    assert sorted(str(r.id) for r in refs) == sorted(status.data["raws"])
    local = repos_of(ctx).local("SimCam", 1)
    definitions = list(local.query_dimension_records("visit_definition", instrument="SimCam", explain=False))
    assert {(d.exposure, d.visit) for d in definitions} == {(spec.exposure(0), spec.visit),
                                                           (spec.exposure(1), spec.visit)}
    regions = list(local.query_dimension_records("visit_detector_region", instrument="SimCam", explain=False))
    assert [(r.visit, r.detector) for r in regions] == [(spec.visit, 1)]
    image = local.get(refs[0])
    assert image.data.shape == (256, 256)

    again = ingest(ctx, next_visit(spec), 1, wait_status(spec, 1, keys))
    assert again.ok and again.data["raws"] == status.data["raws"]
    assert len(_raws(ctx, 1)) == 2
    # the instrument, the raw dataset type and its run were set up once for this worker's repo,
    # and each dimension record inserted once: the second snap and the rerun inserted nothing new
    # (prepare remembered the collection structure it mirrored there)
    known = repos_of(ctx).known("SimCam", 1)
    assert set(known) == {"instrument:SimCam", f"run:{status.data['raw_run']}:raw", "records", "mirrored"}
    remembered = len(known["records"])
    assert 0 < remembered <= REMEMBERED_RECORDS
    again = ingest(ctx, next_visit(spec), 1, wait_status(spec, 1, keys))
    assert again.ok and len(known["records"]) == remembered


def test_a_registered_raw_whose_file_is_gone_gets_it_back(ctx: Context) -> None:
    spec = visit_spec(NIGHT_START + 660, snaps=1)
    keys = put_raws(ctx.settings, spec, [1])
    assert ingest(ctx, next_visit(spec), 1, wait_status(spec, 1, keys)).ok
    local = repos_of(ctx).local("SimCam", 1)
    (ref,) = [r for r in _raws(ctx, 1) if r.dataId["exposure"] == spec.exposure(0)]
    local._datastore.trash(ref)  # the file and its datastore record, not the dataset
    local._datastore.emptyTrash()
    assert not local.stored(ref) and local.get_dataset(ref.id) is not None
    again = ingest(ctx, next_visit(spec), 1, wait_status(spec, 1, keys))
    assert again.ok and again.data["raws"] == [str(ref.id)]
    assert local.stored(ref) and local.get(ref).data.shape == (256, 256)


def test_truncated_raw_fails_and_leaves_the_repo_usable(ctx: Context) -> None:
    bad_spec = visit_spec(NIGHT_START + 700)
    from prompt_tasks.instruments.simcam.raws import simulate_snap
    from tests.butlerkit import world

    good = simulate_snap(world(), bad_spec, 0, 1)
    keys = put_raws(ctx.settings, bad_spec, [0], replace={(0, 1): good[: len(good) // 2]})
    with pytest.raises(BadRaw, match="truncated"):
        ingest(ctx, next_visit(bad_spec), 0, wait_status(bad_spec, 0, keys))
    # the next visit of the detector ingests fine
    next_spec = visit_spec(NIGHT_START + 760)
    keys = put_raws(ctx.settings, next_spec, [0])
    status = ingest(ctx, next_visit(next_spec), 0, wait_status(next_spec, 0, keys))
    assert status.ok, status.reason
    exposures = {r.dataId["exposure"] for r in _raws(ctx, 0)}
    assert {next_spec.exposure(0), next_spec.exposure(1)} <= exposures
    assert bad_spec.exposure(1) not in exposures
    assert bad_spec.exposure(0) not in exposures  # every raw is checked before any is written


def test_garbage_raw_fails(ctx: Context) -> None:
    spec = visit_spec(NIGHT_START + 800, snaps=1)
    keys = put_raws(ctx.settings, spec, [2], replace={(2, 0): b"this is not a FITS file at all" * 200})
    with pytest.raises(BadRaw, match="not a FITS file"):
        ingest(ctx, next_visit(spec), 2, wait_status(spec, 2, keys))


def test_header_contradicting_the_visit_fails(ctx: Context) -> None:
    spec = visit_spec(NIGHT_START + 900, snaps=1)
    # detector 1's raw put where detector 2's belongs
    from prompt_tasks.instruments.simcam.raws import simulate_snap
    from tests.butlerkit import world

    keys = put_raws(ctx.settings, spec, [2], replace={(2, 0): simulate_snap(world(), spec, 1, 0)})
    with pytest.raises(BadRaw, match="detector 1, expected 2"):
        ingest(ctx, next_visit(spec), 2, wait_status(spec, 2, keys))
    # announced in g, observed in r
    keys = put_raws(ctx.settings, spec, [0])
    with pytest.raises(BadRaw, match="filter 'SimCam-r', expected 'SimCam-g'"):
        ingest(ctx, next_visit(spec, filters="SimCam-g"), 0, wait_status(spec, 0, keys))


def test_check_header_names_every_contradiction() -> None:
    expected = VisitExpectation("SimCam", 3, "2026-11-24T02:00:00.000", "SimCam-r")
    header = {"INSTRUME": "SimCam", "DETECTOR": 4, "GROUPID": "other", "FILTER": "SimCam-r"}
    with pytest.raises(BadRaw) as info:
        check_header(header, expected, "s3://raws/x")
    assert "detector 4, expected 3" in str(info.value) and "group 'other'" in str(info.value)
    check_header({**header, "DETECTOR": 3, "GROUPID": expected.group}, expected, "s3://raws/x")


@pytest.mark.parametrize("client", [False, True], ids=["lsst-resources", "S3 client"])
def test_a_raw_gone_from_the_bucket_is_a_bad_raw_and_an_unreachable_server_a_retry(ctx: Context, client: bool) -> None:
    from prompt_tasks.butler.ingest import fetch_raw, raw_uri
    from prompt_tasks.errors import RetryLater
    from prompt_tasks.objstore import configure_s3, make_client

    configure_s3(ctx.settings)
    with pytest.raises(BadRaw, match="not found"):
        fetch_raw(raw_uri(ctx.settings, "SimCam/1/no-such-group/0.fits"), ctx.s3 if client else None)
    if client:  # nothing listens on port 9: the read is to be retried later, not a bad raw
        dead = make_client(ctx.settings.model_copy(update={"s3_endpoint": "http://127.0.0.1:9"}))
        with pytest.raises(RetryLater, match="unreachable"):
            fetch_raw(raw_uri(ctx.settings, "SimCam/1/g/0.fits"), dead)
