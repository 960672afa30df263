"""Execute: run a visit's pipeline in this process, on one detector's local repo.

The candidates chosen by :mod:`prompt_tasks.butler.selection` are tried in order with
``SeparablePipelineExecutor`` (no ``pipetask`` subprocess): the first whose quantum graph,
constrained to this visit's exposures and this detector, is non-empty runs; an empty graph
or a failed graph build falls through to the next, and the result says which ran and why
the others did not.

Outputs go to the RUN collection ``<instrument>/prompt/<day_obs>/<pipeline>/<confighash>``:
findable by night and pipeline, and safe to rerun (quanta whose outputs are already in the
run are skipped; partial outputs of a crashed attempt are overwritten). A detector-visit's first
attempt in a repo (``fresh``) has no earlier outputs to find, and does not look for them: its
quanta register what they put as new datasets.

Pipelines are loaded, configured, hashed and their pipeline graphs resolved once per process,
and run Butlers opened, and their runs initialized (output dataset types, init-outputs,
configs), once per night (:class:`PipelineCache`). A quantum graph is built
afresh for every visit (:func:`build_graph`), from that resolved pipeline graph and on the
night's run Butler: the middleware's builder is made to build exactly once, and one reused
across visits misses the calibrations and templates preloaded after it was set up.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prompt_tasks.butler.selection import Candidate
from prompt_tasks.errors import PipelineError

if TYPE_CHECKING:
    from lsst.daf.butler import Butler, DatasetRef, DimensionUniverse
    from lsst.pipe.base import Pipeline
    from lsst.pipe.base.pipeline_graph import PipelineGraph

__all__ = [
    "Attempt",
    "LoadedPipeline",
    "PipelineCache",
    "QuantumResult",
    "RunOutcome",
    "at_lower_priority",
    "build_graph",
    "execute_graph",
    "open_run",
    "output_run",
    "outputs_registered_as_new",
    "remember_installed_packages",
    "run_candidates",
    "visit_where",
]


def output_run(instrument: str, day_obs: int | str, pipeline: str, config_hash: str) -> str:
    """The RUN collection of a pipeline's outputs for one night."""
    return f"{instrument}/prompt/{day_obs}/{pipeline}/{config_hash}"


def visit_where(instrument: str, detector: int, exposures: Sequence[int]) -> tuple[str, dict[str, Any]]:
    """Data query (and its bind values) restricting a graph to these exposures and detector."""
    return (
        "instrument = inst AND detector = det AND exposure IN (exps)",
        {"inst": instrument, "det": int(detector), "exps": [int(e) for e in exposures]},
    )


@dataclass
class LoadedPipeline:
    """A candidate pipeline, configured for this deployment."""

    name: str
    uri: str
    pipeline: Pipeline
    config_hash: str
    graph: PipelineGraph | None = None


class PipelineCache:
    """Pipelines loaded once per process, with the deployment's config overrides applied,
    and the run Butlers their graphs are built and executed with.

    Parameters
    ----------
    parameters
        Config field → value, set on every task whose config has that field (for example
        ``apdb_config_url``, the APDB the association task writes to).
    """

    def __init__(self, parameters: Mapping[str, Any] | None = None) -> None:
        self.parameters = dict(parameters or {})
        self._loaded: dict[str, LoadedPipeline] = {}
        self._runs: dict[tuple[int, str, tuple[str, ...]], tuple[Butler, Butler, Any]] = {}
        #: ``id()`` of the executors of open runs whose init-outputs and dataset types this
        #: process has written or checked (:func:`run_candidates`): once per run Butler.
        self.initialized: set[int] = set()

    #: Run Butlers kept open, least recently used dropped first: one per (detector, night,
    #: pipeline) this process serves. A run Butler shares its repo's registry and datastore, so
    #: it is small; too few and a host serving many detectors reopens one for every visit
    #: (colder graph builds: collections resolved and registry caches filled again).
    max_runs = 512

    def get(self, candidate: Candidate, universe: DimensionUniverse) -> LoadedPipeline:
        """The configured pipeline of ``candidate`` with its resolved graph."""
        loaded = self._loaded.get(candidate.uri)
        if loaded is None:
            loaded = self._load(candidate, universe)
            self._loaded[candidate.uri] = loaded
        return loaded

    def _load(self, candidate: Candidate, universe: DimensionUniverse) -> LoadedPipeline:
        from lsst.pipe.base import Pipeline

        pipeline = Pipeline.from_uri(candidate.uri)
        graph = pipeline.to_graph()
        for label, node in graph.tasks.items():
            for name, value in self.parameters.items():
                if name in node.config._fields:
                    pipeline.addConfigOverride(label, name, value)
        config_hash = hashlib.sha256(str(pipeline).encode()).hexdigest()[:10]
        graph = pipeline.to_graph()
        graph.resolve(dimensions=universe)
        return LoadedPipeline(candidate.name, candidate.uri, pipeline, config_hash, graph)

    def open_run(self, local: Butler, run: str, inputs: Sequence[str]) -> tuple[Butler, Any]:
        """:func:`open_run`, kept for the next visits writing to the same run (the same night).

        Opening a run Butler resolves its collections in the registry: paid once per night
        and pipeline instead of once per detector-visit.
        """
        key = (id(local), run, tuple(inputs))
        hit = self._runs.pop(key, None)
        if hit is None or hit[0] is not local:  # a reopened repo may reuse an id
            if hit is not None:
                self.initialized.discard(id(hit[2]))
            hit = (local, *open_run(local, run, inputs))
        self._runs[key] = hit  # the most recently used last
        while len(self._runs) > self.max_runs:
            self.initialized.discard(id(self._runs.pop(next(iter(self._runs)))[2]))
        return hit[1], hit[2]

    def close(self) -> None:
        """Forget every loaded pipeline and open run."""
        self._loaded.clear()
        self._runs.clear()
        self.initialized.clear()


