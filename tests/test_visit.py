"""The next_visit model: both wire forms, every invalid case, field-level errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from prompt_tasks.errors import InvalidVisit
from prompt_tasks.model.visit import (
    CoordinateSystem,
    Dome,
    NextVisit,
    RotationSystem,
    parse_next_visit,
)

GROUP = "2026-11-24T01:00:00.000"


def summit(**overrides: Any) -> dict[str, Any]:
    """A summit-form next_visit, as ScriptQueue publishes it (with private header fields)."""
    body: dict[str, Any] = {
        "private_sndStamp": 1795568400.123,
        "private_rcvStamp": 1795568400.125,
        "private_seqNum": 17,
        "private_identity": "ScriptQueue:1",
        "private_origin": 4242,
        "salIndex": 1,
        "scriptSalIndex": 100017,
        "instrument": "SimCam",
        "groupId": GROUP,
        "coordinateSystem": 2,
        "position": [150.25, -30.5],
        "startTime": 1795568430.0,
        "rotationSystem": 2,
        "cameraAngle": 12.5,
        "filters": "r_03",
        "dome": 2,
        "duration": 32.0,
        "nimages": 2,
        "survey": "BLOCK-365",
        "totalCheckpoints": 0,
    }
    body.update(overrides)
    return body


def fanned_out(detector: int = 4, **overrides: Any) -> dict[str, str]:
    """The same visit as Rubin's fan-out service writes it to a stream: every value a string."""
    body = {key: str(value) for key, value in summit().items()}
    body.update(
        position="[150.25, -30.5]",
        coordinateSystem="ICRS",
        rotationSystem="SKY",
        dome="OPEN",
        detector=str(detector),
    )
    body.update(overrides)
    return body


def errors_of(raw: Any) -> list[dict[str, str]]:
    with pytest.raises(InvalidVisit) as info:
        parse_next_visit(raw)
    errors = info.value.errors
    assert errors, "an invalid visit names at least one field"
    assert str(info.value)
    return errors


def fields_of(raw: Any) -> set[str]:
    return {error["field"] for error in errors_of(raw)}


# --- the summit form ---------------------------------------------------------------------------


def test_summit_form() -> None:
    visit = parse_next_visit(summit())
    assert visit.instrument == "SimCam"
    assert visit.groupId == GROUP
    assert visit.key == f"SimCam/{GROUP}"
    assert visit.coordinateSystem is CoordinateSystem.ICRS
    assert visit.rotationSystem is RotationSystem.SKY
    assert visit.dome is Dome.OPEN
    assert visit.position == (150.25, -30.5)
    assert visit.has_position and visit.ra == 150.25 and visit.dec == -30.5
    assert visit.filters == "r_03" and visit.survey == "BLOCK-365"
    assert visit.nimages == 2 and visit.duration == 32.0 and visit.cameraAngle == 12.5
    assert visit.salIndex == 1 and visit.scriptSalIndex == 100017
    assert visit.expected_end == 1795568430.0 + 32.0 - 37.0  # TAI start, UTC end (TAI - UTC = 37 s)
    assert visit.start_utc == 1795568430.0 - 37.0
    assert visit.detector is None


@pytest.mark.parametrize("raw", [json.dumps(summit()), json.dumps(summit()).encode()])
def test_summit_form_as_text_or_bytes(raw: str | bytes) -> None:
    assert parse_next_visit(raw) == parse_next_visit(summit())


def test_private_fields_kept_where_useful_others_ignored() -> None:
    visit = parse_next_visit(summit(futureField={"a": 1}, private_kafkaStamp=3.0))
    assert visit.private_sndStamp == 1795568400.123
    dumped = visit.model_dump()
    for ignored in ("private_rcvStamp", "private_seqNum", "private_identity", "futureField", "private_kafkaStamp"):
        assert ignored not in dumped


def test_defaults_for_optional_fields() -> None:
    visit = parse_next_visit({"instrument": "SimCam", "groupId": GROUP, "startTime": 1.0})
    assert visit.coordinateSystem is CoordinateSystem.NONE and visit.position is None
    assert visit.nimages == 0 and visit.filters == "" and visit.dome is Dome.EITHER
    assert not visit.has_position and visit.ra is None and visit.dec is None


def test_round_trip_through_json() -> None:
    visit = parse_next_visit(summit())
    again = parse_next_visit(json.dumps(visit.to_json_dict()))
    assert again == visit
    assert visit.to_json_dict()["coordinateSystem"] == 2


def test_model_is_frozen() -> None:
    visit = parse_next_visit(summit())
    with pytest.raises(ValidationError):
        visit.groupId = "other"  # type: ignore[misc]


