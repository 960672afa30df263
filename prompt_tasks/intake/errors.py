"""The intake's error table: every error class to one HTTP status and one stable code.

The codes are part of the API: clients and the ledger match on them, so they never change.
A class not in the table answers with the entry of its nearest ancestor that is.
"""

from __future__ import annotations

from typing import Any

from prompt_tasks.errors import (
    InvalidEvent,
    InvalidVisit,
    PermanentError,
    PromptTasksError,
    RetryLater,
)

__all__ = [
    "ERROR_TABLE",
    "BodyTooLarge",
    "ConflictingVisit",
    "Unauthorized",
    "UnknownVisit",
    "error_body",
    "http_error",
]


class BodyTooLarge(InvalidVisit):
    """A request body over ``intake_max_body`` bytes (refused before it is parsed)."""

    code = "body_too_large"


class ConflictingVisit(InvalidVisit):
    """A repeat of an announced visit (same instrument and groupId) with another body."""

    code = "conflicting_visit"


class Unauthorized(PromptTasksError):
    """A request without the intake's bearer token."""

    code = "unauthorized"


class UnknownVisit(PromptTasksError):
    """A visit the ledger does not hold (never announced, or expired)."""

    code = "unknown_visit"


#: Error class → (HTTP status, stable code). The one place this mapping lives.
ERROR_TABLE: dict[type[BaseException], tuple[int, str]] = {
    BodyTooLarge: (413, "body_too_large"),
    ConflictingVisit: (409, "conflicting_visit"),
    InvalidVisit: (422, "invalid_visit"),
    InvalidEvent: (422, "invalid_event"),
    Unauthorized: (401, "unauthorized"),
    UnknownVisit: (404, "unknown_visit"),
    RetryLater: (503, "unavailable"),
    PermanentError: (400, "permanent"),
    PromptTasksError: (500, "error"),
    Exception: (500, "internal"),
}


def http_error(exc: BaseException) -> tuple[int, str]:
    """HTTP status and code of ``exc``: the table entry of its nearest listed class."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[Exception]


def error_body(exc: BaseException) -> dict[str, Any]:
    """JSON body of an error answer: ``{"code", "detail", "errors": [{"field", "reason"}]}``.

    Unexpected errors say nothing of their text (it could carry anything).
    """
    _, code = http_error(exc)
    if not isinstance(exc, PromptTasksError):
        return {"code": code, "detail": "internal error", "errors": []}
    errors: list[dict[str, str]] = []
    if isinstance(exc, InvalidVisit):
        errors = list(exc.errors)
    elif isinstance(exc, InvalidEvent):
        errors = [{"field": "body", "reason": str(exc)}]
    return {"code": code, "detail": str(exc), "errors": errors}
