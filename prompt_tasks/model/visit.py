"""The ``next_visit`` event: a validated model of SAL ``ScriptQueue.logevent_nextVisit``.

Two forms are accepted:

- the summit JSON form (numbers as numbers, ``position`` as ``[ra, dec]``), possibly with
  ``private_*`` header fields;
- the string-valued form Rubin's fan-out service writes to a Redis stream ``instrument:<name>``,
  one message per detector (every value a string, ``position`` as ``"[ra, dec]"``, plus a
  ``detector`` field).

Unknown fields are ignored. Invalid input raises :class:`~prompt_tasks.errors.InvalidVisit`
naming the field and the reason.
"""

from __future__ import annotations

import json
import re
import warnings
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from prompt_tasks.errors import InvalidVisit

__all__ = [
    "CoordinateSystem",
    "Dome",
    "NextVisit",
    "RotationSystem",
    "expected_end_utc",
    "field_errors",
    "parse_next_visit",
    "tai_now",
    "tai_to_utc",
    "visit_differences",
]

#: Largest SAL ``long`` (int32): indices and counters above it are garbage.
_INT32_MAX = 2**31 - 1
#: Longest ``position`` string accepted in the fan-out form.
_POSITION_TEXT_MAX = 256
#: Latest ``startTime`` accepted (2100-01-01, unix s): later is garbage, and would overflow
#: the date arithmetic of the visit's deadline.
_START_TIME_MAX = 4_102_444_800.0
#: Longest script ``duration`` accepted (s).
_DURATION_MAX = 86_400.0
#: A number written as text, as the fan-out service writes them (no ``1_000``, no hex).
_NUMBER_TEXT = re.compile(
    r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*|\s*[+-]?(nan|inf|infinity)\s*", re.IGNORECASE
)


class CoordinateSystem(IntEnum):
    """``coordinateSystem`` of ``position``."""

    NONE = 1
    ICRS = 2
    OBSERVED = 3
    MOUNT = 4


class RotationSystem(IntEnum):
    """``rotationSystem`` of ``cameraAngle``."""

    NONE = 1
    SKY = 2
    HORIZON = 3
    MOUNT = 4


class Dome(IntEnum):
    """Dome state expected during the visit."""

    CLOSED = 1
    OPEN = 2
    EITHER = 3


#: The enumerated fields of a ``next_visit`` and their enums.
_ENUM_FIELDS: dict[str, type[IntEnum]] = {
    "coordinateSystem": CoordinateSystem, "rotationSystem": RotationSystem, "dome": Dome,
}


def _enum_value(enum: type[IntEnum], value: Any) -> Any:
    """Accept an enum member, its integer, the integer as a string, or its name."""
    if isinstance(value, bool):  # pydantic's lax mode would read true as 1
        names = ", ".join(m.name for m in enum)
        raise ValueError(f"expected one of {names}, not a boolean")
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            return enum[text.upper()]
        except KeyError:
            return value
    return value


