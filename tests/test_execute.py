"""The executor wrapper: per-process reuse (package inventory, run Butlers), fresh graphs, priority (real middleware)."""

from __future__ import annotations

import sys
import types
import uuid
from pathlib import Path

import pytest

from prompt_tasks.butler.execute import remember_installed_packages
from prompt_tasks.context import Context
from prompt_tasks.settings import Settings
from tests.butlerkit import NIGHT_START, central_fixture, next_visit, put_raws, visit_spec, wait_status, worker_settings


def test_package_versions_are_recomputed_only_when_modules_change() -> None:
    import lsst.utils.packages as packages

    remember_installed_packages()
    remember_installed_packages()  # idempotent: wrapped once
    assert hasattr(packages.packages_distributions, "cache_info")
    first = packages.getPythonPackages()
    assert packages.getPythonPackages() == first and len(packages.getPythonPackages.by_modules) == 1
    fake = types.ModuleType("prompt_tasks_probe_module")
    sys.modules[fake.__name__] = fake
    try:
        packages.getPythonPackages()  # another set of modules: computed again, not served stale
        assert frozenset(sys.modules) in packages.getPythonPackages.by_modules
    finally:
        del sys.modules[fake.__name__]
    assert packages.Packages.fromSystem()["python"] == sys.version


def test_run_butlers_are_kept_least_recently_used(monkeypatch) -> None:
    """A host serving more detectors than the cache holds must still reuse its hot run Butlers."""
    from prompt_tasks.butler import execute

    opened: list[str] = []
    monkeypatch.setattr(execute, "open_run", lambda local, run, inputs: (opened.append(run) or f"butler {run}", None))
    cache = execute.PipelineCache()
    cache.max_runs = 3
    local = object()
    for run in ("a", "b", "c", "a", "d"):  # "a" used again: "b" is the one dropped for "d"
        assert cache.open_run(local, run, ["raw"])[0] == f"butler {run}"
    assert opened == ["a", "b", "c", "d"]
    cache.open_run(local, "a", ["raw"])
    cache.open_run(local, "b", ["raw"])
    assert opened == ["a", "b", "c", "d", "b"]
    other = object()  # another repo (e.g. reopened after deletion) gets its own run Butler
    cache.open_run(other, "a", ["raw"])
    assert opened[-1] == "a" and len(cache._runs) == 3


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    return central_fixture(tmp_path_factory, servers)


def test_each_visit_of_a_night_gets_its_own_graph_with_what_its_prepare_brought(
        central: Settings, tmp_path: Path) -> None:
    """ApPipe on one detector, pointings moving: every visit finds its calibrations and templates
    (a graph builder reused across visits missed those preloaded after it was set up)."""
    from prompt_tasks.butler import stages
    from prompt_tasks.butler.localrepo import repos_of

    ctx = Context(worker_settings(central, tmp_path / "local"))
    exposures: list[int] = []
    try:
        for n, ra in enumerate([105.0, 105.0, 105.05, 104.95]):
            spec = visit_spec(NIGHT_START + 120 * n, ra=ra, snaps=1)
            keys = put_raws(ctx.settings, spec, [1])
            assert stages.prepare(ctx, next_visit(spec), 1).ok
            ingested = stages.ingest(ctx, next_visit(spec), 1, wait_status(spec, 1, keys))
            assert ingested.ok, ingested.reason
            ran = stages.run(ctx, next_visit(spec), 1, ingested.to_dict())
            assert ran.ok and ran.data["pipeline"] == "ApPipe", (n, ran.reason)
            exposures.append(ingested.data["exposures"][0])
            local = repos_of(ctx).local("SimCam", 1)
            images = local.query_datasets("difference_image", collections=ran.data["run"], find_first=False,
                                          explain=False)
            assert len(images) == len(exposures)  # one per visit so far, this one's included
    finally:
        ctx.close()