@dataclass
class Attempt:
    """One candidate tried: whether it ran, and if not, why."""

    pipeline: str
    ran: bool
    reason: str = ""
    quanta: int = 0


@dataclass
class RunOutcome:
    """What :func:`run_candidates` did."""

    pipeline: str | None
    run: str | None
    attempts: list[Attempt]
    outputs: list[str] = field(default_factory=list)
    quanta: dict[str, int] = field(default_factory=dict)
    failed: list[list[str]] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    #: Dataset id → ref of every input and output of the graph's quanta, data ids expanded:
    #: export takes them as they are instead of asking the registry again.
    refs: dict[str, DatasetRef] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the output ids and refs)."""
        return {
            "pipeline": self.pipeline,
            "run": self.run,
            "attempts": [vars(a) for a in self.attempts],
            "quanta": self.quanta,
            "failed": self.failed,
            "n_outputs": len(self.outputs),
            "times": {k: round(v, 4) for k, v in self.times.items()},
        }


@dataclass(frozen=True)
class QuantumResult:
    """How one quantum of an executed graph ended."""

    label: str
    data_id: str
    #: ``success``, ``skipped`` or the failure status.
    status: str
    error_class: str = ""
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.status not in ("success", "skipped")


def open_run(butler: Butler, run: str, inputs: Sequence[str], *, skip_existing: bool = True,
             clobber: bool = True) -> tuple[Butler, Any]:
    """A Butler writing to ``run`` (reading ``run`` then ``inputs``) and its pipeline executor.

    With ``skip_existing`` quanta whose outputs are already in ``run`` are skipped (a rerun
    after a crash does only what is missing); with ``clobber`` partial outputs of a crashed
    attempt are overwritten.
    """
    from lsst.daf.butler import Butler
    from lsst.pipe.base.separable_pipeline_executor import SeparablePipelineExecutor

    # no default data id inferred from the collections: every query here names its instrument,
    # and inferring one reads each input collection's summary (for this Butler and for the
    # executor's own clone of it: a third of a detector's first run)
    run_butler = Butler.from_config(butler=butler, collections=[run, *[c for c in inputs if c != run]], run=run,
                                    inferDefaults=False)
    executor = SeparablePipelineExecutor(run_butler, clobber_output=clobber,
                                         skip_existing_in=[run] if skip_existing else None)
    return run_butler, executor


def execute_graph(run_butler: Butler, executor: Any, graph: Any, *, skip_existing: bool = True,
                  clobber: bool = True, nice: int = 0, fresh: bool = False) -> list[QuantumResult]:
    """Execute every quantum of ``graph`` in this process; how each ended.

    The caller has run ``executor.pre_execute_qgraph``. A failed quantum does not raise: its
    result says why, and quanta that depend on it are not run. With ``nice`` the quanta run at
    that nice value (:func:`at_lower_priority`). With ``fresh`` (no earlier attempt can have
    left outputs of these quanta in the run) no quantum looks for them before it runs, and what
    they put is registered as new (:func:`outputs_registered_as_new`).
    """
    from lsst.pipe.base.mp_graph_executor import MPGraphExecutor, MPGraphExecutorError
    from lsst.pipe.base.single_quantum_executor import SingleQuantumExecutor
    from lsst.pipe.base.taskFactory import TaskFactory

    quantum_executor = SingleQuantumExecutor(
        butler=run_butler, task_factory=TaskFactory(),
        skip_existing_in=[run_butler.run] if skip_existing else None,
        clobber_outputs=clobber, raise_on_partial_outputs=True, assume_no_existing_outputs=fresh,
    )
    graph_executor = MPGraphExecutor(num_proc=1, timeout=2_592_000.0, quantum_executor=quantum_executor)
    registering = outputs_registered_as_new(run_butler) if fresh else contextlib.nullcontext()
    with contextlib.suppress(MPGraphExecutorError), registering:  # the report says which quanta failed
        at_lower_priority(nice, lambda: executor.run_pipeline(graph, graph_executor=graph_executor))
    report = graph_executor.getReport()
    results = []
    for quantum in report.quantaReports if report is not None else []:
        info = quantum.exceptionInfo
        status = str(quantum.status.value).lower()
        results.append(QuantumResult(quantum.taskLabel or "", str(quantum.dataId), status,
                                     info.className if info else "", info.message if info else ""))
    return results


@contextlib.contextmanager
def outputs_registered_as_new(run_butler: Butler) -> Iterator[None]:
    """While a first attempt's quanta run, each output they put is registered as new.

    ``Butler.put`` of a dataset whose id the graph chose registers it with the registry's
    guarded import: a temporary table, seven statements compiled afresh for it (its name is
    new every time), a check against existing datasets, for every output, metadata and log
    alike (more than half of a Trivial quantum's CPU). On a first attempt none of them can exist
    (:meth:`~prompt_tasks.butler.localrepo.Repos.begin_run`), so the registry's import for new
    datasets is used instead: two inserts, and a dataset that exists after all fails the quantum
    on the database's own constraints instead of being taken for this attempt's.
    Only this run Butler's registry is switched, and only for the execution.
    """
    registry = getattr(run_butler, "_registry", None)
    if registry is None or not hasattr(type(registry), "_importDatasets"):
        yield  # not a direct Butler: its own put
        return
    registry._importDatasets = functools.partial(type(registry)._importDatasets, registry, assume_new=True)
    try:
        yield
    finally:
        del registry._importDatasets


def at_lower_priority[T](nice: int, work: Callable[[], T]) -> T:
    """``work()`` in a thread of its own at nice value ``nice``; its result, or what it raised.

    Linux gives each thread its own nice value and lets any thread raise its own, so a
    pipeline's quanta can yield the CPU to the host's latency-critical work (the next visit's
    prepare and ingest in the other pool process, the servers) without any privilege, and the
    pool process itself is untouched for its next task. While waiting, this thread still takes
    the task's signals: an exception raised in it (a soft time limit) is raised in the work's
    thread too, as a signal would have interrupted the work itself, and raised here once the
    work has stopped. ``nice`` 0 (or no ``os.setpriority``): ``work()`` here, as it is.
    """
    if nice <= 0 or not hasattr(os, "setpriority"):
        return work()
    outcome: dict[str, Any] = {}
    done = threading.Event()
    context = contextvars.copy_context()  # the log context (visit, detector, stage) goes along

    def body() -> None:
        with contextlib.suppress(OSError):  # not allowed here: the same priority, nothing lost
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        try:
            outcome["value"] = context.run(work)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=body, name="pipeline", daemon=True)
    thread.start()
    interrupted: BaseException | None = None
    while not done.is_set():
        # an Event, not join(): Python 3.12 takes a thread whose join() was interrupted for ended
        try:
            done.wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised once the work has stopped
            interrupted = interrupted or exc
            _raise_in(thread, type(exc))
    if interrupted is not None:
        raise interrupted
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _raise_in(thread: threading.Thread, error: type[BaseException]) -> None:
    """Raise ``error`` in ``thread`` at its next Python instruction."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(error))


def _execute(run_butler: Butler, executor: Any, graph: Any, nice: int = 0, fresh: bool = False) -> list[list[str]]:
    """Execute ``graph``; the failed quanta as ``[label, data id, error]``."""
    return [
        [r.label, r.data_id, f"{r.error_class}: {r.message}" if r.error_class else r.status]
        for r in execute_graph(run_butler, executor, graph, nice=nice, fresh=fresh) if r.failed
    ]


def _outputs(graph: Any) -> list[str]:
    """Ids of every dataset the quantum graph predicts as an output."""
    ids: set[str] = set()
    for node in graph:
        for refs in node.quantum.outputs.values():
            ids.update(str(ref.id) for ref in refs)
    return sorted(ids)


def _refs(graph: Any) -> dict[str, DatasetRef]:
    """Every input and output ref of the graph's quanta, by dataset id."""
    out: dict[str, DatasetRef] = {}
    for node in graph:
        for mapping in (node.quantum.inputs, node.quantum.outputs):
            for refs in mapping.values():
                out.update((str(ref.id), ref) for ref in refs)
    return out


class _BuiltOnce:
    """A run Butler as the quantum-graph builder sees it: its ``clone`` is the Butler itself.

    The builder clones the Butler it is given for every graph, and a clone resolves its
    collections and refills its dimension-record cache in the registry: a third of a warm
    graph build. The run Butler already reads exactly the builder's input collections, is
    used by one thread at a time, and lives as long as its night's run.
    """

    def __init__(self, butler: Butler) -> None:
        self._butler = butler

    def clone(self, **_: Any) -> Butler:
        return self._butler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._butler, name)


