"""Local repos: one per (instrument, detector), same universe as the central, reused, purged."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prompt_tasks.butler.localrepo import EXTRAS_KEY, Repos, repos_of
from prompt_tasks.context import Context
from prompt_tasks.settings import Settings
from tests.butlerkit import central_fixture, worker_settings


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    return central_fixture(tmp_path_factory, servers)


def test_one_repo_per_detector_with_the_central_universe(central: Settings, tmp_path: Path) -> None:
    repos = Repos(worker_settings(central, tmp_path / "local"))
    try:
        local = repos.local("SimCam", 7)
        assert repos.path_of("SimCam", 7) == tmp_path / "local" / "SimCam" / "007"
        assert (repos.path_of("SimCam", 7) / "butler.yaml").exists()
        assert local.dimensions.dimensionConfig == repos.central.dimensions.dimensionConfig
        assert local.dimensions.version == repos.central.dimensions.version
        # the instrument is registered and the seed config's storage class is known
        assert [r.name for r in local.query_dimension_records("instrument", explain=False)] == ["SimCam"]
        assert local.storageClasses.getStorageClass("CCDImage").pytype.__name__ == "CCDData"
        assert repos.local("SimCam", 7) is local  # kept open
        assert repos.is_open("SimCam", 7) and not repos.is_open("SimCam", 8)
        assert [(i, d) for i, d, _ in repos.existing()] == [("SimCam", 7)]
    finally:
        repos.close()


def test_each_detector_repo_is_a_copy_of_one_template_and_its_own(central: Settings, tmp_path: Path) -> None:
    repos = Repos(worker_settings(central, tmp_path / "local"))
    try:
        first, second = repos.local("SimCam", 1), repos.local("SimCam", 2)
        template = repos.template_of("SimCam")
        assert template == tmp_path / "local" / "SimCam" / "template" and (template / "butler.yaml").exists()
        first.registry.registerRun("only/in/one")
        assert list(second.collections.query("only/*")) == []  # a copy, not a shared database
        for local in (first, second):
            assert [r.id for r in local.query_dimension_records("detector", explain=False)] == [
                r.id for r in repos.central.query_dimension_records("detector", explain=False)]
        assert [(i, d) for i, d, _ in repos.existing()] == [("SimCam", 1), ("SimCam", 2)]  # the template is none
        # opened from one merged configuration, each is rooted in its own directory
        for det, local in ((1, first), (2, second)):
            path = repos.path_of("SimCam", det)
            assert local._datastore.root.ospath.rstrip("/") == str(path)
            assert str(path / "gen3.sqlite3") in str(local._registry._db._engine.url)
        # the template carries what every copy's first visit would otherwise write
        umbrella = "SimCam/defaults"
        assert umbrella in set(first.collections.query("*"))
        assert first.collections.get_info(umbrella).children == repos.central.collections.get_info(umbrella).children
        assert first.get_dataset_type("raw").dimensions == repos.central.get_dataset_type("raw").dimensions
    finally:
        repos.close()


def test_reopened_by_another_process_and_purged(central: Settings, tmp_path: Path) -> None:
    settings = worker_settings(central, tmp_path / "local")
    first = Repos(settings)
    try:
        first.local("SimCam", 2).registry.registerRun("marker/run")
    finally:
        first.close()
    second = Repos(settings)
    try:
        assert "marker/run" in list(second.local("SimCam", 2).collections.query("marker/*"))
        assert second.purge("SimCam", 2)
        assert not second.path_of("SimCam", 2).exists()
        assert not second.purge("SimCam", 2)
        # recreated, empty, at the next use
        assert list(second.local("SimCam", 2).collections.query("marker/*")) == []
    finally:
        second.close()


def test_a_half_created_repo_is_recreated(central: Settings, tmp_path: Path) -> None:
    settings = worker_settings(central, tmp_path / "local")
    broken = Repos(settings).path_of("SimCam", 1)
    broken.mkdir(parents=True)
    (broken / "leftover").write_text("a creation that died half way")
    repos = Repos(settings)
    try:
        repos.local("SimCam", 1)
        assert not (broken / "leftover").exists()
    finally:
        repos.close()


def test_concurrent_first_use_creates_once(central: Settings, tmp_path: Path) -> None:
    settings = worker_settings(central, tmp_path / "local")
    many = [Repos(settings) for _ in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            paths = list(pool.map(lambda r: str(r.local("SimCam", 0)._config.configDir), many))
        assert len(set(paths)) == 1
    finally:
        for repos in many:
            repos.close()


def test_kept_in_the_process_context(central: Settings, tmp_path: Path) -> None:
    ctx = Context(worker_settings(central, tmp_path / "local"))
    repos = repos_of(ctx)
    assert repos_of(ctx) is repos and ctx.extras[EXTRAS_KEY] is repos
    repos.local("SimCam", 0)
    ctx.close()  # closes the repos with the context
    assert not repos.is_open("SimCam", 0)


def test_a_pool_process_is_warmed_before_its_first_visit(central: Settings, tmp_path: Path) -> None:
    from prompt_tasks.butler.stages import candidates_for, warm_process
    from prompt_tasks.model.visit import NextVisit

    ctx = Context(worker_settings(central, tmp_path / "local"))
    try:
        # SimCam's own selection: every pipeline it may choose, loaded and resolved
        assert set(warm_process(ctx)) >= {"ApPipe", "SingleFrame", "Trivial"}
        cache = ctx.extras["pipelines"]
        loaded = dict(cache._loaded)
        assert all(p.graph is not None for p in loaded.values())
        visit = NextVisit.model_validate({"instrument": "SimCam", "groupId": "2026-11-24T01:00:00.000",
                                          "startTime": 1.8e9, "nimages": 1, "survey": "SIMSURVEY"})
        _, candidates = candidates_for(ctx, visit)
        assert candidates and all(c is loaded[c.uri] for c in candidates)  # the visit loads nothing again
    finally:
        ctx.close()


def test_a_repo_remembers_the_visits_it_was_prepared_for(settings: Settings, tmp_path: Path) -> None:
    """Read by any process of the host, forgotten with the repo, the oldest dropped first."""
    # the session's servers, not the defaults: a Repos points this process's S3 client there
    settings = worker_settings(settings, tmp_path / "local")
    repos = Repos(settings)  # the record needs no Butler: only the repo's directory
    repos.path_of("SimCam", 4).mkdir(parents=True)
    assert not repos.was_prepared("SimCam", 4, "g0")
    for n in range(70):
        repos.mark_prepared("SimCam", 4, f"g{n}")
    repos.mark_prepared("SimCam", 4, "g10")  # prepared again: moved to the newest, not listed twice
    other = Repos(settings)  # another process of the host
    assert other.was_prepared("SimCam", 4, "g69") and other.was_prepared("SimCam", 4, "g10")
    assert not other.was_prepared("SimCam", 4, "g5") and other.was_prepared("SimCam", 4, "g6")
    assert not other.was_prepared("SimCam", 5, "g69")  # another detector's repo


def test_a_repo_records_durably_which_visits_began_their_run(settings: Settings, tmp_path: Path) -> None:
    """Per night, seen by any process of the host; the first call for a visit is its first attempt."""
    from prompt_tasks.butler import localrepo

    settings = worker_settings(settings, tmp_path / "local")
    repos = Repos(settings)
    repos.path_of("SimCam", 4).mkdir(parents=True)
    assert repos.begin_run("SimCam", 4, 20261123, "g1") is True
    assert repos.begin_run("SimCam", 4, 20261123, "g1") is False  # a rerun
    other = Repos(settings)  # another process of the host (or this one after a restart)
    assert other.begin_run("SimCam", 4, 20261123, "g1") is False
    assert other.begin_run("SimCam", 4, 20261123, "g2") is True
    assert other.begin_run("SimCam", 4, 20261124, "g1") is True  # another night's run
    repos.path_of("SimCam", 5).mkdir(parents=True)
    assert repos.begin_run("SimCam", 5, 20261123, "g1") is True  # another detector's repo
    started = repos.path_of("SimCam", 4) / localrepo._STARTED
    for night in range(20261125, 20261125 + localrepo._STARTED_NIGHTS_KEPT + 2):
        time.sleep(0.01)  # distinct modification times
        assert repos.begin_run("SimCam", 4, night, "g1") is True
    assert len(list(started.iterdir())) == localrepo._STARTED_NIGHTS_KEPT  # the oldest nights dropped
    assert not (started / "20261123").exists()