def test_a_first_attempt_looks_for_no_earlier_outputs_and_a_rerun_finds_them(
        central: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A detector-visit's first run in a repo builds and executes without searching for outputs of
    an earlier attempt; run again there (redelivered after it executed, caught up after a failed
    export) it finds the first's, runs nothing again, keeps one set and exports it. Taken wrongly
    for a first attempt, the rerun would collide with them: the record matters."""
    from prompt_tasks.butler import stages
    from prompt_tasks.butler.localrepo import Repos, repos_of

    ctx = Context(worker_settings(central, tmp_path / "local"))
    try:
        spec = visit_spec(NIGHT_START + 7200, snaps=2, survey="BENCHMARK")  # Trivial
        keys = put_raws(ctx.settings, spec, [1])
        assert stages.prepare(ctx, next_visit(spec), 1).ok
        ingested = stages.ingest(ctx, next_visit(spec), 1, wait_status(spec, 1, keys))
        assert ingested.ok, ingested.reason

        def outputs(run: str) -> set[str]:
            local = repos_of(ctx).local("SimCam", 1)
            return {str(ref.id) for ref in local.query_datasets("raw_summary", collections=run, find_first=False,
                                                                explain=False)}

        from lsst.daf.butler.registry.datasets.byDimensions import ByDimensionsDatasetRecordStorageManagerUUID

        guarded: list[str] = []  # what the registry imported as datasets that may exist already
        guarded_import = ByDimensionsDatasetRecordStorageManagerUUID._import_guarded
        monkeypatch.setattr(ByDimensionsDatasetRecordStorageManagerUUID, "_import_guarded",
                            lambda self, run, refs, *args: guarded.extend(r.datasetType.name for r in refs)
                            or guarded_import(self, run, refs, *args))
        first = stages.run(ctx, next_visit(spec), 1, ingested.to_dict())
        assert first.ok and first.data["pipeline"] == "Trivial", first.reason
        assert first.data["first_attempt"] is True
        # the quanta's outputs, metadata and logs registered as new; only the run's init-outputs
        # (configs, written before the quanta run) as possibly there
        assert guarded and all(name.endswith("_config") for name in guarded), guarded
        made = outputs(first.data["run"])
        assert len(made) == 2  # one per snap
        local = repos_of(ctx).local("SimCam", 1)
        files = [Path(local.getURI(ref).ospath) for ref in local.get_many_datasets([uuid.UUID(i) for i in made])]
        written = [f.stat().st_mtime_ns for f in files]

        again = stages.run(ctx, next_visit(spec), 1, ingested.to_dict())
        assert again.ok and again.data["pipeline"] == "Trivial", again.reason
        assert again.data["first_attempt"] is False and again.data["export_queued"]
        assert outputs(again.data["run"]) == made
        assert again.data["n_outputs"] == first.data["n_outputs"]
        assert [f.stat().st_mtime_ns for f in files] == written  # skipped, not run again
        assert Repos(ctx.settings).begin_run("SimCam", 1, ingested.data["day_obs"], spec.group) is False

        monkeypatch.setattr(Repos, "begin_run", lambda *args: True)  # the record lost
        wrong = stages.run(ctx, next_visit(spec), 1, ingested.to_dict())
        assert not wrong.ok and "ConflictingDefinitionError" in wrong.reason, wrong.reason
        assert outputs(first.data["run"]) == made
    finally:
        ctx.close()


class _TimeUp(Exception):
    """Stands for Celery's soft time limit, raised by a signal handler in the main thread."""


def test_work_at_lower_priority_runs_in_its_own_thread_at_that_nice_value() -> None:
    import contextvars
    import os
    import threading

    from prompt_tasks.butler.execute import at_lower_priority

    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="")
    marker.set("visit 7")
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def work() -> tuple[int, str, str]:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), marker.get(), threading.current_thread().name

    nice, seen, name = at_lower_priority(7, work)
    assert nice == min(mine + 7, 19) and seen == "visit 7" and name == "pipeline"
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # this thread is untouched
    assert at_lower_priority(0, work)[2] == threading.current_thread().name  # 0: run here

    def fails() -> None:
        raise ValueError("quantum failed")

    with pytest.raises(ValueError, match="quantum failed"):
        at_lower_priority(5, fails)


def test_a_signal_that_interrupts_the_wait_interrupts_the_work() -> None:
    import signal
    import threading
    import time

    from prompt_tasks.butler.execute import at_lower_priority

    stopped = threading.Event()

    def endless() -> None:
        try:
            while True:
                time.sleep(0.01)
        finally:
            stopped.set()

    def time_up(signum: int, frame: object) -> None:
        raise _TimeUp("soft time limit")

    previous = signal.signal(signal.SIGALRM, time_up)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(_TimeUp, match="soft time limit"):
            at_lower_priority(5, endless)
        assert stopped.is_set()  # the work was stopped before the exception came out
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
