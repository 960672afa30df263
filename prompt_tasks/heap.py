"""The Python heap of a long-lived worker process: collected only where garbage can be.

A warmed compute process holds over half a million objects that live as long as it does
(the LSST middleware and astropy modules, the loaded pipelines, the open repos). Python's
cyclic collector walks all of them on every full collection: ~0.15 s, about once in ten
detector-visits, plus the young collections that run every 700 allocations. Freezing the
warm heap (``gc.freeze``) takes those objects out of every later collection, and a larger
young generation lets short-lived objects die between collections. Cyclic garbage made after
the freeze is still collected; only what is alive at the freeze is never scanned again.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle_heap"]

#: Allocations between two young collections (Python's default is 700).
YOUNG_THRESHOLD = 10_000


def settle_heap(young_threshold: int = YOUNG_THRESHOLD) -> int:
    """Collect once, freeze what survives and collect the young generation less often.

    Meant for the end of a process's warm-up (before a pool forks, and in each pool process
    once it is warm): the frozen objects are never scanned again, which also keeps a forked
    child from writing to its parent's pages when it collects. Returns the number of frozen
    objects.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
    return gc.get_freeze_count()
