"""The periodic jobs of the fleet (one ``celery beat``), defined in :mod:`prompt_tasks.fleet.schedule`.

The Celery app reads the schedule from there; this module names it at the top of the tree.
"""

from prompt_tasks.fleet.schedule import BEAT_QUEUE, EXPORT_EVERY_S, schedule

__all__ = ["BEAT_QUEUE", "EXPORT_EVERY_S", "schedule"]
