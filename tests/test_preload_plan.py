"""Preload planning and cache eviction: pure tests."""

from __future__ import annotations

from pathlib import Path

from prompt_tasks.butler.cache import CacheEntry, CacheIndex, choose_evictions
from prompt_tasks.butler.preload import InputType, PreloadTarget, QueryKind, plan_preload

INPUTS = [
    InputType("raw", frozenset({"instrument", "exposure", "detector"})),
    InputType("bias", frozenset({"instrument", "detector"}), is_calibration=True),
    InputType("flat", frozenset({"instrument", "detector", "physical_filter", "band"}), is_calibration=True),
    InputType("camera", frozenset({"instrument"}), is_calibration=True),
    InputType("template_coadd", frozenset({"skymap", "tract", "patch", "band"}), region_dimension="patch"),
    InputType("sim_refcat", frozenset({"htm7"}), region_dimension="htm7"),
    InputType("skyMap", frozenset({"skymap"})),
    InputType("model", frozenset({"instrument", "detector"})),
]


def test_plan_kinds_and_data_ids() -> None:
    plan = plan_preload(INPUTS, PreloadTarget("SimCam", 4, "SimCam-r", "r"))
    by_name = {q.dataset_type: q for q in plan.queries}
    assert plan.from_visit == ("raw",)
    assert by_name["bias"].kind is QueryKind.CALIBRATION
    assert dict(by_name["bias"].data_id) == {"instrument": "SimCam", "detector": 4}
    assert dict(by_name["flat"].data_id) == {"instrument": "SimCam", "detector": 4, "physical_filter": "SimCam-r"}
    assert dict(by_name["camera"].data_id) == {"instrument": "SimCam"}
    assert by_name["template_coadd"].kind is QueryKind.SPATIAL
    assert by_name["template_coadd"].region_dimension == "patch"
    assert dict(by_name["template_coadd"].data_id) == {"band": "r"}
    assert by_name["sim_refcat"].kind is QueryKind.SPATIAL and dict(by_name["sim_refcat"].data_id) == {}
    assert by_name["skyMap"].kind is QueryKind.SKYMAP
    assert by_name["model"].kind is QueryKind.DATA_ID
    assert plan.to_dict()["queries"][0]["kind"] == "calibration"


def test_unknown_filter_leaves_filter_keys_out() -> None:
    plan = plan_preload(INPUTS, PreloadTarget("SimCam", 1, None, None))
    by_name = {q.dataset_type: q for q in plan.queries}
    assert dict(by_name["flat"].data_id) == {"instrument": "SimCam", "detector": 1}
    assert dict(by_name["template_coadd"].data_id) == {}


def test_evictions_are_lru_and_spare_what_is_needed() -> None:
    entries = {
        "a": CacheEntry("flat", 40, 1.0),
        "b": CacheEntry("flat", 40, 2.0),
        "c": CacheEntry("template_coadd", 40, 3.0),
        "d": CacheEntry("template_coadd", 40, 4.0),
    }
    assert choose_evictions(entries, [], 160) == []
    assert choose_evictions(entries, [], 100) == ["a", "b"]
    assert choose_evictions(entries, ["a"], 100) == ["b", "c"]
    # the visit alone is bigger than the budget: evict everything else, keep what it needs
    assert choose_evictions(entries, ["a", "b", "c"], 10) == ["d"]


def test_cache_index_round_trip(tmp_path: Path) -> None:
    index = CacheIndex(tmp_path)
    index.add("x", "bias", 10, 1.0)
    index.add("y", "flat", 20, 2.0)
    index.touch(["x"], 5.0)
    index.save()
    again = CacheIndex(tmp_path)
    assert again.nbytes == 30 and again.entries["x"].last_used == 5.0
    again.remove(["x"])
    assert list(again.entries) == ["y"]