def build_graph(run_butler: Butler, executor: Any, candidate: LoadedPipeline, where: str,
                bind: Mapping[str, Any], fresh: bool = False) -> Any:
    """The quantum graph of ``candidate`` on the data ``where`` selects.

    Built from the pipeline graph resolved once per process (``make_quantum_graph`` rebuilds
    it from the pipeline, configs and all) on the run Butler itself (:class:`_BuiltOnce`).

    The graph keeps every quantum, those an earlier attempt finished included, with the ids of
    the outputs it left in the run: the executor skips the finished ones and reruns the others
    (:func:`open_run`), and export finds every output. A graph without the finished quanta
    would be empty for a finished visit (a run redelivered after it executed, an export caught
    up), which would then be taken for a candidate without work: nothing exported, or the next
    candidate run instead. With ``fresh`` (no earlier attempt can have left outputs in the run)
    the builder does not look for them: one query per output dataset type saved.
    """
    from lsst.pipe.base.all_dimensions_quantum_graph_builder import AllDimensionsQuantumGraphBuilder

    pipeline_graph = candidate.graph.copy() if candidate.graph is not None else candidate.pipeline.to_graph()
    metadata = {"input": list(run_butler.collections.defaults), "output_run": run_butler.run,
                "skip_existing_in": executor._skip_existing_in, "data_query": where}
    # one registry transaction for the whole build, not one per query and lookup (~25); one
    # collection cache for it too: the builder opens its own twice (set-up, skeleton), each
    # resolving the input chains afresh (a quarter of a warm Trivial build)
    with run_butler.registry.transaction(), run_butler.registry.caching_context():
        # no skipping here (the executor skips); outputs in the way keep their ids (clobber)
        builder = AllDimensionsQuantumGraphBuilder(
            pipeline_graph, _BuiltOnce(run_butler), where=where, bind=bind,
            clobber=executor._clobber_output,
        )
        if fresh:
            # Set up on the existing run, the builder has found its init-outputs (configs,
            # schemas) to reuse; the visit's own outputs cannot be there yet, so the per-visit
            # search for an earlier attempt's is left out.
            builder.output_run_exists = False
        return builder.build(metadata=metadata, attach_datastore_records=False)


