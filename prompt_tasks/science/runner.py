"""Run a pipeline in this process with the standard middleware and summarize the outcome.

The in-process twin of ``pipetask run``: ``SeparablePipelineExecutor`` builds the quantum graph
for a data query, registers dataset types and init-outputs, and executes every quantum in a
single process; the executor's report is condensed into a :class:`RunSummary` the Butler
worker records. Config overrides use the same ``label:field=value`` words as ``pipetask -c``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsst.daf.butler import Butler

__all__ = [
    "PIPELINE_DIR",
    "RunSummary",
    "override_arguments",
    "parse_override",
    "pipeline_path",
    "run_pipeline_in_process",
]

#: Where the SimCam pipelines live.
PIPELINE_DIR = (
    Path(__file__).resolve().parent.parent / "instruments" / "simcam" / "pipelines"
)


def pipeline_path(name: str) -> Path:
    """Path of the shipped SimCam pipeline ``name`` (``ApPipe``, ``SingleFrame``...)."""
    path = PIPELINE_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no pipeline {name!r} in {PIPELINE_DIR}")
    return path


def parse_override(text: str) -> tuple[str, str, str]:
    """Split a ``pipetask -c`` word ``label:field=value`` into its three parts."""
    label, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not label or not key:
        raise ValueError(f"config override {text!r} is not 'label:field=value'")
    return label, key, value


def override_arguments(
    overrides: Mapping[str, Mapping[str, Any]] | Iterable[str],
) -> list[str]:
    """``pipetask`` arguments (``-c label:field=value`` pairs) for ``overrides``."""
    args: list[str] = []
    for word in _override_words(overrides):
        args += ["-c", word]
    return args


def _override_words(
    overrides: Mapping[str, Mapping[str, Any]] | Iterable[str] | None,
) -> list[str]:
    """Overrides as ``label:field=value`` words, whichever form they came in."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [
            f"{label}:{key}={value}"
            for label, fields in overrides.items()
            for key, value in fields.items()
        ]
    return [str(word) for word in overrides]


@dataclass
class RunSummary:
    """What one in-process pipeline run did."""

    output_run: str
    n_quanta: int
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    #: ``(task label, data id, exception class, message)`` of each failed quantum.
    failures: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: Quanta per task label in the graph.
    tasks: dict[str, int] = field(default_factory=dict)
    #: Tasks of the pipeline without any quantum (a missing template prunes ApPipe's tail).
    missing_tasks: list[str] = field(default_factory=list)
    graph_seconds: float = 0.0
    execute_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the graph was not empty and no quantum failed."""
        return self.n_quanta > 0 and self.failed == 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able view (for status objects and logs)."""
        return {
            "output_run": self.output_run,
            "n_quanta": self.n_quanta,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "skipped": self.skipped,
            "failures": [list(f) for f in self.failures],
            "tasks": dict(self.tasks),
            "missing_tasks": list(self.missing_tasks),
            "graph_seconds": round(self.graph_seconds, 3),
            "execute_seconds": round(self.execute_seconds, 3),
            "ok": self.ok,
        }


