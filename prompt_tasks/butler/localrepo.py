"""Local Butler repositories: one per (instrument, detector) on each worker, reused across visits.

A detector's local repo lives at ``<local_repo_path>/<instrument>/<detector:03d>``. It is
created once, as a copy of the instrument's pristine repo on this host
(``<local_repo_path>/<instrument>/template``, made on first need with the central repo's
dimension configuration, so both speak the same dimension universe, the instrument's seed
config, so both know the same storage classes, and the instrument's dimension records).
After that every visit of the detector on this worker finds it ready, with its preloaded
calibrations and templates.

The Butler objects (central and local) are opened once per process and kept in the process
:class:`~prompt_tasks.context.Context` (``ctx.extras["butler"]``), so the middleware's imports
and the repos' start-up are paid once, not per visit.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_tasks.butler.preload import mirror_collections
from prompt_tasks.instruments import UnknownInstrument, load_plugin
from prompt_tasks.objstore import configure_s3
from prompt_tasks.settings import Settings

if TYPE_CHECKING:
    from lsst.daf.butler import Butler, Config

    from prompt_tasks.context import Context

__all__ = ["EXTRAS_KEY", "Repos", "repos_of", "seed_config_for"]

#: Key of the :class:`Repos` of a process in ``Context.extras``.
EXTRAS_KEY = "butler"
#: A file written once a local repo is fully created (repo made and instrument registered).
_READY = "prompt_tasks_ready"
#: Directory (beside the detectors' repos) of the instrument's pristine repo they are copied from.
_TEMPLATE = "template"
#: A file in a local repo listing the visits (group ids) it was prepared for, the latest last.
_PREPARED = "prompt_tasks_prepared"
#: How many prepared visits a local repo remembers (a few nights of one detector's visits in flight).
_PREPARED_KEPT = 64
#: A directory in a local repo: per night (day_obs), a file listing the visits whose pipeline run
#: began in the repo.
_STARTED = "prompt_tasks_started"
#: How many nights of started runs a local repo remembers (a catch-up reruns a visit of the last
#: nights; an output run is one night's).
_STARTED_NIGHTS_KEPT = 7


def seed_config_for(instrument: str) -> Config:
    """The seed config every repo of ``instrument`` is created with.

    The instrument plugin provides it (``plugin.seed_config()``); an instrument without one
    gets the middleware's defaults.
    """
    from lsst.daf.butler import Config  # heavy: compute workers only

    try:
        seed = load_plugin(instrument).seed_config
    except UnknownInstrument:
        seed = None
    return seed() if seed is not None else Config()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of this host (repo creation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Repos:
    """The central repo and the local repos this process has opened.

    Parameters
    ----------
    settings
        Where the central repo and the local repo root are.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configure_s3(settings)  # the central datastore and the raws are on the S3 server
        self._central: Butler | None = None
        self._local: dict[tuple[str, int], Butler] = {}
        self._known: dict[tuple[str, int], dict[str, Any]] = {}
        self._configs: dict[str, Any] = {}
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- central

    @property
    def central(self) -> Butler:
        """The central repo, writeable, opened on first use."""
        with self._lock:
            if self._central is None:
                from lsst.daf.butler import Butler

                self._central = Butler.from_config(self.settings.central_repo_uri, writeable=True)
            return self._central

    # ---------------------------------------------------------------- local

    def path_of(self, instrument: str, detector: int) -> Path:
        """Directory of the local repo of ``(instrument, detector)``."""
        return self.settings.local_repo_path / instrument / f"{int(detector):03d}"

    def existing(self) -> list[tuple[str, int, Path]]:
        """Local repos present on disk: ``(instrument, detector, path)``."""
        root = self.settings.local_repo_path
        out = []
        if root.is_dir():
            for inst_dir in sorted(p for p in root.iterdir() if p.is_dir()):
                for det_dir in sorted(p for p in inst_dir.iterdir() if p.is_dir()):
                    if det_dir.name.isdigit() and (det_dir / _READY).exists():
                        out.append((inst_dir.name, int(det_dir.name), det_dir))
        return out

    def local(self, instrument: str, detector: int) -> Butler:
        """The local repo of ``(instrument, detector)``, created on first use, kept open."""
        key = (instrument, int(detector))
        with self._lock:
            butler = self._local.get(key)
            if butler is not None and not (self.path_of(*key) / _READY).exists():
                butler.close()  # deleted under us (housekeeping): open it afresh, knowing nothing of it
                butler = None
                self._known.pop(key, None)
            if butler is None:
                butler = self._open_or_create(instrument, int(detector))
                self._local[key] = butler
            return butler

    def is_open(self, instrument: str, detector: int) -> bool:
        """True when this process already holds the repo open (a warm repo)."""
        return (instrument, int(detector)) in self._local

    def _open_or_create(self, instrument: str, detector: int) -> Butler:
        from lsst.daf.butler import Butler

        path = self.path_of(instrument, detector)
        with _file_lock(path.parent / f".{path.name}.lock"):
            if not (path / _READY).exists():
                if path.exists():
                    shutil.rmtree(path)  # a creation that died half way
                self._create(path, instrument)
        return Butler.from_config(self._config_of(path), writeable=True)

    def _config_of(self, path: Path) -> Any:
        """The ``ButlerConfig`` of the local repo at ``path``.

        Reading one merges the repo's ``butler.yaml`` with every default configuration file
        (~20 ms, half of opening a repo). The local repos of a host are copies of one template,
        with the same ``butler.yaml``: its merged configuration is kept per file content, and
        each repo gets a copy of it pointed at its own directory (its ``<butlerRoot>``).
        """
        from lsst.daf.butler import ButlerConfig
        from lsst.resources import ResourcePath

        text = (path / "butler.yaml").read_text()
        merged = self._configs.get(text)
        if merged is None:
            merged = self._configs[text] = ButlerConfig(str(path))
        config = ButlerConfig(merged)
        config.configDir = ResourcePath(str(path), forceDirectory=True)
        config.configFile = config.configDir.join("butler.yaml")
        return config

    def template_of(self, instrument: str) -> Path:
        """The pristine repo every local repo of ``instrument`` on this host is copied from."""
        return self.settings.local_repo_path / instrument / _TEMPLATE

    def _create(self, path: Path, instrument: str) -> None:
        """A new local repo at ``path``: a copy of the instrument's template, made first if needed.

        Making a repo (its registry schema, the instrument and its detectors and filters)
        costs ~0.4 CPU-s; a 189-detector host would pay it per detector. The repo is made once
        per host and instrument, and each detector's repo is a copy of its two files (the
        repo's config names its root as ``<butlerRoot>``, so a copy is a repo of its own).
        """
        template = self.template_of(instrument)
        with _file_lock(template.parent / f".{template.name}.lock"):
            if not (template / _READY).exists():
                if template.exists():
                    shutil.rmtree(template)  # a creation that died half way
                self._make(template, instrument)
        shutil.copytree(template, path, ignore=shutil.ignore_patterns(_READY))
        (path / _READY).write_text(f"{instrument}\n")

    def _make(self, path: Path, instrument: str) -> None:
        """The pristine repo of ``instrument``: its instrument, detectors and filters, the central
        repo's collection structure, and the raw dataset type and run."""
        from lsst.daf.butler import Butler, DatasetType, MissingCollectionError
        from lsst.pipe.base import Instrument

        central = self.central
        Butler.makeRepo(
            str(path),
            config=seed_config_for(instrument),
            dimensionConfig=central.dimensions.dimensionConfig,
        )
        local = Butler.from_config(str(path), writeable=True)
        try:
            spec = Instrument.from_string(instrument, central.registry)
            spec.register(local.registry)
            # what every detector's first visit would otherwise write into its own copy
            with suppress(MissingCollectionError):  # none yet: each visit's prepare mirrors it
                mirror_collections(central, local, [spec.makeUmbrellaCollectionName()])
            name, dimensions, storage_class = spec.raw_definition
            local.registry.registerDatasetType(DatasetType(name, dimensions, storage_class,
                                                           universe=local.dimensions))
            local.registry.registerRun(spec.makeDefaultRawIngestRunName())
        finally:
            local.close()
        (path / _READY).write_text(f"{instrument}\n")

    def known(self, instrument: str, detector: int) -> dict[str, Any]:
        """What this process already registered in the detector's local repo (kept while it is open)."""
        with self._lock:
            return self._known.setdefault((instrument, int(detector)), {})

    @contextmanager
    def preparing(self, instrument: str, detector: int) -> Iterator[None]:
        """Hold the detector's prepare lock: two prepares of one local repo never overlap.

        A compute worker has two slots, so the next visit's prepare may run beside this
        detector's pipeline run (the registry serializes their writes: SQLite with
        ``BEGIN IMMEDIATE`` and a busy timeout), but two prepares would race on the preload
        cache's index and evictions.
        """
        path = self.path_of(instrument, detector)
        with _file_lock(path.parent / f".{path.name}.prepare.lock"):
            yield

    @contextmanager
    def starting_run(self, instrument: str, detector: int) -> Iterator[None]:
        """Hold the detector's run-start lock (a quantum graph's build and its init-outputs).

        The first run of a night writes the output run's init-outputs (configs, schemas); two
        first runs side by side in one repo (a host taking over a detector with two of its
        visits redelivered at once) would each predict and write their own, and the second
        fails. Built one after the other, the second finds the first's and reuses them.
        """
        path = self.path_of(instrument, detector)
        with _file_lock(path.parent / f".{path.name}.run.lock"):
            yield

    def mark_prepared(self, instrument: str, detector: int, group: str) -> None:
        """Record that the detector's local repo was prepared for visit ``group`` (call under
        :meth:`preparing`); the last :data:`_PREPARED_KEPT` visits are remembered."""
        path = self.path_of(instrument, detector) / _PREPARED
        groups = [g for g in self._prepared_groups(path) if g != group][-(_PREPARED_KEPT - 1):]
        groups.append(group)
        scratch = path.with_suffix(".tmp")
        scratch.write_text("".join(f"{g}\n" for g in groups))
        scratch.replace(path)  # atomic: a reader sees the old list or the new one

    def was_prepared(self, instrument: str, detector: int, group: str) -> bool:
        """True when this host prepared the detector's local repo for visit ``group``.

        A stage redelivered to this host after its first host died (its queue moved here)
        finds False: the calibrations, templates and collections of the visit are not here
        yet, and it prepares first.
        """
        return group in self._prepared_groups(self.path_of(instrument, detector) / _PREPARED)

    def begin_run(self, instrument: str, detector: int, day_obs: int | str, group: str) -> bool:
        """Record that the pipeline run of visit ``group`` begins in the detector's local repo;
        True when it is the visit's first attempt there.

        A first attempt cannot meet outputs of an earlier one, so its graph build and its quanta
        need not look for them (``fresh`` in :func:`prompt_tasks.butler.execute.run_candidates`);
        a rerun in the same repo (redelivered after a crash, retried, caught up) finds the
        record and looks. The record is on disk before the run begins (written and synced
        under a lock shared by the host's processes), so a rerun after a host crash finds it
        too; it goes with the repo when the repo is deleted, as the outputs do.
        """
        directory = self.path_of(instrument, detector) / _STARTED
        if not directory.is_dir():
            directory.mkdir()
            _sync_directory(directory.parent)
        path = directory / str(day_obs)
        created = not path.exists()
        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                if group in handle.read().split():
                    return False
                handle.write(f"{group}\n")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        if created:
            _sync_directory(directory)
            nights = sorted(directory.iterdir(), key=_modified, reverse=True)
            for old in nights[_STARTED_NIGHTS_KEPT:]:
                old.unlink(missing_ok=True)  # another process of the host may prune it too
        return True

    @staticmethod
    def _prepared_groups(path: Path) -> list[str]:
        try:
            return path.read_text().split()
        except FileNotFoundError:
            return []

    def purge(self, instrument: str, detector: int) -> bool:
        """Close and delete the local repo of ``(instrument, detector)``; True if it existed."""
        path = self.path_of(instrument, detector)
        with self._lock:
            butler = self._local.pop((instrument, int(detector)), None)
            self._known.pop((instrument, int(detector)), None)
            if butler is not None:
                butler.close()
            with _file_lock(path.parent / f".{path.name}.lock"):
                if path.exists():
                    shutil.rmtree(path)
                    return True
        return False

    def close(self) -> None:
        """Close every repo this process opened."""
        with self._lock:
            for butler in self._local.values():
                butler.close()
            self._local.clear()
            self._known.clear()
            if self._central is not None:
                self._central.close()
                self._central = None


def _modified(path: Path) -> float:
    """When ``path`` was last written (0 when it is gone)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _sync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a file just created in it)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def repos_of(ctx: Context) -> Repos:
    """The :class:`Repos` of this process (kept in ``ctx.extras``)."""
    repos = ctx.extras.get(EXTRAS_KEY)
    if repos is None:
        repos = Repos(ctx.settings)
        ctx.extras[EXTRAS_KEY] = repos
    return repos