def remember_installed_packages(prime: bool = False) -> None:
    """Map modules to installed distributions once per process, not once per quantum graph.

    Every quantum graph records the versions of the imported packages
    (``lsst.utils.packages.Packages.fromSystem``), which maps modules to distributions by
    reading every installed distribution's file list
    (``importlib.metadata.packages_distributions``, uncached) and then each distribution's
    metadata: 0.3 s and more per graph, most of a warm graph build. The installed
    distributions do not change under a running worker, so the mapping is computed once, and
    the versions again only when other modules have been imported since. ``prime`` computes
    them now (a second of metadata reading), e.g. in a worker before it forks its pool.
    """
    import lsst.utils.packages as packages

    if not hasattr(packages.packages_distributions, "cache_info"):
        packages.packages_distributions = functools.cache(packages.packages_distributions)
    if not hasattr(packages.getPythonPackages, "by_modules"):
        packages.getPythonPackages = _per_module_set(packages.getPythonPackages)
    if prime:
        packages.getPythonPackages()


def _per_module_set(versions: Callable[[], dict[str, str]]) -> Callable[[], dict[str, str]]:
    """``versions`` computed again only when the set of imported modules changed (exact, cheap)."""
    memo: dict[frozenset[str], dict[str, str]] = {}

    def cached() -> dict[str, str]:
        key = frozenset(sys.modules)
        if key not in memo:
            memo.clear()
            memo[key] = versions()
        return dict(memo[key])

    cached.by_modules = memo  # type: ignore[attr-defined]
    return cached


