"""Pipeline selection: which pipelines a visit may run, in order of preference.

A YAML configuration maps visits to an ordered list of candidate pipelines, per instrument,
by survey, physical filter and sky region::

    instruments:
      MyCam:
        pipelines_dir: .              # where pipeline names are looked up (default: this file's dir)
        rules:
          - survey: "BLOCK-3*"        # fnmatch pattern(s); omitted = any
            filters: [mycam-g, mycam-r]
            regions:                  # any RA/Dec box (deg; ra_min > ra_max wraps through 0)
              - {ra: [140, 160], dec: [-10, 10]}
            healpix: {level: 5, pixels: [1234, 1235]}  # nested HEALPix pixels, optional
            pipelines: [ApPipe, SingleFrame, null]
          - survey: calibration
            pipelines: [CalibVerify]
          - pipelines: [null]         # anything else: ignore the visit

The first rule whose every condition matches gives the candidates; the first candidate whose
quantum graph is non-empty runs (see :mod:`prompt_tasks.butler.execute`), and ``null`` (``None``)
ends the list: reaching it means "ignore this visit". A visit no rule matches is ignored.
A candidate is a pipeline name (``<pipelines_dir>/<name>.yaml``) or a path to a pipeline
YAML file; a path may point into a pipeline (``ApPipe.yaml#isr,calibrate``).

Everything here is pure: parsing a mapping and matching a visit to it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prompt_tasks.model.visit import CoordinateSystem, NextVisit

__all__ = [
    "Candidate",
    "HealpixArea",
    "InstrumentRules",
    "RaDecBox",
    "Rule",
    "Selection",
    "SelectionConfig",
    "SelectionConfigError",
    "every_candidate",
    "load_selection",
    "parse_selection",
    "select",
]


class SelectionConfigError(ValueError):
    """The pipeline selection configuration is malformed."""


@dataclass(frozen=True)
class RaDecBox:
    """A box in RA/Dec (degrees); ``ra_min > ra_max`` wraps through RA 0."""

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float

    def contains(self, ra: float, dec: float) -> bool:
        """True when (ra, dec) lies in the box (edges included)."""
        ra %= 360.0
        lo, hi = self.ra_min % 360.0, self.ra_max % 360.0
        in_ra = lo <= ra <= hi if lo <= hi else (ra >= lo or ra <= hi)
        if self.ra_max - self.ra_min >= 360.0:
            in_ra = True
        return in_ra and self.dec_min <= dec <= self.dec_max


@dataclass(frozen=True)
class HealpixArea:
    """A set of nested HEALPix pixels at one level (``nside = 2**level``)."""

    level: int
    pixels: frozenset[int]

    def contains(self, ra: float, dec: float) -> bool:
        """True when (ra, dec) falls in one of the pixels."""
        from lsst.sphgeom import HealpixPixelization, LonLat, UnitVector3d

        index = HealpixPixelization(self.level).index(UnitVector3d(LonLat.fromDegrees(ra, dec)))
        return index in self.pixels


@dataclass(frozen=True)
class Candidate:
    """One candidate pipeline: a short name and the pipeline URI it loads."""

    name: str
    uri: str


@dataclass(frozen=True)
class Rule:
    """Conditions on a visit and the candidate pipelines it gets (``None`` = ignore)."""

    pipelines: tuple[Candidate | None, ...]
    surveys: tuple[str, ...] = ()
    filters: tuple[str, ...] = ()
    regions: tuple[RaDecBox, ...] = ()
    healpix: HealpixArea | None = None

    def matches(self, visit: NextVisit) -> bool:
        """True when every condition of the rule holds for ``visit``."""
        if self.surveys and not any(fnmatch.fnmatchcase(visit.survey, p) for p in self.surveys):
            return False
        if self.filters and visit.filters not in self.filters:
            return False
        if self.regions or self.healpix is not None:
            position = _sky_position(visit)
            if position is None:
                return False
            if self.regions and not any(box.contains(*position) for box in self.regions):
                return False
            if self.healpix is not None and not self.healpix.contains(*position):
                return False
        return True

    def describe(self) -> str:
        """The rule's conditions in a few words (``survey ENG*, filter r``; ``every visit``)."""
        parts = []
        if self.surveys:
            parts.append("survey " + "|".join(self.surveys))
        if self.filters:
            parts.append("filter " + "|".join(self.filters))
        if self.regions:
            parts.append("a sky region")
        if self.healpix is not None:
            parts.append("a HEALPix area")
        return ", ".join(parts) or "every visit"