class NextVisit(BaseModel):
    """One announced visit (or, in the fan-out form, one detector of it)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, allow_inf_nan=False)

    salIndex: int = Field(0, ge=0, le=_INT32_MAX, description="SAL index of the ScriptQueue.")
    scriptSalIndex: int = Field(0, ge=0, le=_INT32_MAX, description="SAL index of the script that sent it.")
    instrument: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    groupId: str = Field(min_length=1, max_length=128, description="Butler group name.")
    coordinateSystem: CoordinateSystem = CoordinateSystem.NONE
    position: tuple[float, float] | None = Field(None, description="[ra, dec] in degrees.")
    startTime: float = Field(description="Start of the first exposure, TAI unix seconds.", ge=0, le=_START_TIME_MAX)
    rotationSystem: RotationSystem = RotationSystem.NONE
    cameraAngle: float = Field(0.0, description="Camera angle, degrees.")
    filters: str = Field("", max_length=64, description="Physical filter; may be empty.")
    dome: Dome = Dome.EITHER
    duration: float = Field(0.0, ge=0, le=_DURATION_MAX, description="Duration of the whole script, seconds.")
    nimages: int = Field(0, ge=0, le=1000, description="Snaps per detector; 0 = unknown.")
    survey: str = Field("", max_length=128)
    totalCheckpoints: int = Field(0, ge=0, le=_INT32_MAX)
    detector: int | None = Field(None, ge=0, le=9999, description="Fan-out form: the one detector meant.")
    private_sndStamp: float | None = Field(None, description="Summit send time (TAI).")

    @field_validator(
        "salIndex", "scriptSalIndex", "startTime", "cameraAngle", "duration", "nimages",
        "totalCheckpoints", "detector", "private_sndStamp", mode="before",
    )
    @classmethod
    def _plain_number(cls, value: Any) -> Any:
        # pydantic's lax mode reads true as 1 and "1_0" as 10: neither is a number here.
        if isinstance(value, bool):
            raise ValueError("expected a number, not a boolean")
        if isinstance(value, str) and not _NUMBER_TEXT.fullmatch(value):
            raise ValueError("expected a number")
        return value

    @field_validator("coordinateSystem", "rotationSystem", "dome", mode="before")
    @classmethod
    def _enumerated(cls, value: Any, info: ValidationInfo) -> Any:
        return _enum_value(_ENUM_FIELDS[str(info.field_name)], value)

    @field_validator("position", mode="before")
    @classmethod
    def _position(cls, value: Any) -> Any:
        if isinstance(value, str):
            if len(value) > _POSITION_TEXT_MAX:
                raise ValueError('expected "[ra, dec]", got a string too long')
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as exc:
                raise ValueError('expected "[ra, dec]"') from exc
        if isinstance(value, list | tuple) and len(value) == 0:
            return None
        return value

    @field_validator("filters", "survey")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("must not contain control characters")
        return value

    @field_validator("groupId")
    @classmethod
    def _group(cls, value: str) -> str:
        if "/" in value or any(ch.isspace() or not ch.isprintable() for ch in value):
            raise ValueError("must not contain '/', spaces or control characters")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _no_position_without_system(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        # coordinateSystem NONE: whatever position was sent means nothing.
        visit = handler(data)
        if visit.coordinateSystem is CoordinateSystem.NONE and visit.position is not None:
            return visit.model_copy(update={"position": None})
        return visit

    @model_validator(mode="after")
    def _geometry(self) -> Self:
        if self.coordinateSystem in (CoordinateSystem.OBSERVED, CoordinateSystem.MOUNT):
            raise ValueError(
                f"coordinateSystem: unsupported coordinate system {self.coordinateSystem.name}: use ICRS or NONE"
            )
        if self.rotationSystem in (RotationSystem.HORIZON, RotationSystem.MOUNT):
            raise ValueError(
                f"rotationSystem: unsupported rotation system {self.rotationSystem.name}: use SKY or NONE"
            )
        if self.coordinateSystem is CoordinateSystem.ICRS:
            if self.position is None:
                raise ValueError("position: required when coordinateSystem is ICRS")
            ra, dec = self.position
            if not (0.0 <= ra < 360.0 or -180.0 <= ra < 0.0):
                raise ValueError(f"position: ra {ra} out of range")
            if not -90.0 <= dec <= 90.0:
                raise ValueError(f"position: dec {dec} out of range")
        return self

    @property
    def key(self) -> str:
        """The visit's identity, ``instrument/groupId``."""
        return f"{self.instrument}/{self.groupId}"

    @property
    def has_position(self) -> bool:
        """True when the visit has a sky position (preload may use spatial data)."""
        return self.coordinateSystem is CoordinateSystem.ICRS and self.position is not None

    @property
    def ra(self) -> float | None:
        """Boresight right ascension (deg, 0..360), or None."""
        return None if not self.has_position else self.position[0] % 360.0  # type: ignore[index]

    @property
    def dec(self) -> float | None:
        """Boresight declination (deg), or None."""
        return None if not self.has_position else self.position[1]  # type: ignore[index]

    @property
    def start_utc(self) -> float:
        """``startTime`` on this machine's clock (UTC unix s; SAL times are TAI)."""
        return tai_to_utc(self.startTime)

    @property
    def expected_end(self) -> float:
        """When the visit's last exposure should be over, UTC unix s (comparable to ``time.time()``)."""
        return expected_end_utc(self.startTime, self.duration)

    def without_detector(self) -> Self:
        """The visit itself, with the fan-out ``detector`` field dropped."""
        return self.model_copy(update={"detector": None})

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready summit form (enums as integers)."""
        return self.model_dump(mode="json", exclude_none=True)


#: Fields a repeated announcement may change without being another visit: the fan-out form's
#: detector, and the summit's send time of a resend.
_REPEATABLE = frozenset({"detector", "private_sndStamp"})


def visit_differences(first: NextVisit, second: NextVisit) -> list[str]:
    """The fields in which ``second`` announces another visit than ``first`` (same key), sorted.

    The fan-out ``detector`` and ``private_sndStamp`` may differ between repeats of one visit.
    """
    one, two = first.to_json_dict(), second.to_json_dict()
    return sorted(name for name in (one.keys() | two.keys()) - _REPEATABLE if one.get(name) != two.get(name))


def tai_now() -> float:
    """The current time as TAI unix seconds (the scale of ``startTime``)."""
    import time

    import erfa

    now = time.time()
    day = datetime.fromtimestamp(now, UTC)
    return now + float(erfa.dat(day.year, day.month, day.day, 0.0))


def tai_to_utc(tai: float) -> float:
    """UTC unix seconds of a TAI unix timestamp (TAI - UTC from the leap-second table).

    Past the table's end ERFA warns of a "dubious year" and keeps the last offset, which is
    the best estimate there is: the warning is expected, not an error.
    """
    import erfa

    day = datetime.fromtimestamp(tai, UTC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", erfa.ErfaWarning)
        return tai - float(erfa.dat(day.year, day.month, day.day, 0.0))


def expected_end_utc(start_tai: float, duration: float) -> float:
    """End of a visit starting at ``start_tai`` (TAI) and lasting ``duration`` s, in UTC unix s."""
    return tai_to_utc(start_tai) + duration


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """``[{"field": ..., "reason": ...}]`` from a pydantic error, readable by people."""
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err.get("loc", ())) or "body"
        reason = str(err.get("msg", "invalid"))
        reason = reason.removeprefix("Value error, ")
        if loc == "body" and ":" in reason:
            head, _, tail = reason.partition(":")
            if head in NextVisit.model_fields:
                loc, reason = head, tail.strip()
        out.append({"field": loc, "reason": reason})
    return out


def parse_next_visit(raw: bytes | str | dict[str, Any]) -> NextVisit:
    """Parse one ``next_visit`` in either form, or raise :class:`InvalidVisit` naming the field."""
    if isinstance(raw, bytes | str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, digits
            raise _invalid([{"field": "body", "reason": f"not JSON ({_short(exc)})"}]) from None
    if not isinstance(raw, dict):
        raise _invalid([{"field": "body", "reason": "expected a JSON object"}])
    try:
        return NextVisit.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(field_errors(exc)) from None
    except RecursionError:  # absurdly nested values inside an object
        raise _invalid([{"field": "body", "reason": "nested too deeply"}]) from None


def _short(exc: BaseException, limit: int = 120) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _invalid(errors: list[dict[str, str]]) -> InvalidVisit:
    """An :class:`InvalidVisit` whose message lists ``errors`` (also kept as ``.errors``)."""
    return InvalidVisit("; ".join(f"{e['field']}: {e['reason']}" for e in errors), errors)
