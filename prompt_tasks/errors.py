"""The one exception tree of prompt-tasks.

::

    PromptTasksError                 root; carries a stable ``code``
    ├── RetryLater                   transient: the stage is retried after ``delay`` seconds
    └── PermanentError               the detector-visit fails at once, with the reason
        ├── InvalidVisit             a next_visit that cannot be processed
        ├── InvalidEvent             a bucket event that cannot be used
        ├── BadRaw                   a raw image that is corrupt or contradicts its visit
        └── PipelineError            the science payload failed

The Celery base task turns ``RetryLater`` into ``Task.retry`` and any other error into the
stage's status object; task bodies never call ``retry`` themselves.
"""

from __future__ import annotations

__all__ = [
    "BadRaw",
    "InvalidEvent",
    "InvalidVisit",
    "PermanentError",
    "PipelineError",
    "PromptTasksError",
    "RetryLater",
]


class PromptTasksError(Exception):
    """Root of every error raised on purpose by prompt-tasks."""

    code: str = "error"


class RetryLater(PromptTasksError):
    """A transient failure (broker, S3, registry unreachable): try again after ``delay`` s."""

    code = "retry"

    def __init__(self, message: str, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(PromptTasksError):
    """A failure that retrying cannot fix: the detector-visit fails with this reason."""

    code = "permanent"


class InvalidVisit(PermanentError):
    """A ``next_visit`` event that is malformed or cannot be processed.

    ``errors`` lists ``{"field", "reason"}`` pairs; by default they are read from a message
    written ``field: reason; field: reason``.
    """

    code = "invalid_visit"

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors: list[dict[str, str]] = errors if errors is not None else _field_errors(message)


def _field_errors(message: str) -> list[dict[str, str]]:
    """``[{"field", "reason"}]`` of a message written ``field: reason; ...`` (else the body's)."""
    out = []
    for part in message.split("; "):
        head, sep, tail = part.partition(": ")
        if sep and head and " " not in head:
            out.append({"field": head, "reason": tail})
        else:
            out.append({"field": "body", "reason": part})
    return out


class InvalidEvent(PermanentError):
    """A bucket notification that cannot be parsed or used."""

    code = "invalid_event"


class BadRaw(PermanentError):
    """A raw image that is corrupt, truncated, or contradicts its visit."""

    code = "bad_raw"


class PipelineError(PermanentError):
    """The science pipeline failed or produced nothing."""

    code = "pipeline_error"