@dataclass(frozen=True)
class InstrumentRules:
    """The ordered rules of one instrument."""

    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class SelectionConfig:
    """Pipeline selection for every configured instrument."""

    instruments: Mapping[str, InstrumentRules] = field(default_factory=dict)
    #: Where the rules were read from (named when a rule ignores a visit).
    source: str = ""


@dataclass(frozen=True)
class Selection:
    """What :func:`select` decided for a visit.

    Attributes
    ----------
    candidates
        Pipelines to try, in order (those before the first ``None``).
    rule
        Index of the matching rule, or None when no rule matched.
    reason
        Why the visit is ignored when ``candidates`` is empty.
    """

    candidates: tuple[Candidate, ...]
    rule: int | None
    reason: str = ""

    @property
    def ignored(self) -> bool:
        """True when the visit is to be skipped."""
        return not self.candidates


def _sky_position(visit: NextVisit) -> tuple[float, float] | None:
    """The visit's ICRS (ra, dec), or None when it has none."""
    if visit.position is None or visit.coordinateSystem is not CoordinateSystem.ICRS:
        return None
    return float(visit.position[0]), float(visit.position[1])


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SelectionConfigError(f"{what}: expected a string or a list of strings, got {value!r}")


def _pair(value: Any, what: str) -> tuple[float, float]:
    if not (isinstance(value, Sequence) and len(value) == 2):
        raise SelectionConfigError(f"{what}: expected [min, max], got {value!r}")
    try:
        return float(value[0]), float(value[1])
    except (TypeError, ValueError) as exc:
        raise SelectionConfigError(f"{what}: expected numbers, got {value!r}") from exc


def _box(raw: Any, what: str) -> RaDecBox:
    if not isinstance(raw, Mapping) or set(raw) - {"ra", "dec"}:
        raise SelectionConfigError(f"{what}: expected {{ra: [min, max], dec: [min, max]}}, got {raw!r}")
    ra = _pair(raw.get("ra", [0.0, 360.0]), f"{what}.ra")
    dec = _pair(raw.get("dec", [-90.0, 90.0]), f"{what}.dec")
    if dec[0] > dec[1]:
        raise SelectionConfigError(f"{what}.dec: min {dec[0]} is above max {dec[1]}")
    return RaDecBox(ra[0], ra[1], dec[0], dec[1])


def _healpix(raw: Any, what: str) -> HealpixArea:
    if not isinstance(raw, Mapping) or "pixels" not in raw or ("level" not in raw and "nside" not in raw):
        raise SelectionConfigError(f"{what}: expected {{level: L (or nside: N), pixels: [...]}}")
    if "level" in raw:
        level = int(raw["level"])
    else:
        nside = int(raw["nside"])
        level = nside.bit_length() - 1
        if nside < 1 or 2**level != nside:
            raise SelectionConfigError(f"{what}.nside: {nside} is not a power of two")
    if not 0 <= level <= 17:
        raise SelectionConfigError(f"{what}.level: {level} out of range 0..17")
    try:
        pixels = frozenset(int(p) for p in raw["pixels"])
    except (TypeError, ValueError) as exc:
        raise SelectionConfigError(f"{what}.pixels: expected integers") from exc
    return HealpixArea(level, pixels)


def _candidate(raw: Any, pipelines_dir: Path, what: str) -> Candidate | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "~")):
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise SelectionConfigError(f"{what}: expected a pipeline name, path or null, got {raw!r}")
    text = raw.strip()
    if "://" in text:
        return Candidate(Path(text.split("#", 1)[0]).stem, text)
    path, _, subset = text.partition("#")
    looks_like_path = path.endswith((".yaml", ".yml")) or "/" in path
    file = Path(path) if looks_like_path else Path(f"{path}.yaml")
    if not file.is_absolute():
        file = pipelines_dir / file
    uri = str(file) + (f"#{subset}" if subset else "")
    name = file.stem + (f"-{subset.replace(',', '+')}" if subset else "")
    return Candidate(name, uri)