def run_candidates(local: Butler, candidates: Sequence[LoadedPipeline], instrument: str, detector: int,
                   exposures: Sequence[int], day_obs: int | str, inputs: Sequence[str],
                   opener: Callable[[Butler, str, Sequence[str]], tuple[Butler, Any]] = open_run,
                   nice: int = 0,
                   starting: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                   initialized: set[int] | None = None, fresh: bool = False) -> RunOutcome:
    """Run the first candidate with a non-empty quantum graph; see the module doc.

    ``nice``: the nice value its quanta run at (:func:`at_lower_priority`). ``starting``: a
    lock held while a graph is built and its init-outputs written, so two runs of one repo
    side by side do not both write the init-outputs of a new output run. ``initialized``:
    ``id()`` of the executors whose run this process has initialized (the output dataset types
    registered, the init-outputs and configs written or checked against the run's); an
    executor found there skips it, and one initialized now is added (``None``: every time).
    ``fresh``: the first attempt of this detector-visit in ``local``, so no output of an earlier
    attempt can be in the way; neither the graph build nor the quanta look for one.

    Raises
    ------
    PipelineError
        The chosen pipeline ran and some of its quanta failed (the reason lists them).
    """
    remember_installed_packages()
    where, bind = visit_where(instrument, detector, exposures)
    attempts: list[Attempt] = []
    for candidate in candidates:
        run = output_run(instrument, day_obs, candidate.name, candidate.config_hash)
        run_butler, executor = opener(local, run, inputs)
        with starting():
            t0, graph_cpu0 = time.perf_counter(), time.process_time()
            try:
                graph = build_graph(run_butler, executor, candidate, where, bind, fresh)
            except Exception as exc:  # noqa: BLE001 - a failed graph build falls through
                message = str(exc)
                message = message if len(message) <= 240 else message[:237] + "..."
                attempts.append(Attempt(candidate.name, False,
                                        f"graph build failed: {type(exc).__name__}: {message}"))
                continue
            graph_s, graph_cpu_s = time.perf_counter() - t0, time.process_time() - graph_cpu0
            if len(graph) == 0:
                attempts.append(Attempt(candidate.name, False, "empty quantum graph"))
                continue
            quanta = {node.label: len(graph.getNodesForTask(node)) for node in graph.iterTaskGraph()}
            attempts.append(Attempt(candidate.name, True, "", len(graph)))
            t1 = time.perf_counter()
            if initialized is None or id(executor) not in initialized:
                executor.pre_execute_qgraph(graph, register_dataset_types=True, save_versions=False)
                if initialized is not None:
                    initialized.add(id(executor))
        cpu0 = time.process_time()
        failed = _execute(run_butler, executor, graph, nice, fresh)
        # the CPU of the quanta themselves: the science payload, apart from the framework's own cost
        outcome = RunOutcome(
            candidate.name, run, attempts, _outputs(graph), quanta, failed,
            {"graph": graph_s, "graph_cpu": graph_cpu_s, "execute": time.perf_counter() - t1,
             "execute_cpu": time.process_time() - cpu0},
            _refs(graph),
        )
        if failed:
            detail = "; ".join(f"{label} {data_id}: {message}" for label, data_id, message in failed[:3])
            error = PipelineError(f"{candidate.name}: {len(failed)} of {len(graph)} quanta failed: {detail}")
            error.outcome = outcome  # type: ignore[attr-defined]
            raise error
        return outcome
    return RunOutcome(None, None, attempts)
