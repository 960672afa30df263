"""Pipeline selection: pure tests of the YAML rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from prompt_tasks.butler.selection import (
    RaDecBox,
    SelectionConfigError,
    every_candidate,
    load_selection,
    parse_selection,
    select,
)
from prompt_tasks.model.visit import NextVisit

CONFIG = {
    "instruments": {
        "SimCam": {
            "rules": [
                {"survey": "calib*", "pipelines": ["CalibVerify"]},
                {"survey": "engineering", "pipelines": [None]},
                {
                    "filters": ["simcam-g", "simcam-r"],
                    "regions": [{"ra": [350, 10], "dec": [-10, 10]}],
                    "pipelines": ["ApPipe", "SingleFrame", None],
                },
                {"pipelines": ["SingleFrame", "null", "Trivial"]},
            ]
        }
    }
}


def visit(**fields: object) -> NextVisit:
    values: dict[str, object] = {
        "instrument": "SimCam",
        "groupId": "2026-11-24T01:00:00.000",
        "startTime": 1.8e9,
        "coordinateSystem": 2,
        "position": [0.5, 0.0],
        "filters": "simcam-r",
        "survey": "wide",
        "nimages": 2,
    }
    values.update(fields)
    return NextVisit(**values)  # type: ignore[arg-type]


def names(selection) -> list[str]:
    return [c.name for c in selection.candidates]


def test_region_and_filter_rule_gives_ordered_candidates() -> None:
    config = parse_selection(CONFIG, Path("/p"))
    chosen = select(config, visit())
    assert names(chosen) == ["ApPipe", "SingleFrame"]
    assert chosen.rule == 2
    assert chosen.candidates[0].uri == "/p/ApPipe.yaml"


def test_outside_the_region_falls_to_the_short_pipeline() -> None:
    config = parse_selection(CONFIG, Path("/p"))
    assert names(select(config, visit(position=[180.0, 0.0]))) == ["SingleFrame"]
    assert names(select(config, visit(filters="simcam-i"))) == ["SingleFrame"]
    assert names(select(config, visit(coordinateSystem=1, position=None))) == ["SingleFrame"]


def test_none_ends_the_list_and_ignores_the_visit() -> None:
    config = parse_selection(CONFIG)
    skipped = select(config, visit(survey="engineering"))
    assert skipped.ignored and skipped.rule == 1
    assert "ignore" in skipped.reason
    # candidates after a None are never tried
    assert "Trivial" not in names(select(config, visit(position=[180.0, 0.0])))


def test_survey_patterns_and_unknown_instrument() -> None:
    config = parse_selection(CONFIG)
    assert names(select(config, visit(survey="calibration"))) == ["CalibVerify"]
    other = select(config, visit(instrument="OtherCam"))
    assert other.ignored and "OtherCam" in other.reason


def test_no_matching_rule_ignores() -> None:
    config = parse_selection({"instruments": {"SimCam": [{"survey": "x", "pipelines": ["A"]}]}})
    chosen = select(config, visit())
    assert chosen.ignored and chosen.rule is None


def test_ra_box_wraps_through_zero() -> None:
    box = RaDecBox(350.0, 10.0, -5.0, 5.0)
    assert box.contains(355.0, 0.0) and box.contains(5.0, 0.0) and box.contains(-2.0, 0.0)
    assert not box.contains(180.0, 0.0) and not box.contains(0.0, 6.0)
    assert RaDecBox(10.0, 20.0, -90.0, 90.0).contains(15.0, 89.0)


def test_healpix_area() -> None:
    from lsst.sphgeom import HealpixPixelization, LonLat, UnitVector3d

    pixel = HealpixPixelization(4).index(UnitVector3d(LonLat.fromDegrees(0.5, 0.0)))
    raw = {"instruments": {"SimCam": [
        {"healpix": {"nside": 16, "pixels": [pixel]}, "pipelines": ["Deep"]},
        {"pipelines": ["Shallow"]},
    ]}}
    config = parse_selection(raw)
    assert names(select(config, visit())) == ["Deep"]
    assert names(select(config, visit(position=[90.0, 45.0]))) == ["Shallow"]


def test_paths_and_subsets(tmp_path: Path) -> None:
    raw = {"instruments": {"SimCam": {"pipelines_dir": "pl", "rules": [
        {"pipelines": ["ApPipe.yaml#isr,detect", "/abs/Other.yaml", "s3://b/x/Remote.yaml"]},
    ]}}}
    chosen = select(parse_selection(raw, tmp_path), visit())
    assert [c.uri for c in chosen.candidates] == [
        f"{tmp_path}/pl/ApPipe.yaml#isr,detect", "/abs/Other.yaml", "s3://b/x/Remote.yaml"]
    assert names(chosen) == ["ApPipe-isr+detect", "Other", "Remote"]


@pytest.mark.parametrize("raw, message", [
    ({}, "instruments"),
    ({"instruments": {"SimCam": {"rules": [{"survey": "x"}]}}}, "pipelines"),
    ({"instruments": {"SimCam": {"rules": [{"pipelines": ["A"], "colour": "red"}]}}}, "unknown"),
    ({"instruments": {"SimCam": {"rules": [{"pipelines": ["A"], "regions": [{"ra": [1]}]}]}}}, "regions[0].ra"),
    ({"instruments": {"SimCam": {"rules": [{"pipelines": ["A"], "healpix": {"nside": 3, "pixels": []}}]}}},
     "power of two"),
    ({"instruments": {"SimCam": {"rules": [{"pipelines": [3]}]}}}, "pipelines[0]"),
])
def test_malformed_config_names_the_entry(raw: object, message: str) -> None:
    with pytest.raises(SelectionConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_selection(raw)


def test_load_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "sel.yaml"
    path.write_text("instruments:\n  SimCam:\n    rules:\n      - pipelines: [ApPipe, ~]\n")
    chosen = select(load_selection(path), visit())
    assert chosen.candidates[0].uri == str(tmp_path / "ApPipe.yaml")


def test_an_ignored_visit_names_the_rules_file_and_the_rule(tmp_path: Path) -> None:
    from prompt_tasks.butler.selection import load_selection, select
    from prompt_tasks.model.visit import parse_next_visit

    path = tmp_path / "pipelines.yaml"
    path.write_text("instruments:\n  SimCam:\n    rules:\n      - survey: ENG*\n        pipelines: [null]\n"
                    "      - pipelines: [Trivial]\n")
    visit = parse_next_visit({"instrument": "SimCam", "groupId": "g", "startTime": 1.0, "survey": "ENGTEST"})
    chosen = select(load_selection(path), visit)
    assert chosen.candidates == () and chosen.rule == 0
    assert str(path) in chosen.reason and "SimCam.rules[0]" in chosen.reason and "survey ENG*" in chosen.reason


def test_every_candidate_once_in_rule_order() -> None:
    config = parse_selection(CONFIG, Path("/pipelines"))
    assert [c.name for c in every_candidate(config)] == ["CalibVerify", "ApPipe", "SingleFrame", "Trivial"]


def test_a_compute_worker_imports_every_pipeline_it_may_run_ahead() -> None:
    import sys

    from prompt_tasks.butler.stages import import_pipeline_tasks
    from prompt_tasks.fleet.roles import detector_hostname, is_compute_node
    from prompt_tasks.settings import Settings

    assert is_compute_node(f"{detector_hostname(3)}@host") and is_compute_node("detector-12")
    assert not any(is_compute_node(n) for n in ("summary@host", "wait@h", "detector-x@h", "detectors-1@h"))
    # SimCam's own selection: every pipeline it names, their task modules imported, nothing opened
    assert set(import_pipeline_tasks(Settings())) >= {"ApPipe", "SingleFrame", "Trivial"}
    assert {"prompt_tasks.science.isr", "prompt_tasks.science.subtract"} <= set(sys.modules)  # ApPipe's tasks



def test_the_registry_writer_imports_the_butler_ahead_and_opens_nothing() -> None:
    import sys

    from prompt_tasks.butler.writer import import_ahead
    from prompt_tasks.fleet.roles import is_writer_node

    assert is_writer_node("summary@host") and is_writer_node("summary")
    assert not any(is_writer_node(n) for n in ("detector-1@host", "wait@h", "intake@h", "summary-2@h"))
    import_ahead()
    assert {"lsst.daf.butler.direct_butler", "lsst.daf.butler.registry.collections.synthIntKey",
            "lsst.daf.butler.datastores.fileDatastore"} <= set(sys.modules)
