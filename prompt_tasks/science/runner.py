"""Run a pipeline for any data query in this process and summarize the outcome.

The in-process twin of ``pipetask run`` for tests, benchmarks and the science team: the quantum
graph is built for a data query, dataset types and init-outputs are registered, and every
quantum runs in this process through the framework's one executor wrapper
(:func:`prompt_tasks.butler.execute.open_run`, :func:`~prompt_tasks.butler.execute.execute_graph`);
the outcome is condensed into a :class:`RunSummary`. Config overrides use the same
``label:field=value`` words as ``pipetask -c``. The detector stages run visits through
:func:`prompt_tasks.butler.execute.run_candidates` instead.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsst.daf.butler import Butler

from prompt_tasks.butler.execute import execute_graph, open_run
from prompt_tasks.instruments import known_instruments, load_plugin

__all__ = ["RunSummary", "override_arguments", "parse_override", "pipeline_path", "run_pipeline_in_process"]

def pipeline_path(name: str) -> Path:
    """Path of the pipeline ``name`` (``ApPipe``, ``SingleFrame``...) an instrument plugin ships."""
    filename = f"{name.removesuffix('.yaml')}.yaml"
    dirs = [load_plugin(instrument).pipelines_dir for instrument in sorted(known_instruments())]
    for directory in dirs:
        if (directory / filename).exists():
            return directory / filename
    raise FileNotFoundError(f"no pipeline {name!r} in {', '.join(map(str, dirs))}")


def parse_override(text: str) -> tuple[str, str, str]:
    """Split a ``pipetask -c`` word ``label:field=value`` into its three parts."""
    label, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not label or not key:
        raise ValueError(f"config override {text!r} is not 'label:field=value'")
    return label, key, value


def override_arguments(overrides: Mapping[str, Mapping[str, Any]] | Iterable[str]) -> list[str]:
    """``pipetask`` arguments (``-c label:field=value`` pairs) for ``overrides``."""
    args: list[str] = []
    for word in _override_words(overrides):
        args += ["-c", word]
    return args


def _override_words(overrides: Mapping[str, Mapping[str, Any]] | Iterable[str] | None) -> list[str]:
    """Overrides as ``label:field=value`` words, whichever form they came in."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [f"{label}:{key}={value}" for label, fields in overrides.items() for key, value in fields.items()]
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
        return {"output_run": self.output_run, "n_quanta": self.n_quanta, "succeeded": self.succeeded,
                "failed": self.failed, "skipped": self.skipped, "failures": [list(f) for f in self.failures],
                "tasks": dict(self.tasks), "missing_tasks": list(self.missing_tasks),
                "graph_seconds": round(self.graph_seconds, 3), "execute_seconds": round(self.execute_seconds, 3),
                "ok": self.ok}


def run_pipeline_in_process(butler: Butler, pipeline_path: str | Path, where: str, output_run: str,
                            config_overrides: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None, *,
                            input_collections: Sequence[str] | None = None, skip_existing: bool = True,
                            register_dataset_types: bool = True, require_all_tasks: bool = True) -> RunSummary:
    """Build and execute the quantum graph of ``pipeline_path`` for ``where`` in this process.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        A writeable Butler; its default collections are the inputs unless
        ``input_collections`` is given.
    pipeline_path : `str` or `pathlib.Path`
        Pipeline YAML file.
    where : `str`
        Data query (``instrument='X' and exposure in (...) and detector=4``).
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

    inputs = list(input_collections) if input_collections is not None else list(butler.collections.defaults)
    run_butler, executor = open_run(butler, output_run, inputs, skip_existing=skip_existing, clobber=False)
    pipeline = Pipeline.from_uri(str(pipeline_path))
    for word in _override_words(config_overrides):
        label, key, value = parse_override(word)
        pipeline.addConfigOverride(label, key, _literal(value))
    start = time.perf_counter()
    graph = executor.make_quantum_graph(pipeline, where=where)
    summary = RunSummary(output_run=output_run, n_quanta=len(graph))
    summary.tasks = {label: len(graph.get_task_quanta(label)) for label in pipeline.to_graph().tasks}
    summary.missing_tasks = [label for label, n in summary.tasks.items() if n == 0]
    summary.graph_seconds = time.perf_counter() - start
    if require_all_tasks and summary.missing_tasks:
        summary.n_quanta = 0
    if summary.n_quanta == 0:
        return summary
    start = time.perf_counter()
    executor.pre_execute_qgraph(graph, register_dataset_types=register_dataset_types, save_versions=False)
    results = execute_graph(run_butler, executor, graph, skip_existing=skip_existing, clobber=False)
    summary.execute_seconds = time.perf_counter() - start
    for result in results:
        if result.status == "success":
            summary.succeeded += 1
        elif result.status == "skipped":
            summary.skipped += 1
        else:
            summary.failed += 1
            summary.failures.append((result.label, result.data_id, result.error_class or result.status, result.message))
    return summary


def _literal(value: str) -> Any:
    """A ``-c`` value as pex_config wants it: Python literals parsed, anything else a string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
