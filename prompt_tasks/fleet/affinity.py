"""Which compute worker consumes which detector queue: bounded-load rendezvous hashing.

Each (queue, worker) pair gets a pseudo-random score; a queue prefers the workers in score
order (rendezvous, or highest-random-weight, hashing), so the same detector lands on the same
worker visit after visit. A load cap keeps the fleet balanced: no worker gets more than
``ceil(queues / workers)`` queues (and none fewer than ``floor(queues / workers)``).

:func:`target_assignment` is the assignment a set of workers should converge to, a pure
function of the queues and the workers. :func:`rebalance` goes from the current assignment to
a valid one moving only what it must: when workers leave, only their queues move (survivors
keep theirs unless the load bounds force otherwise); when a worker (re)joins, the fleet goes
back to the target assignment, so a restarted worker gets its old queues again and a new one
takes its share (old workers swap only the few queues the bounded target shifts).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

__all__ = ["assignment_by_worker", "bounds", "moves", "rebalance", "score", "target_assignment"]


def score(queue: str, worker: str) -> int:
    """The rendezvous score of ``worker`` for ``queue`` (higher is preferred)."""
    return int.from_bytes(hashlib.blake2b(f"{queue}|{worker}".encode(), digest_size=8).digest(), "big")


def bounds(n_queues: int, n_workers: int) -> tuple[int, int]:
    """(floor, cap): the fewest and most queues a worker may hold."""
    if n_workers <= 0:
        return 0, 0
    return n_queues // n_workers, -(-n_queues // n_workers)


def _preference(queue: str, workers: Iterable[str]) -> list[str]:
    return sorted(workers, key=lambda w: (score(queue, w), w), reverse=True)


def target_assignment(queues: Iterable[str], workers: Iterable[str]) -> dict[str, str]:
    """Queue → worker: each queue, in name order, to its best-scoring worker with room.

    Room is the cap for as many workers as the queues do not divide evenly over, the floor for
    the others: every worker ends between the floor and the cap.
    """
    workers = sorted(set(workers))
    queues = sorted(set(queues))
    if not workers:
        return {}
    floor, cap = bounds(len(queues), len(workers))
    # Exactly len(queues) % len(workers) workers may reach the cap; the rest stop at the floor,
    # so that every worker gets at least the floor.
    at_cap_allowed = len(queues) - floor * len(workers)
    at_cap = 0
    load = dict.fromkeys(workers, 0)
    owner: dict[str, str] = {}
    for queue in queues:
        limit = cap if at_cap < at_cap_allowed else floor
        worker = next(w for w in _preference(queue, workers) if load[w] < limit)
        owner[queue] = worker
        load[worker] += 1
        if load[worker] == cap and cap > floor:
            at_cap += 1
    return owner


def rebalance(queues: Iterable[str], workers: Iterable[str],
              current: Mapping[str, str] | None = None,
              joined: Iterable[str] | None = None) -> dict[str, str]:
    """Queue → worker for ``workers``, starting from ``current`` and moving as little as it can.

    When a worker ``joined`` (by default: when a worker holds nothing in ``current``), the
    answer is the target assignment: the joiner gets its queues, a restarted worker its old
    ones, and old workers swap only the few queues the bounded target shifts. When workers
    only left:

    1. queues whose owner is still a worker stay there;
    2. a worker above the cap gives up its queues that target another worker first;
    3. unowned queues go to their target worker if it has room, else to the best-scoring one
       with room;
    4. a worker below the floor takes the queues that target it, then the best-scoring ones
       of the most loaded workers, until it reaches the floor.
    """
    workers = sorted(set(workers))
    queues = sorted(set(queues))
    if not workers:
        return {}
    floor, cap = bounds(len(queues), len(workers))
    target = target_assignment(queues, workers)
    alive = set(workers)
    owner = {q: w for q, w in (current or {}).items() if q in target and w in alive}
    held: dict[str, list[str]] = {w: [] for w in workers}
    for queue, worker in sorted(owner.items()):
        held[worker].append(queue)
    joiners = {w for w in workers if not held[w]} if joined is None else set(joined) & alive
    if joiners:
        return dict(sorted(target.items()))
    # 2. shed load above the cap: queues targeting elsewhere first, then the worst-scoring.
    for worker in workers:
        excess = len(held[worker]) - cap
        if excess <= 0:
            continue
        ranked = sorted(held[worker], key=lambda q: (target[q] == worker, score(q, worker), q))
        for queue in ranked[:excess]:
            held[worker].remove(queue)
            del owner[queue]
    # 3. place the unowned queues.
    for queue in queues:
        if queue in owner:
            continue
        choices = [target[queue], *_preference(queue, workers)]
        worker = next(w for w in choices if len(held[w]) < cap)
        owner[queue] = worker
        held[worker].append(queue)
    # 4. lift workers below the floor.
    for worker in workers:
        while len(held[worker]) < floor:
            donors = [w for w in workers if len(held[w]) > floor and w != worker]
            wanted = [q for q in queues if target[q] == worker and owner[q] in donors]
            if not wanted:
                richest = max(donors, key=lambda w: (len(held[w]), w))
                wanted = sorted(held[richest], key=lambda q: (score(q, worker), q), reverse=True)
            queue = wanted[0]
            held[owner[queue]].remove(queue)
            owner[queue] = worker
            held[worker].append(queue)
    return dict(sorted(owner.items()))


def assignment_by_worker(owner: Mapping[str, str], workers: Iterable[str] = ()) -> dict[str, list[str]]:
    """Worker → its queues (sorted), listing ``workers`` that hold none too."""
    out: dict[str, list[str]] = {w: [] for w in workers}
    for queue, worker in owner.items():
        out.setdefault(worker, []).append(queue)
    return {w: sorted(qs) for w, qs in sorted(out.items())}


def moves(before: Mapping[str, str], after: Mapping[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(queue, old worker, new worker) of every queue whose owner changed."""
    out = []
    for queue in sorted(set(before) | set(after)):
        old, new = before.get(queue), after.get(queue)
        if old != new:
            out.append((queue, old, new))
    return out
