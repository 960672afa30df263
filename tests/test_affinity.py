"""Bounded-load rendezvous assignment of detector queues to workers (pure)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from prompt_tasks.fleet.affinity import (
    assignment_by_worker,
    bounds,
    moves,
    rebalance,
    target_assignment,
)

QUEUES_189 = [f"detector.LSSTCam.{d:03d}" for d in range(189)]
QUEUES_9 = [f"detector.ComCam.{d:03d}" for d in range(9)]


def _workers(n: int) -> list[str]:
    return [f"detector-{i}@host" for i in range(1, n + 1)]


def _check_balanced(owner: dict[str, str], queues: list[str], workers: list[str]) -> None:
    assert set(owner) == set(queues)
    assert set(owner.values()) <= set(workers)
    floor, cap = bounds(len(queues), len(workers))
    load = Counter(owner.values())
    for worker in workers:
        assert floor <= load[worker] <= cap, (worker, load[worker], floor, cap)


def test_bounds() -> None:
    assert bounds(189, 4) == (47, 48)
    assert bounds(9, 3) == (3, 3)
    assert bounds(9, 2) == (4, 5)
    assert bounds(3, 0) == (0, 0)


def test_target_is_balanced_and_deterministic() -> None:
    for n in (1, 2, 3, 4, 7, 9, 12):
        workers = _workers(n)
        owner = target_assignment(QUEUES_189, workers)
        _check_balanced(owner, QUEUES_189, workers)
        assert owner == target_assignment(reversed(QUEUES_189), list(reversed(workers)))


def test_rebalance_from_nothing_is_the_target() -> None:
    workers = _workers(4)
    assert rebalance(QUEUES_189, workers) == target_assignment(QUEUES_189, workers)


def test_worker_leaving_moves_only_its_queues() -> None:
    workers = _workers(3)
    before = rebalance(QUEUES_9, workers)
    gone = workers[1]
    after = rebalance(QUEUES_9, [w for w in workers if w != gone], before)
    _check_balanced(after, QUEUES_9, [w for w in workers if w != gone])
    moved = moves(before, after)
    assert {q for q, _, _ in moved} == {q for q, w in before.items() if w == gone}
    assert all(old == gone for _, old, _ in moved)


def test_worker_returning_restores_the_assignment() -> None:
    workers = _workers(3)
    original = rebalance(QUEUES_9, workers)
    degraded = rebalance(QUEUES_9, workers[:1] + workers[2:], original)
    restored = rebalance(QUEUES_9, workers, degraded)
    assert restored == original
    # the only queues that move back are the ones that left
    assert {q for q, _, _ in moves(degraded, restored)} == {q for q, w in original.items() if w == workers[1]}


def test_new_worker_takes_queues_only_for_itself() -> None:
    workers = _workers(4)
    before = rebalance(QUEUES_189, workers)
    joined = [*workers, "detector-5@host"]
    after = rebalance(QUEUES_189, joined, before)
    _check_balanced(after, QUEUES_189, joined)
    moved = moves(before, after)
    to_new = [m for m in moved if m[2] == "detector-5@host"]
    assert len(to_new) == Counter(after.values())["detector-5@host"]
    # the bounded target also shifts a few queues between old workers (7 of 189 here)
    assert len(moved) - len(to_new) <= 10
    assert after == target_assignment(QUEUES_189, joined)


def test_no_workers_no_assignment() -> None:
    assert rebalance(QUEUES_9, []) == {}
    assert target_assignment(QUEUES_9, []) == {}


def test_assignment_by_worker_lists_idle_workers() -> None:
    owner = {"q1": "a", "q2": "a"}
    assert assignment_by_worker(owner, ["a", "b"]) == {"a": ["q1", "q2"], "b": []}


_names = st.sets(st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(n_queues=st.integers(0, 60), before=_names, after=_names)
def test_rebalance_always_balanced_and_keeps_what_it_can(n_queues: int, before: set[str], after: set[str]) -> None:
    queues = [f"detector.X.{d:03d}" for d in range(n_queues)]
    start = rebalance(queues, sorted(before))
    _check_balanced(start, queues, sorted(before))
    end = rebalance(queues, sorted(after), start, joined=set(after) - set(before))
    _check_balanced(end, queues, sorted(after))
    assert end == rebalance(queues, sorted(after), start, joined=set(after) - set(before))  # deterministic
    if set(after) < set(before):  # only departures: survivors keep their queues
        assert all(old not in after for _, old, _ in moves(start, end))
    if set(after) > set(before):  # arrivals: back to the target (newcomers get their share)
        assert end == target_assignment(queues, sorted(after))


@settings(max_examples=100, deadline=None)
@given(n_queues=st.integers(0, 200), workers=st.sets(st.integers(1, 30), min_size=2, max_size=10), data=st.data())
def test_leaving_and_returning_restores(n_queues: int, workers: set[int], data: st.DataObject) -> None:
    queues = [f"detector.X.{d:03d}" for d in range(n_queues)]
    names = [f"detector-{i}@h" for i in sorted(workers)]
    gone = data.draw(st.sampled_from(names))
    original = rebalance(queues, names)
    degraded = rebalance(queues, [w for w in names if w != gone], original)
    assert rebalance(queues, names, degraded) == original


@settings(max_examples=100, deadline=None)
@given(n_queues=st.integers(0, 60), before=_names, after=_names)
def test_rebalance_settles_in_one_round(n_queues: int, before: set[str], after: set[str]) -> None:
    queues = [f"detector.X.{d:03d}" for d in range(n_queues)]
    start = rebalance(queues, sorted(before))
    end = rebalance(queues, sorted(after), start, joined=set(after) - set(before))
    assert rebalance(queues, sorted(after), end, joined=()) == end


def test_configured_active_detectors_are_the_balanced_queues() -> None:
    from prompt_tasks.fleet.affinity import rebalance
    from prompt_tasks.fleet.controller import configured_queues
    from prompt_tasks.settings import Settings

    queues = configured_queues(Settings(active_detectors="SimCam=3-4"), ["SimCam"])
    assert queues == ["detector.SimCam.003", "detector.SimCam.004"]
    desired = rebalance(queues, ["detector-1@h", "detector-2@h"], {}, joined=set())
    assert sorted(desired.values()) == ["detector-1@h", "detector-2@h"]  # one each