def test_negative_ra_is_wrapped() -> None:
    visit = parse_next_visit(summit(position=[-10.0, 5.0]))
    assert visit.ra == 350.0


def test_empty_filter_is_allowed() -> None:
    assert parse_next_visit(summit(filters="")).filters == ""


# --- the fan-out (string-valued) form -----------------------------------------------------------


def test_stream_form() -> None:
    visit = parse_next_visit(fanned_out(detector=4))
    assert visit.detector == 4
    assert visit.position == (150.25, -30.5)
    assert visit.coordinateSystem is CoordinateSystem.ICRS
    assert visit.rotationSystem is RotationSystem.SKY and visit.dome is Dome.OPEN
    assert visit.nimages == 2 and visit.startTime == 1795568430.0 and visit.salIndex == 1
    assert visit.without_detector() == parse_next_visit(summit())


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2", CoordinateSystem.ICRS), ("ICRS", CoordinateSystem.ICRS), ("icrs", CoordinateSystem.ICRS),
     (" 1 ", CoordinateSystem.NONE), ("NONE", CoordinateSystem.NONE), (2, CoordinateSystem.ICRS)],
)
def test_enums_by_number_string_or_name(value: Any, expected: CoordinateSystem) -> None:
    assert parse_next_visit(summit(coordinateSystem=value)).coordinateSystem is expected


@pytest.mark.parametrize(("value", "expected"), [("3", Dome.EITHER), ("CLOSED", Dome.CLOSED), ("open", Dome.OPEN)])
def test_dome_by_string(value: str, expected: Dome) -> None:
    assert parse_next_visit(summit(dome=value)).dome is expected


def test_stream_position_with_spaces_and_integers() -> None:
    assert parse_next_visit(fanned_out(position=" [ 10 , -5 ] ")).position == (10.0, -5.0)


# --- NONE coordinates ----------------------------------------------------------------------------


@pytest.mark.parametrize("position", [[0.0, 0.0], [500.0, 100.0], None, []])
def test_none_coordinates_mean_no_position(position: Any) -> None:
    visit = parse_next_visit(summit(coordinateSystem=1, position=position))
    assert visit.position is None
    assert not visit.has_position and visit.ra is None


def test_none_coordinates_in_stream_form() -> None:
    visit = parse_next_visit(fanned_out(coordinateSystem="NONE", position="[0.0, 0.0]"))
    assert visit.position is None and visit.detector == 4


# --- every invalid case --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["instrument", "groupId", "startTime"])
def test_missing_required_field(field: str) -> None:
    body = summit()
    del body[field]
    errors = errors_of(body)
    assert errors == [{"field": field, "reason": "Field required"}]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("instrument", 5),
        ("instrument", ["SimCam"]),
        ("groupId", 12.5),
        ("groupId", None),
        ("startTime", "soon"),
        ("startTime", None),
        ("nimages", "many"),
        ("nimages", 2.5),
        ("nimages", True),
        ("salIndex", False),
        ("duration", {"s": 1}),
        ("cameraAngle", [1]),
        ("filters", 3),
        ("survey", {}),
        ("position", "ra=1,dec=2"),
        ("position", {"ra": 1, "dec": 2}),
        ("position", [1.0]),
        ("position", [1.0, 2.0, 3.0]),
        ("position", ["a", "b"]),
        ("coordinateSystem", "GALACTIC"),
        ("coordinateSystem", 9),
        ("coordinateSystem", 2.5),
        ("coordinateSystem", True),
        ("dome", True),
        ("rotationSystem", False),
        ("nimages", "1_0"),
        ("startTime", "0x10"),
        ("startTime", 5e9),
        ("duration", 1e300),
        ("rotationSystem", "SIDEWAYS"),
        ("dome", 0),
        ("dome", "AJAR"),
        ("detector", -1),
        ("detector", "R22_S11"),
        ("totalCheckpoints", -3),
    ],
)
def test_wrong_type_or_value_names_the_field(field: str, value: Any) -> None:
    errors = errors_of(summit(**{field: value}))
    assert {e["field"].split(".")[0] for e in errors} == {field}, errors


@pytest.mark.parametrize("system", [3, 4, "OBSERVED", "MOUNT", "3"])
def test_unsupported_coordinate_system(system: Any) -> None:
    errors = errors_of(summit(coordinateSystem=system))
    assert len(errors) == 1
    assert errors[0]["field"] == "coordinateSystem"
    assert "unsupported coordinate system" in errors[0]["reason"]


