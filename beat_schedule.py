"""The periodic jobs of the fleet, run by exactly one ``celery beat``.

Each entry names a task by its registered name, so this module imports nothing heavy. Jobs
are added by the issues that bring their tasks (catch-up, housekeeping, expiry, metrics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prompt_tasks.settings import Settings

__all__ = ["schedule"]


def schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery ``beat_schedule`` for ``settings``."""
    del settings  # intervals become settings as jobs arrive
    return {}