def _rule(raw: Any, pipelines_dir: Path, what: str) -> Rule:
    known = {"survey", "surveys", "filter", "filters", "regions", "region", "healpix", "pipelines"}
    if not isinstance(raw, Mapping):
        raise SelectionConfigError(f"{what}: expected a mapping, got {raw!r}")
    unknown = set(raw) - known
    if unknown:
        raise SelectionConfigError(f"{what}: unknown keys {sorted(unknown)}")
    if "pipelines" not in raw:
        raise SelectionConfigError(f"{what}: 'pipelines' is required")
    pipelines = raw["pipelines"]
    if pipelines is None or isinstance(pipelines, str):
        pipelines = [pipelines]
    if not isinstance(pipelines, Sequence) or not pipelines:
        raise SelectionConfigError(f"{what}.pipelines: expected a non-empty list")
    regions_raw = raw.get("regions", raw.get("region"))
    if isinstance(regions_raw, Mapping):
        regions_raw = [regions_raw]
    return Rule(
        pipelines=tuple(_candidate(p, pipelines_dir, f"{what}.pipelines[{i}]") for i, p in enumerate(pipelines)),
        surveys=_strings(raw.get("surveys", raw.get("survey")), f"{what}.survey"),
        filters=_strings(raw.get("filters", raw.get("filter")), f"{what}.filters"),
        regions=tuple(_box(r, f"{what}.regions[{i}]") for i, r in enumerate(regions_raw or [])),
        healpix=_healpix(raw["healpix"], f"{what}.healpix") if raw.get("healpix") is not None else None,
    )


def parse_selection(raw: Any, base_dir: Path | None = None) -> SelectionConfig:
    """Build a :class:`SelectionConfig` from the parsed YAML mapping.

    Parameters
    ----------
    raw
        The mapping (``{"instruments": {name: {"rules": [...]}}}``).
    base_dir
        Directory relative pipeline paths are resolved against (the YAML file's).

    Raises
    ------
    SelectionConfigError
        Naming the offending entry.
    """
    base = base_dir or Path(".")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("instruments"), Mapping):
        raise SelectionConfigError("expected a mapping with an 'instruments' mapping")
    instruments: dict[str, InstrumentRules] = {}
    for name, body in raw["instruments"].items():
        what = f"instruments.{name}"
        if isinstance(body, Sequence) and not isinstance(body, str):
            body = {"rules": body}
        if not isinstance(body, Mapping) or not isinstance(body.get("rules"), Sequence):
            raise SelectionConfigError(f"{what}: expected a 'rules' list")
        pipelines_dir = base / str(body.get("pipelines_dir", "."))
        rules = tuple(_rule(r, pipelines_dir, f"{what}.rules[{i}]") for i, r in enumerate(body["rules"]))
        instruments[str(name)] = InstrumentRules(rules)
    return SelectionConfig(instruments)


def every_candidate(config: SelectionConfig) -> list[Candidate]:
    """Every pipeline some rule of ``config`` may choose, each once, in rule order."""
    seen: dict[str, Candidate] = {}
    for rules in config.instruments.values():
        for rule in rules.rules:
            for candidate in rule.pipelines:
                if candidate is not None:
                    seen.setdefault(candidate.uri, candidate)
    return list(seen.values())


def load_selection(path: Path) -> SelectionConfig:
    """Read and parse a selection YAML file (relative pipeline paths: from its directory)."""
    with open(path) as stream:
        raw = yaml.safe_load(stream)
    config = parse_selection(raw, Path(path).resolve().parent)
    return SelectionConfig(config.instruments, source=str(path))


def select(config: SelectionConfig, visit: NextVisit) -> Selection:
    """The candidate pipelines of ``visit``: the first matching rule's, up to the first ``None``."""
    rules = config.instruments.get(visit.instrument)
    if rules is None:
        return Selection((), None, f"no pipelines configured for instrument {visit.instrument}")
    for index, rule in enumerate(rules.rules):
        if not rule.matches(visit):
            continue
        candidates: list[Candidate] = []
        for candidate in rule.pipelines:
            if candidate is None:
                break
            candidates.append(candidate)
        where = f" in {config.source}" if config.source else ""
        reason = "" if candidates else (f"instruments.{visit.instrument}.rules[{index}] ({rule.describe()}){where} "
                                        "says to ignore this visit")
        return Selection(tuple(candidates), index, reason)
    return Selection((), None, "no selection rule matches this visit")
