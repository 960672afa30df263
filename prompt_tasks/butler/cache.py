"""The preload cache of a local repo: which preloaded datasets it keeps, bounded in bytes.

Every dataset preloaded from the central repo into a local repo is an entry (id, dataset
type, bytes, last use). After each preload the least recently used entries are evicted
until the total fits the budget, never one the current visit needs. The entries live in a
small JSON file inside the local repo, so a restarted worker still knows its cache.

The eviction decision (:func:`choose_evictions`) is pure; :class:`CacheIndex` does the file
I/O.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["CacheEntry", "CacheIndex", "choose_evictions"]


@dataclass
class CacheEntry:
    """One preloaded dataset of a local repo."""

    dataset_type: str
    nbytes: int
    last_used: float


def choose_evictions(entries: Mapping[str, CacheEntry], needed: Iterable[str], limit: int) -> list[str]:
    """The ids to evict so the cache fits ``limit`` bytes, least recently used first.

    Entries in ``needed`` are never chosen, so the result may leave the cache above
    ``limit`` when the current visit alone needs more.
    """
    keep = set(needed)
    total = sum(entry.nbytes for entry in entries.values())
    evict: list[str] = []
    for dataset_id, entry in sorted(entries.items(), key=lambda item: (item[1].last_used, item[0])):
        if total <= limit:
            break
        if dataset_id in keep:
            continue
        evict.append(dataset_id)
        total -= entry.nbytes
    return evict


class CacheIndex:
    """The cache entries of one local repo, persisted as JSON next to its registry."""

    FILENAME = "preload_cache.json"

    def __init__(self, repo_root: Path) -> None:
        self.path = Path(repo_root) / self.FILENAME
        self.entries: dict[str, CacheEntry] = {}
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                self.entries = {key: CacheEntry(**value) for key, value in raw.items()}
            except (ValueError, TypeError):
                self.entries = {}

    @property
    def nbytes(self) -> int:
        """Total size of the cached datasets."""
        return sum(entry.nbytes for entry in self.entries.values())

    def touch(self, dataset_ids: Iterable[str], now: float) -> None:
        """Mark known entries as used at ``now``."""
        for dataset_id in dataset_ids:
            entry = self.entries.get(dataset_id)
            if entry is not None:
                entry.last_used = now

    def add(self, dataset_id: str, dataset_type: str, nbytes: int, now: float) -> None:
        """Record a newly preloaded dataset."""
        self.entries[dataset_id] = CacheEntry(dataset_type, nbytes, now)

    def remove(self, dataset_ids: Iterable[str]) -> None:
        """Forget evicted datasets."""
        for dataset_id in dataset_ids:
            self.entries.pop(dataset_id, None)

    def save(self) -> None:
        """Write the index atomically."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({key: asdict(value) for key, value in self.entries.items()}))
        os.replace(tmp, self.path)