@pytest.mark.parametrize("system", [3, 4, "HORIZON", "MOUNT"])
def test_unsupported_rotation_system(system: Any) -> None:
    errors = errors_of(summit(rotationSystem=system))
    assert errors[0]["field"] == "rotationSystem"
    assert "unsupported rotation system" in errors[0]["reason"]


@pytest.mark.parametrize("position", [[360.0, 0.0], [-181.0, 0.0], [10.0, 90.5], [10.0, -91.0], "[400, 0]"])
def test_out_of_range_position(position: Any) -> None:
    errors = errors_of(summit(position=position))
    assert errors[0]["field"] == "position"
    assert "out of range" in errors[0]["reason"]


@pytest.mark.parametrize("position", [[float("nan"), 0.0], [0.0, float("inf")], "[1e400, 0]"])
def test_non_finite_position(position: Any) -> None:
    fields = fields_of(summit(position=position))
    assert fields and fields <= {"position.0", "position.1"}


def test_icrs_without_position() -> None:
    for position in (None, []):
        errors = errors_of(summit(position=position))
        assert errors[0]["field"] == "position"
        assert "required" in errors[0]["reason"]


@pytest.mark.parametrize(
    "group",
    ["", "a/b", "with space", "tab\there", "new\nline", "nul\x00", "x" * 129],
)
def test_bad_group_id(group: str) -> None:
    assert fields_of(summit(groupId=group)) == {"groupId"}


@pytest.mark.parametrize("instrument", ["", "1Cam", "Sim Cam", "Sim/Cam", "x" * 65, "Cam:1"])
def test_bad_instrument(instrument: str) -> None:
    assert fields_of(summit(instrument=instrument)) == {"instrument"}


@pytest.mark.parametrize(("field", "value"), [("nimages", -1), ("duration", -0.5), ("startTime", -1.0)])
def test_negative_numbers(field: str, value: float) -> None:
    assert fields_of(summit(**{field: value})) == {field}


@pytest.mark.parametrize("field", ["startTime", "duration", "cameraAngle"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), "nan", "inf"])
def test_non_finite_numbers(field: str, value: Any) -> None:
    assert fields_of(summit(**{field: value})) == {field}


def test_absurd_integers() -> None:
    assert fields_of(summit(salIndex=10**30)) == {"salIndex"}
    assert fields_of(summit(nimages=10**6)) == {"nimages"}
    assert fields_of(summit(scriptSalIndex="9" * 5000)) == {"scriptSalIndex"}


def test_several_errors_at_once() -> None:
    body = summit(nimages=-1, filters=7)
    del body["groupId"]
    assert fields_of(body) == {"nimages", "filters", "groupId"}


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        b"\xff\xfe\x00garbage",
        "[" * 100_000,
        '{"a":' * 50_000,
        "1" * 5000,
        "{'single': 'quotes'}",
    ],
)
def test_not_json(raw: str | bytes) -> None:
    errors = errors_of(raw)
    assert errors[0]["field"] == "body"
    assert errors[0]["reason"].startswith("not JSON")


@pytest.mark.parametrize("raw", ["[]", "null", "3", '"text"', json.dumps([summit()]), [summit()], None, 5])
def test_not_an_object(raw: Any) -> None:
    assert errors_of(raw) == [{"field": "body", "reason": "expected a JSON object"}]


def test_deeply_nested_value_inside_an_object() -> None:
    body = summit()
    nested: Any = 1
    for _ in range(5000):
        nested = [nested]
    body["futureField"] = nested
    # An unknown field is ignored however deep it is.
    assert parse_next_visit(body).groupId == GROUP
    body["survey"] = nested
    assert fields_of(body) == {"survey"}


def test_huge_strings() -> None:
    assert fields_of(summit(groupId="g" * 1_000_000)) == {"groupId"}
    assert fields_of(summit(survey="s" * 1_000_000)) == {"survey"}
    assert fields_of(fanned_out(position="[" + "1," * 1000 + "2]")) == {"position"}


def test_error_messages_do_not_echo_values() -> None:
    secret = "hunter2-" + "x" * 20
    for error in errors_of(summit(instrument=[secret], nimages=secret, filters={"k": secret})):
        assert secret not in error["reason"]


def test_model_schema_names_every_sal_field() -> None:
    fields = set(NextVisit.model_fields)
    for name in (
        "salIndex", "scriptSalIndex", "groupId", "coordinateSystem", "position", "startTime",
        "rotationSystem", "cameraAngle", "filters", "dome", "duration", "nimages", "instrument",
        "survey", "totalCheckpoints",
    ):
        assert name in fields
