"""Preload against a real central repo: calibration epochs, templates by footprint, reuse, LRU."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from prompt_tasks.butler.localrepo import repos_of
from prompt_tasks.butler.stages import band_of, footprint_for, prepare
from prompt_tasks.context import Context
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import visit_key
from tests.butlerkit import (
    EPOCH1_START,
    NIGHT_START,
    central_fixture,
    next_visit,
    visit_spec,
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


def _calib_runs(local, detector: int, when: float) -> dict[str, str]:
    from astropy.time import Time
    from lsst.daf.butler import Timespan

    span = Timespan.fromInstant(Time(when, format="unix_tai", scale="tai"))
    out = {}
    for name in ("bias", "dark", "flat"):
        ref = local.find_dataset(name, instrument="SimCam", detector=detector, physical_filter="SimCam-r",
                                 collections="SimCam/calib", timespan=span)
        out[name] = ref.run if ref is not None else ""
    return out


def test_a_filters_band_is_asked_of_the_central_repo_once_per_process(ctx: Context) -> None:
    assert band_of(ctx, "SimCam", "SimCam-r") == "r"
    assert ctx.extras["bands"] == {("SimCam", "SimCam-r"): "r"}
    # unknown (maybe defined later) or no filter: no band, nothing remembered
    assert band_of(ctx, "SimCam", "SimCam-nope") is None and band_of(ctx, "SimCam", None) is None
    assert ctx.extras["bands"] == {("SimCam", "SimCam-r"): "r"}


def test_calibration_valid_at_the_visit_time(ctx: Context) -> None:
    late = next_visit(visit_spec(NIGHT_START))
    early = next_visit(visit_spec(EPOCH1_START))
    assert prepare(ctx, early, 1).ok
    local = repos_of(ctx).local("SimCam", 1)
    assert set(_calib_runs(local, 1, EPOCH1_START).values()) == {"SimCam/calib/epoch1"}
    # only epoch 1 was preloaded: nothing is valid in epoch 2 yet
    assert set(_calib_runs(local, 1, NIGHT_START).values()) == {""}
    status = prepare(ctx, late, 1)
    assert status.ok and status.data["preload"]["transferred"]["calibration"] == 3
    assert set(_calib_runs(local, 1, NIGHT_START).values()) == {"SimCam/calib/epoch2"}
    assert set(_calib_runs(local, 1, EPOCH1_START).values()) == {"SimCam/calib/epoch1"}


def test_templates_are_exactly_those_overlapping_the_footprint(ctx: Context) -> None:
    visit = next_visit(visit_spec(NIGHT_START, ra=105.02, dec=-15.01, camera_angle=30.0))
    status = prepare(ctx, visit, 0)
    assert status.ok, status.reason
    central = repos_of(ctx).central
    local = repos_of(ctx).local("SimCam", 0)
    region = footprint_for(ctx, next_visit_model(visit), 0)
    assert region is not None
    expected = set()
    for record in central.query_dimension_records("patch", explain=False):
        if record.region.overlaps(region):
            expected.add((record.tract, record.id))
    assert expected, "the test pointing should overlap some patch"
    local_templates = local.query_datasets("template_coadd", collections="SimCam/templates", find_first=True,
                                           explain=False)
    assert {(r.dataId["tract"], r.dataId["patch"]) for r in local_templates} == expected
    assert {r.dataId["band"] for r in local_templates} == {"r"}
    assert status.data["preload"]["transferred"]["spatial"] >= len(expected)


def test_second_visit_transfers_nothing_and_ledger_says_so(ctx: Context, rdb) -> None:
    first = next_visit(visit_spec(NIGHT_START))
    second = next_visit(visit_spec(NIGHT_START + 60))
    one = prepare(ctx, first, 2)
    assert one.ok and sum(one.data["preload"]["transferred"].values()) > 0
    assert one.data["warm"] is False
    two = prepare(ctx, second, 2)
    assert two.ok
    assert two.data["warm"] is True
    assert two.data["preload"]["transferred"] == {}
    assert sum(two.data["preload"]["reused"].values()) == sum(one.data["preload"]["transferred"].values())
    assert two.data["preload"]["certified"] == 0
    raw = rdb.hgetall(visit_key("SimCam", second["groupId"]))
    assert raw[ledger.detector_field(2, "prepare.transferred")] == "0"
    assert json.loads(raw[ledger.detector_field(2, "prepare.preload")])["reused"]["calibration"] == 3
    for part in ("query", "transfer", "certify"):
        assert float(raw[ledger.detector_field(2, f"prepare.{part}_s")]) >= 0


def test_a_reopened_repo_is_reused_across_processes(central: Settings, settings: Settings, tmp_path: Path) -> None:
    visit = next_visit(visit_spec(NIGHT_START))
    first = Context(worker_settings(central, tmp_path / "local"))
    try:
        assert prepare(first, visit, 0).ok
    finally:
        first.close()
    again = Context(worker_settings(central, tmp_path / "local"))
    try:
        status = prepare(again, next_visit(visit_spec(NIGHT_START + 60)), 0)
        assert status.ok and status.data["preload"]["transferred"] == {}
        assert status.data["warm"] is False  # a new process, but the repo on disk was reused
    finally:
        again.close()


def test_cache_is_bounded_and_keeps_what_the_visit_needs(central: Settings, settings: Settings,
                                                         tmp_path: Path) -> None:
    ctx = Context(worker_settings(central, tmp_path / "local", local_cache_bytes=1))
    try:
        r_visit = next_visit(visit_spec(NIGHT_START))
        g_visit = next_visit(visit_spec(NIGHT_START + 60, physical_filter="SimCam-g"))
        first = prepare(ctx, r_visit, 0)
        assert first.ok and first.data["preload"]["evicted"] == 0  # all needed now
        second = prepare(ctx, g_visit, 0)
        assert second.ok and second.data["preload"]["evicted"] > 0
        local = repos_of(ctx).local("SimCam", 0)
        bands = {r.dataId["band"] for r in local.query_datasets(
            "template_coadd", collections="SimCam/templates", explain=False)}
        assert bands == {"g"}
        flats = {r.dataId["physical_filter"] for r in local.query_datasets(
            "flat", collections="SimCam/calib", find_first=False, explain=False)}
        assert flats == {"SimCam-g"}
        # the evicted r data comes back when an r visit needs it again
        third = prepare(ctx, next_visit(visit_spec(NIGHT_START + 120)), 0)
        assert third.ok and third.data["preload"]["transferred"].get("calibration", 0) >= 1
    finally:
        ctx.close()


def next_visit_model(raw: dict):
    from prompt_tasks.model.visit import NextVisit

    return NextVisit.model_validate(raw)


def test_the_collection_structure_is_written_locally_only_when_the_central_one_changed(tmp_path: Path) -> None:
    from lsst.daf.butler import Butler, CollectionType

    from prompt_tasks.butler.preload import mirror_collections

    def repo(name: str) -> Butler:
        Butler.makeRepo(str(tmp_path / name))
        return Butler.from_config(str(tmp_path / name), writeable=True)

    central, local = repo("central"), repo("local")
    for name in ("a/calib", "a/templates", "a/calib2"):
        central.registry.registerCollection(name, CollectionType.RUN)
    central.registry.registerCollection("a/defaults", CollectionType.CHAINED)
    central.collections.redefine_chain("a/defaults", ["a/calib", "a/templates"])
    known: dict = {}
    mirror_collections(central, local, ["a/defaults"], known)
    assert list(local.collections.get_info("a/defaults").children) == ["a/calib", "a/templates"]

    # unchanged central structure: nothing is written (a local change is left as it is)
    local.collections.redefine_chain("a/defaults", ["a/templates"])
    mirror_collections(central, local, ["a/defaults"], known)
    assert list(local.collections.get_info("a/defaults").children) == ["a/templates"]

    # a changed central chain is mirrored, and so is the structure for a process knowing nothing
    central.collections.redefine_chain("a/defaults", ["a/calib2", "a/calib", "a/templates"])
    mirror_collections(central, local, ["a/defaults"], known)
    assert list(local.collections.get_info("a/defaults").children) == ["a/calib2", "a/calib", "a/templates"]
    local.collections.redefine_chain("a/defaults", ["a/templates"])
    mirror_collections(central, local, ["a/defaults"], {})
    assert list(local.collections.get_info("a/defaults").children) == ["a/calib2", "a/calib", "a/templates"]

    # a process knowing nothing of a repo that has the structure already (a copy of a template
    # made with it) writes nothing
    writes: list[str] = []
    register = local.registry.registerCollection
    local.registry.registerCollection = lambda name, *a, **k: writes.append(name) or register(name, *a, **k)
    fresh: dict = {}
    mirror_collections(central, local, ["a/defaults"], fresh)
    assert writes == [] and fresh["mirrored"]
