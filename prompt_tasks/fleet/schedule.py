"""The periodic jobs of the fleet, run by exactly one ``celery beat``.

Each entry names a task of :mod:`prompt_tasks.fleet.operations` by its registered name and sends it
to the ``default`` queue (consumed by the summary workers), so this module imports nothing
heavy. Never route a beat job to a broadcast queue: on Redis those silently dropped
beat-routed tasks; per-worker work goes through a remote-control command instead
(:mod:`prompt_tasks.fleet.housekeeping`).

==================== ===================================== ================================
entry                task                                  period
==================== ===================================== ================================
catchup              ``prompt_tasks.catchup_run``          ``catchup_interval_s``; acts
                                                           only in ``catchup_window``
housekeeping         ``prompt_tasks.fleet.housekeeping``         ``housekeeping_interval_s``
expiry               ``prompt_tasks.expiry_sweep``         ``housekeeping_interval_s``
fleet-gauges         ``prompt_tasks.fleet_gauges``         ``fleet_metrics_interval_s``
export               ``prompt_tasks.butler.export`` (queue        :data:`EXPORT_EVERY_S`; a safety
                     ``export``)                           net for lost pokes
==================== ===================================== ================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prompt_tasks.settings import Settings

__all__ = ["schedule"]

#: Queue every beat job is sent to (the export flush goes to the export writer's queue).
BEAT_QUEUE = "default"
#: Period of the export flush (s): pending export requests are written even if no pipeline
#: run pokes the export task any more.
EXPORT_EVERY_S = 60.0


def _entry(task: str, every: float) -> dict[str, Any]:
    # A job not started within one period is dropped: the next one does the same work.
    return {"task": task, "schedule": float(every), "options": {"queue": BEAT_QUEUE, "expires": float(every)}}


def schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery ``beat_schedule`` for ``settings``."""
    return {
        "catchup": _entry("prompt_tasks.catchup_run", settings.catchup_interval_s),
        "housekeeping": _entry("prompt_tasks.housekeeping", settings.housekeeping_interval_s),
        "expiry": _entry("prompt_tasks.expiry_sweep", settings.housekeeping_interval_s),
        "fleet-gauges": _entry("prompt_tasks.fleet_gauges", settings.fleet_metrics_interval_s),
        "export": {**_entry("prompt_tasks.export", EXPORT_EVERY_S),
                   "options": {"queue": "export", "expires": EXPORT_EVERY_S}},
    }
