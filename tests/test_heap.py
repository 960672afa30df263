"""A settled heap: what is alive at warm-up is frozen, young objects collected less often."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from prompt_tasks.heap import YOUNG_THRESHOLD, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_the_warm_heap_is_frozen_and_young_collections_are_rarer() -> None:
    kept = [[i] for i in range(1000)]
    frozen = settle_heap()
    assert frozen >= len(kept) and gc.get_freeze_count() == frozen
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD


@pytest.mark.usefixtures("restored_gc")
def test_cyclic_garbage_made_after_the_freeze_is_still_collected() -> None:
    settle_heap()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    del a, b
    assert gc.collect() >= 2


@pytest.mark.usefixtures("restored_gc")
def test_garbage_alive_before_is_collected_not_frozen() -> None:
    class Node:
        pass

    a = Node()
    a.me = a  # type: ignore[attr-defined]
    alive = weakref.ref(a)
    del a
    gc.disable()  # only settle_heap collects
    try:
        assert alive() is not None
        settle_heap()
        assert alive() is None
    finally:
        gc.enable()
