"""Execute: run a visit's pipeline in this process, on one detector's local repo.

The candidates chosen by :mod:`prompt_tasks.selection` are tried in order with
``SeparablePipelineExecutor`` (no ``pipetask`` subprocess): the first whose quantum graph,
constrained to this visit's exposures and this detector, is non-empty runs; an empty graph
or a failed graph build falls through to the next, and the result says which ran and why
the others did not.

Outputs go to the RUN collection ``<instrument>/prompt/<day_obs>/<pipeline>/<confighash>``:
findable by night and pipeline, and safe to rerun (quanta whose outputs are already in the
run are skipped; partial outputs of a crashed attempt are overwritten).

Pipelines are loaded, configured and hashed once per process (:class:`PipelineCache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prompt_tasks.errors import PipelineError
from prompt_tasks.selection import Candidate

if TYPE_CHECKING:
    from lsst.daf.butler import Butler, DimensionUniverse
    from lsst.pipe.base import Pipeline
    from lsst.pipe.base.pipeline_graph import PipelineGraph

__all__ = [
    "Attempt",
    "LoadedPipeline",
    "PipelineCache",
    "RunOutcome",
    "output_run",
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
    """Pipelines loaded once per process, with the deployment's config overrides applied.

    Parameters
    ----------
    parameters
        Config field → value, set on every task whose config has that field (for example
        ``apdb_config_url``, the APDB the association task writes to).
    """

    def __init__(self, parameters: Mapping[str, Any] | None = None) -> None:
        self.parameters = dict(parameters or {})
        self._loaded: dict[str, LoadedPipeline] = {}

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

    def close(self) -> None:
        """Forget every loaded pipeline."""
        self._loaded.clear()


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the output ids)."""
        return {
            "pipeline": self.pipeline,
            "run": self.run,
            "attempts": [vars(a) for a in self.attempts],
            "quanta": self.quanta,
            "failed": self.failed,
            "n_outputs": len(self.outputs),
            "times": {k: round(v, 4) for k, v in self.times.items()},
        }


def _execute(run_butler: Butler, executor: Any, graph: Any) -> list[list[str]]:
    """Execute every quantum of ``graph``; the failed ones as ``[label, data id, error]``."""
    from lsst.pipe.base.mp_graph_executor import MPGraphExecutor, MPGraphExecutorError
    from lsst.pipe.base.quantum_reports import ExecutionStatus
    from lsst.pipe.base.single_quantum_executor import SingleQuantumExecutor
    from lsst.pipe.base.taskFactory import TaskFactory

    quantum_executor = SingleQuantumExecutor(
        butler=run_butler, task_factory=TaskFactory(), skip_existing_in=[run_butler.run],
        clobber_outputs=True, raise_on_partial_outputs=True,
    )
    graph_executor = MPGraphExecutor(num_proc=1, timeout=2_592_000.0, quantum_executor=quantum_executor)
    with contextlib.suppress(MPGraphExecutorError):  # the report says which quanta failed
        executor.run_pipeline(graph, graph_executor=graph_executor)
    report = graph_executor.getReport()
    failed = []
    for quantum in report.quantaReports if report is not None else []:
        if quantum.status not in (ExecutionStatus.SUCCESS, ExecutionStatus.SKIPPED):
            info = quantum.exceptionInfo
            message = f"{info.className}: {info.message}" if info else str(quantum.status.value)
            failed.append([quantum.taskLabel or "", str(quantum.dataId), message])
    return failed


def _outputs(graph: Any) -> list[str]:
    """Ids of every dataset the quantum graph predicts as an output."""
    ids: set[str] = set()
    for node in graph:
        for refs in node.quantum.outputs.values():
            ids.update(str(ref.id) for ref in refs)
    return sorted(ids)


def run_candidates(local: Butler, candidates: Sequence[LoadedPipeline], instrument: str, detector: int,
                   exposures: Sequence[int], day_obs: int | str, inputs: Sequence[str]) -> RunOutcome:
    """Run the first candidate with a non-empty quantum graph; see the module doc.

    Raises
    ------
    PipelineError
        The chosen pipeline ran and some of its quanta failed (the reason lists them).
    """
    from lsst.daf.butler import Butler
    from lsst.pipe.base.separable_pipeline_executor import SeparablePipelineExecutor

    where, bind = visit_where(instrument, detector, exposures)
    attempts: list[Attempt] = []
    for candidate in candidates:
        run = output_run(instrument, day_obs, candidate.name, candidate.config_hash)
        run_butler = Butler.from_config(butler=local, collections=[run, *inputs], run=run)
        executor = SeparablePipelineExecutor(run_butler, clobber_output=True, skip_existing_in=[run])
        t0 = time.perf_counter()
        try:
            graph = executor.make_quantum_graph(candidate.pipeline, where=where, bind=bind)
        except Exception as exc:  # noqa: BLE001 - a failed graph build falls through
            message = str(exc)
            message = message if len(message) <= 240 else message[:237] + "..."
            attempts.append(Attempt(candidate.name, False, f"graph build failed: {type(exc).__name__}: {message}"))
            continue
        graph_s = time.perf_counter() - t0
        if len(graph) == 0:
            attempts.append(Attempt(candidate.name, False, "empty quantum graph"))
            continue
        quanta = {node.label: len(graph.getNodesForTask(node)) for node in graph.iterTaskGraph()}
        attempts.append(Attempt(candidate.name, True, "", len(graph)))
        t1 = time.perf_counter()
        executor.pre_execute_qgraph(graph, register_dataset_types=True, save_versions=False)
        failed = _execute(run_butler, executor, graph)
        outcome = RunOutcome(
            candidate.name, run, attempts, _outputs(graph), quanta, failed,
            {"graph": graph_s, "execute": time.perf_counter() - t1},
        )
        if failed:
            detail = "; ".join(f"{label} {data_id}: {message}" for label, data_id, message in failed[:3])
            error = PipelineError(f"{candidate.name}: {len(failed)} of {len(graph)} quanta failed: {detail}")
            error.outcome = outcome  # type: ignore[attr-defined]
            raise error
        return outcome
    return RunOutcome(None, None, attempts)
