"""Housekeeping of the fleet: local repos and caches, expired index entries, fleet gauges.

Three periodic jobs (see :mod:`prompt_tasks.fleet.schedule`), run by the one ``celery beat``:

- **local repos** (:func:`broadcast_housekeeping`): a remote-control broadcast of the custom
  control command :data:`COMMAND`, answered by every compute worker's main process, which
  drops preloaded datasets past the cache budget or unused for ``settings.cache_max_age_s``
  and deletes the local repos of detectors that no worker of its host owns any more (idle
  for ``settings.repo_idle_s``). A control command rather than a task to a broadcast queue:
  broadcast queues on Redis silently dropped beat-routed tasks (DESIGN.md).
- **expiry** (:func:`expiry_sweep`): the ledger's index sorted sets lose visits whose record
  has expired; index keys left without a TTL (arrivals, wake lists, waiters, delivery
  counters, visit records) get one; settled catch-up records older than the ledger go.
- **fleet gauges** (:func:`fleet_gauges`): broker queue depths and the workers answering a
  ping, written to Redis for the metrics endpoint (:mod:`prompt_tasks.fleet.prometheus`).

The decisions (:func:`repos_to_delete`, :func:`datasets_to_drop`, :func:`same_host`) are pure.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.worker.control import control_command

from prompt_tasks.butler.cache import CacheEntry, CacheIndex, choose_evictions
from prompt_tasks.butler.localrepo import Repos
from prompt_tasks.context import settings_of
from prompt_tasks.daytime import catchup
from prompt_tasks.fleet.controller import WORKER_PREFIX, read_assignment
from prompt_tasks.flow.router import parse_detector_queue
from prompt_tasks.store.keys import (
    CATCHUP_RECORDS,
    VISITS_INFLIGHT,
    VISITS_RECENT,
    visit_key,
)

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from prompt_tasks.context import Context
    from prompt_tasks.settings import Settings

__all__ = [
    "COMMAND",
    "broadcast_housekeeping",
    "datasets_to_drop",
    "expiry_sweep",
    "host_of",
    "housekeep_local",
    "repos_to_delete",
    "same_host",
]

log = logging.getLogger(__name__)

#: The remote-control command every worker answers.
COMMAND = "prompt_housekeeping"
#: A cache index written this recently means a preload may be running: leave the repo alone.
_BUSY_S = 60.0
#: Key patterns of index entries that must carry a TTL.
_EXPIRING_PATTERNS: tuple[str, ...] = ("arrivals:*", "wake:*", "waiters:*", "visit-end:*", "abort:*",
                                       "deliveries:*", "visit:*")


# --------------------------------------------------------------------------- pure decisions


def host_of(node: str) -> str:
    """The host part of a node name (``detector-1@host`` → ``host``)."""
    return node.partition("@")[2] or node


def same_host(node: str, other: str) -> bool:
    """True when two node names run on the same host (share its local repo root)."""
    return host_of(node) == host_of(other)


def repos_to_delete(existing: Iterable[tuple[str, int]], assignment: Mapping[str, Iterable[str]],
                    me: str, idle: Mapping[tuple[str, int], float], idle_s: float) -> list[tuple[str, int]]:
    """Local repos ``(instrument, detector)`` this host may delete.

    A repo goes when no worker of this host (same host part of its node name: they share the
    local repo root) owns its detector queue in ``assignment`` and it has been idle for
    ``idle_s`` (``idle`` maps each repo to its idle seconds). An empty assignment (the
    controller's record is missing) deletes nothing.
    """

    if not assignment:
        return []
    owned: set[tuple[str, int]] = set()
    for worker, queues in assignment.items():
        if same_host(worker, me):
            owned.update(p for p in (parse_detector_queue(q) for q in queues) if p is not None)
    return sorted(repo for repo in existing if repo not in owned and idle.get(repo, 0.0) >= idle_s)


def datasets_to_drop(entries: Mapping[str, CacheEntry], budget: int, max_age_s: float,
                     now: float) -> list[str]:
    """Cached dataset ids to drop: unused for ``max_age_s``, then least recently used past ``budget``."""
    old = {key for key, entry in entries.items() if now - entry.last_used >= max_age_s}
    rest = {key: entry for key, entry in entries.items() if key not in old}
    return sorted(old) + choose_evictions(rest, (), budget)


# --------------------------------------------------------------------------- on each worker


def _idle_seconds(path: Path, now: float) -> float:
    """Seconds since anything at the top of a repo changed (its cache index, registry, itself)."""
    stamps = [path.stat().st_mtime]
    for name in (CacheIndex.FILENAME, "gen3.sqlite3"):
        if (path / name).exists():
            stamps.append((path / name).stat().st_mtime)
    return max(0.0, now - max(stamps))


def _drop_datasets(path: Path, dataset_ids: list[str]) -> int:
    """Prune ``dataset_ids`` from the local repo at ``path`` and forget them in its cache index."""
    import uuid

    from lsst.daf.butler import Butler

    butler = Butler.from_config(str(path), writeable=True)
    try:
        refs = butler.get_many_datasets([uuid.UUID(hex=h) for h in dataset_ids])
        if refs:
            butler.pruneDatasets(refs, disassociate=True, unstore=True, purge=True)
    finally:
        butler.close()
    cache = CacheIndex(path)
    cache.remove(dataset_ids)
    cache.save()
    return len(dataset_ids)


def housekeep_local(settings: Settings, me: str, assignment: Mapping[str, Iterable[str]],
                    now: float | None = None) -> dict[str, Any]:
    """Housekeeping of this worker's local repos (the body of the control command)."""

    now = time.time() if now is None else now
    repos = Repos(settings)
    try:
        existing = {(inst, det): path for inst, det, path in repos.existing()}
        idle = {repo: _idle_seconds(path, now) for repo, path in existing.items()}
        deleted = []
        for inst, det in repos_to_delete(existing, assignment, me, idle, settings.repo_idle_s):
            if repos.purge(inst, det):
                deleted.append(f"{inst}/{det}")
        dropped = 0
        for repo, path in existing.items():
            if f"{repo[0]}/{repo[1]}" in deleted or idle[repo] < _BUSY_S:
                continue
            drop = datasets_to_drop(CacheIndex(path).entries, settings.local_cache_bytes,
                                    settings.cache_max_age_s, now)
            if drop:
                dropped += _drop_datasets(path, drop)
    finally:
        repos.close()
    if deleted or dropped:
        log.info("housekeeping: deleted %d local repos, dropped %d cached datasets", len(deleted), dropped)
    return {"deleted": deleted, "dropped": dropped, "repos": len(existing)}


@control_command(
    args=[("assignment", json.loads)],
    signature="<assignment JSON>",
)
def prompt_housekeeping(state: Any, assignment: Any = None) -> dict[str, Any]:
    """Remote-control command: drop stale cache entries and repos of detectors not owned here."""

    consumer = state.consumer
    me = str(getattr(consumer, "hostname", "") or "")
    settings = settings_of(consumer.app)
    try:
        return {"ok": True, **housekeep_local(settings, me, assignment or {})}
    except Exception as exc:
        log.exception("housekeeping failed")
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def broadcast_housekeeping(app: Celery, ctx: Context, timeout: float = 10.0) -> dict[str, Any]:
    """Ask every compute worker to housekeep (the beat job); the replies by node name."""

    assignment = read_assignment(ctx.redis)
    replies = app.control.broadcast(COMMAND, arguments={"assignment": assignment}, reply=True,
                                    timeout=timeout) or []
    out: dict[str, Any] = {}
    for reply in replies:
        for node, answer in reply.items():
            if node.startswith(WORKER_PREFIX):
                out[node] = answer
    return out


# --------------------------------------------------------------------------- Redis sweeps


def expiry_sweep(client: redis.Redis, settings: Settings, now: float | None = None) -> dict[str, int]:
    """Remove expired entries from the indexes and give every index key a TTL; counts."""

    now = time.time() if now is None else now
    horizon = now - settings.ledger_ttl_s
    removed = int(client.zremrangebyscore(VISITS_RECENT, "-inf", horizon))
    removed += int(client.zremrangebyscore(VISITS_INFLIGHT, "-inf", horizon))
    gone = 0
    for index in (VISITS_INFLIGHT, VISITS_RECENT):
        for member in client.zrange(index, 0, -1):
            instrument, _, group = str(member).partition("/")
            if not client.exists(visit_key(instrument, group)):
                client.zrem(index, member)
                gone += 1
    ttl_set = 0
    for pattern in _EXPIRING_PATTERNS:
        ttl = settings.ledger_ttl_s if pattern == "visit:*" else settings.arrival_ttl_s
        for key in client.scan_iter(match=pattern, count=500):
            if client.ttl(key) == -1:
                client.expire(key, ttl)
                ttl_set += 1
    settled = 0
    for rec in catchup.list_records(client, ["done", "abandoned"]):
        if (rec.resolved_at or rec.last_attempt or rec.failed_at) < horizon:
            client.hdel(CATCHUP_RECORDS, rec.key)
            settled += 1
    return {"index_removed": removed + gone, "ttl_set": ttl_set, "catchup_removed": settled}
