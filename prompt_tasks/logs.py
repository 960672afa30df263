"""Structured JSON logs with the detector-visit on every line.

Every record carries ``instrument``, ``group``, ``detector``, ``visit`` and ``stage`` (empty
when not known). Code that works on a detector-visit binds them once with :func:`bound`;
the values live in context variables, so they follow the task in threads and greenlets.
Secrets never reach a record: URLs with passwords are masked on the way out.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pythonjsonlogger.json import JsonFormatter

__all__ = ["CONTEXT_FIELDS", "bound", "configure_logging"]

#: The fields every record carries.
CONTEXT_FIELDS: tuple[str, ...] = ("instrument", "group", "detector", "visit", "stage")

_context: dict[str, contextvars.ContextVar[Any]] = {
    name: contextvars.ContextVar(f"prompt_tasks_log_{name}", default="") for name in CONTEXT_FIELDS
}

_PASSWORD_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)


@contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Bind detector-visit fields to every record logged inside the block."""
    tokens = [(name, _context[name].set(value)) for name, value in values.items() if name in _context]
    try:
        yield
    finally:
        for name, token in reversed(tokens):
            _context[name].reset(token)


class _ContextFilter(logging.Filter):
    """Adds the bound fields to each record and masks passwords in URLs."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _context.items():
            if not hasattr(record, name):
                setattr(record, name, var.get())
        if isinstance(record.msg, str) and "://" in record.msg:
            record.msg = _PASSWORD_IN_URL.sub(r"\g<scheme>***@", record.msg)
        return True


def configure_logging(level: str | int = "INFO", json_format: bool = True) -> None:
    """Send the root logger to stderr, as JSON lines (or plain text for people)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    fields = " ".join(f"%({name})s" for name in CONTEXT_FIELDS)
    if json_format:
        handler.setFormatter(
            JsonFormatter(
                f"%(asctime)s %(levelname)s %(name)s %(message)s {fields} %(process)d",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(instrument)s %(group)s %(detector)s %(stage)s] %(message)s")
        )
    handler._prompt_tasks = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        # Replace our own handler; leave others' (pytest's capture, a host's) alone.
        if getattr(old, "_prompt_tasks", False) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