def run_pipeline_in_process(
    butler: Butler,
    pipeline_path: str | Path,
    where: str,
    output_run: str,
    config_overrides: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None,
    *,
    input_collections: Sequence[str] | None = None,
    skip_existing: bool = True,
    register_dataset_types: bool = True,
    require_all_tasks: bool = True,
) -> RunSummary:
    """Build and execute the quantum graph of ``pipeline_path`` for ``where`` in this process.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        A writeable Butler; its default collections are the inputs unless
        ``input_collections`` is given.
    pipeline_path : `str` or `pathlib.Path`
        Pipeline YAML file.
    where : `str`
        Data query (``instrument='SimCam' and exposure in (...) and detector=4``).
    output_run : `str`
        RUN collection receiving the outputs; searched for outputs already made, so a re-run
        after a crash only executes what is missing.
    config_overrides : mapping or sequence of `str`, optional
        ``{label: {field: value}}`` or ``["label:field=value", ...]``.
    input_collections : sequence of `str`, optional
        Input collections (default: the Butler's).
    skip_existing : `bool`
        Skip quanta whose outputs already exist in ``output_run``.
    register_dataset_types : `bool`
        Register the pipeline's dataset types in the repository if missing.
    require_all_tasks : `bool`
        When some task of the pipeline gets no quantum (ApPipe where no template covers the
        detector: isr and calibrate could run, subtract and what follows cannot), run nothing
        and report an empty graph (``n_quanta == 0``, ``missing_tasks`` named), so the caller
        falls back to its next candidate pipeline (``SingleFrame``).

    Returns
    -------
    summary : `RunSummary`
        Counts of quanta by outcome (an empty graph gives ``n_quanta == 0``).
    """
    from lsst.pipe.base import Pipeline
    from lsst.pipe.base.mp_graph_executor import MPGraphExecutor, MPGraphExecutorError
    from lsst.pipe.base.quantum_reports import ExecutionStatus
    from lsst.pipe.base.separable_pipeline_executor import SeparablePipelineExecutor
    from lsst.pipe.base.single_quantum_executor import SingleQuantumExecutor
    from lsst.pipe.base.taskFactory import TaskFactory

    inputs = (
        list(input_collections)
        if input_collections is not None
        else list(butler.collections.defaults)
    )
    collections = [output_run, *[c for c in inputs if c != output_run]]
    run_butler = Butler.from_config(
        butler=butler, collections=collections, run=output_run
    )
    skip_in = [output_run] if skip_existing else None
    executor = SeparablePipelineExecutor(
        run_butler, clobber_output=False, skip_existing_in=skip_in
    )
    pipeline = Pipeline.from_uri(str(pipeline_path))
    for word in _override_words(config_overrides):
        label, key, value = parse_override(word)
        pipeline.addConfigOverride(label, key, _literal(value))
    start = time.perf_counter()
    graph = executor.make_quantum_graph(pipeline, where=where)
    summary = RunSummary(output_run=output_run, n_quanta=len(graph))
    summary.tasks = {
        label: len(graph.get_task_quanta(label)) for label in pipeline.to_graph().tasks
    }
    summary.missing_tasks = [label for label, n in summary.tasks.items() if n == 0]
    summary.graph_seconds = time.perf_counter() - start
    if require_all_tasks and summary.missing_tasks:
        summary.n_quanta = 0
    if summary.n_quanta == 0:
        return summary
    start = time.perf_counter()
    executor.pre_execute_qgraph(
        graph, register_dataset_types=register_dataset_types, save_versions=False
    )
    quantum_executor = SingleQuantumExecutor(
        butler=run_butler,
        task_factory=TaskFactory(),
        skip_existing_in=skip_in,
        clobber_outputs=False,
        raise_on_partial_outputs=True,
    )
    graph_executor = MPGraphExecutor(
        num_proc=1, timeout=2_592_000.0, quantum_executor=quantum_executor
    )
    with contextlib.suppress(MPGraphExecutorError):  # the report below says which quanta failed
        executor.run_pipeline(graph, graph_executor=graph_executor)
    summary.execute_seconds = time.perf_counter() - start
    report = graph_executor.getReport()
    for quantum in report.quantaReports if report is not None else []:
        if quantum.status == ExecutionStatus.SUCCESS:
            summary.succeeded += 1
        elif quantum.status == ExecutionStatus.SKIPPED:
            summary.skipped += 1
        else:
            summary.failed += 1
            info = quantum.exceptionInfo
            summary.failures.append(
                (
                    quantum.taskLabel or "",
                    str(quantum.dataId),
                    info.className if info else quantum.status.value,
                    info.message if info else "",
                )
            )
    return summary


def _literal(value: str) -> Any:
    """A ``-c`` value as pex_config wants it: Python literals parsed, anything else a string."""
    import ast

    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
