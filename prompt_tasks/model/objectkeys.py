"""Object-key schemes: where a raw's instrument, detector, group and snap live in its key.

The first path element of every key names the instrument; the instrument's scheme does the
rest. Two schemes ship:

- :class:`Dmtn219Scheme` (the default, DMTN-219): ``instrument/detector/group/snap/filename``,
  detector first so keys spread over prefixes. Group ids are ISO timestamps and carry ``:``.
- :class:`LsstCamScheme`, Rubin's own ``LSSTCam/<day_obs>/<obs_id>/<obs_id>_Rxx_Syy.fits``
  keys, whose group (and snap, and image type) are in a JSON sidecar next to the image,
  ``<obs_id>_Rxx_Syy.json``.

An instrument plugin supplies its own scheme with :func:`register_scheme`. Parsing is pure:
a scheme that needs a sidecar says which key to read (:meth:`KeyScheme.sidecar_key`) and is
handed the sidecar's content; the caller does the I/O (see :func:`resolve`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prompt_tasks.errors import InvalidEvent

__all__ = [
    "DEFAULT_SCHEME",
    "Dmtn219Scheme",
    "KeyScheme",
    "LsstCamScheme",
    "NeedsSidecar",
    "SnapKey",
    "format_key",
    "instrument_of",
    "parse_key",
    "register_scheme",
    "registered_schemes",
    "resolve",
    "scheme_for",
    "scheme_named",
]


@dataclass(frozen=True)
class SnapKey:
    """What an object key says about the raw it holds."""

    instrument: str
    detector: int
    group: str
    snap: int
    filename: str


class NeedsSidecar(InvalidEvent):
    """The key alone does not say the group: read ``sidecar`` and parse again with it."""

    code = "needs_sidecar"

    def __init__(self, key: str, sidecar: str) -> None:
        super().__init__(f"{key}: group is in sidecar {sidecar}")
        self.key = key
        self.sidecar = sidecar


class KeyScheme(ABC):
    """How one instrument lays out its raws in the bucket."""

    #: Short name for logs.
    name: str = "scheme"

    @abstractmethod
    def parse(self, key: str, sidecar: Mapping[str, Any] | None = None) -> SnapKey:
        """The snap a decoded ``key`` holds.

        Raises
        ------
        NeedsSidecar
            The group is in a sidecar and ``sidecar`` was not given.
        InvalidEvent
            ``key`` is outside the scheme (or is itself a sidecar).
        """

    @abstractmethod
    def format(self, instrument: str, detector: int, group: str, snap: int,
               filename: str = "raw.fits", **extra: Any) -> str:
        """The key of a raw (for the simulator and the tests)."""

    @abstractmethod
    def listing_prefix(self, instrument: str, group: str, detector: int) -> str:
        """A prefix under which every raw of this detector-visit lies (for a bucket listing)."""

    def sidecar_key(self, key: str) -> str | None:
        """Key of the sidecar describing ``key``, or None when the key says everything."""
        return None

    def sidecar_of(self, key: str) -> str | None:
        """If ``key`` is a sidecar, the image key it describes; else None."""
        return None


class Dmtn219Scheme(KeyScheme):
    """``instrument/detector/group/snap/filename`` (DMTN-219)."""

    name = "dmtn-219"

    def parse(self, key: str, sidecar: Mapping[str, Any] | None = None) -> SnapKey:
        parts = key.split("/", 4)
        if len(parts) != 5 or not all(parts):
            raise InvalidEvent(f"{key!r} is not instrument/detector/group/snap/filename")
        instrument, detector, group, snap, filename = parts
        if not (detector.isdecimal() and snap.isdecimal()):
            raise InvalidEvent(f"{key!r}: detector and snap must be integers")
        return SnapKey(instrument, int(detector), group, int(snap), filename)

    def format(self, instrument: str, detector: int, group: str, snap: int,
               filename: str = "raw.fits", **extra: Any) -> str:
        if "/" in group or "/" in instrument:
            raise ValueError("instrument and group may not contain '/'")
        return f"{instrument}/{detector}/{group}/{snap}/{filename}"

    def listing_prefix(self, instrument: str, group: str, detector: int) -> str:
        return f"{instrument}/{detector}/{group}/"


# LSSTCam detector numbering: science rafts in order, 9 sensors each, then the corner rafts'
# guide (SG0, SG1) and wavefront (SW0, SW1) sensors.
_SCIENCE_RAFTS = [f"R{x}{y}" for x in range(5) for y in range(5)
                  if (x, y) not in {(0, 0), (0, 4), (4, 0), (4, 4)}]
_CORNER_RAFTS = ["R00", "R04", "R40", "R44"]
_LSSTCAM_DETECTORS: dict[str, int] = {
    f"{raft}_S{sx}{sy}": i * 9 + sx * 3 + sy
    for i, raft in enumerate(_SCIENCE_RAFTS) for sx in range(3) for sy in range(3)
}
_LSSTCAM_DETECTORS.update({
    f"{raft}_{sensor}": 189 + i * 4 + j
    for i, raft in enumerate(_CORNER_RAFTS) for j, sensor in enumerate(("SG0", "SG1", "SW0", "SW1"))
})
_LSSTCAM_NAMES = {number: name for name, number in _LSSTCAM_DETECTORS.items()}


class LsstCamScheme(KeyScheme):
    """Rubin's ``<instrument>/<day_obs>/<obs_id>/<obs_id>_Rxx_Syy.fits`` with a JSON sidecar.

    The sidecar (the image key with its extension replaced by ``.json``) holds the image's
    header: ``GROUPID`` is the group, ``CURINDEX`` (1-based) the snap.
    """

    name = "lsstcam"
    _image = re.compile(
        r"^(?P<instrument>[^/]+)/(?P<day_obs>\d{8})/(?P<obs_id>[^/]+)/"
        r"(?P=obs_id)_(?P<raft_sensor>R\d\d_S[0-9GW]\d)(?P<extension>\.f[^/]*)$"
    )
    _sidecar = re.compile(
        r"^(?P<stem>[^/]+/\d{8}/(?P<obs_id>[^/]+)/(?P=obs_id)_R\d\d_S[0-9GW]\d)\.json$"
    )

    def _match(self, key: str) -> re.Match[str]:
        match = self._image.match(key)
        if match is None or match["raft_sensor"] not in _LSSTCAM_DETECTORS:
            raise InvalidEvent(f"{key!r} is not <instrument>/<day_obs>/<obs_id>/<obs_id>_Rxx_Syy.fits")
        return match

    def parse(self, key: str, sidecar: Mapping[str, Any] | None = None) -> SnapKey:
        match = self._match(key)
        if sidecar is None:
            raise NeedsSidecar(key, self.sidecar_key(key) or "")
        group = sidecar.get("GROUPID")
        if not isinstance(group, str) or not group:
            raise InvalidEvent(f"{key!r}: sidecar has no GROUPID")
        try:
            snap = max(int(sidecar.get("CURINDEX") or 1) - 1, 0)
        except (TypeError, ValueError) as exc:
            raise InvalidEvent(f"{key!r}: sidecar CURINDEX is not an integer") from exc
        filename = key.rsplit("/", 1)[1]
        return SnapKey(match["instrument"], _LSSTCAM_DETECTORS[match["raft_sensor"]], group, snap, filename)

    def sidecar_key(self, key: str) -> str | None:
        match = self._match(key)
        return key.removesuffix(match["extension"]) + ".json"

    def sidecar_of(self, key: str) -> str | None:
        match = self._sidecar.match(key)
        return None if match is None else match["stem"] + ".fits"

    def format(self, instrument: str, detector: int, group: str, snap: int,
               filename: str = "raw.fits", **extra: Any) -> str:
        """The key of a raw; ``obs_id`` may be given, else it is made from group and snap."""
        day_obs = extra.get("day_obs") or day_obs_of(group)
        obs_id = extra.get("obs_id") or f"MC_O_{day_obs}_{_seq_of(group, snap):06d}"
        return f"{instrument}/{day_obs}/{obs_id}/{obs_id}_{_LSSTCAM_NAMES[detector]}.fits"

    def listing_prefix(self, instrument: str, group: str, detector: int) -> str:
        try:
            return f"{instrument}/{day_obs_of(group)}/"
        except ValueError:
            return f"{instrument}/"


def day_obs_of(group: str) -> str:
    """Rubin's observing day (``YYYYMMDD``, the date 12 h earlier) of an ISO group id."""
    start = datetime.fromisoformat(group)
    return (start - timedelta(hours=12)).strftime("%Y%m%d")


def _seq_of(group: str, snap: int) -> int:
    """A made-up sequence number for simulated LSSTCam obs_ids (unique per group and snap)."""
    try:
        start = datetime.fromisoformat(group)
        seconds = start.hour * 3600 + start.minute * 60 + start.second
    except ValueError:
        seconds = sum(map(ord, group)) % 86400
    return (seconds * 10 + snap) % 1_000_000


DEFAULT_SCHEME: KeyScheme = Dmtn219Scheme()

#: Scheme name → scheme, for plugins that name their scheme (``key_scheme = "dmtn-219"``).
_NAMED: dict[str, KeyScheme] = {DEFAULT_SCHEME.name: DEFAULT_SCHEME, LsstCamScheme.name: LsstCamScheme()}

#: Instrument name → scheme; instruments not listed use :data:`DEFAULT_SCHEME`.
_SCHEMES: dict[str, KeyScheme] = {"LSSTCam": _NAMED[LsstCamScheme.name]}


def scheme_named(name: str) -> KeyScheme:
    """The shipped scheme called ``name`` (``dmtn-219``, ``lsstcam``); KeyError if none."""
    return _NAMED[name]


def register_scheme(instrument: str, scheme: KeyScheme | str) -> None:
    """Make ``scheme`` (or the shipped scheme of that name) the key scheme of ``instrument``."""
    _SCHEMES[instrument] = scheme_named(scheme) if isinstance(scheme, str) else scheme


def registered_schemes() -> dict[str, KeyScheme]:
    """A copy of the instrument → scheme table (the default scheme is not listed)."""
    return dict(_SCHEMES)


def scheme_for(instrument: str) -> KeyScheme:
    """The key scheme of ``instrument`` (DMTN-219 unless one was registered)."""
    return _SCHEMES.get(instrument, DEFAULT_SCHEME)


def instrument_of(key: str) -> str:
    """The instrument a decoded key belongs to: its first path element."""
    instrument = key.split("/", 1)[0]
    if not instrument or "/" not in key:
        raise InvalidEvent(f"{key!r} has no instrument prefix")
    return instrument


def parse_key(key: str, sidecar: Mapping[str, Any] | None = None) -> SnapKey:
    """Parse a decoded key with its instrument's scheme (raises InvalidEvent, NeedsSidecar)."""
    return scheme_for(instrument_of(key)).parse(key, sidecar)


def format_key(instrument: str, detector: int, group: str, snap: int,
               filename: str = "raw.fits", **extra: Any) -> str:
    """The key of a raw under its instrument's scheme."""
    return scheme_for(instrument).format(instrument, detector, group, snap, filename, **extra)


def resolve(key: str, read_sidecar: Callable[[str], Mapping[str, Any] | None]
            ) -> tuple[SnapKey, Mapping[str, Any] | None]:
    """Parse ``key``, reading its sidecar through ``read_sidecar`` when the scheme needs one.

    Returns the snap and the sidecar's content (None for schemes without sidecars).

    Raises
    ------
    NeedsSidecar
        The sidecar is needed but ``read_sidecar`` returned None (not written yet).
    InvalidEvent
        The key is outside its instrument's scheme.
    """
    scheme = scheme_for(instrument_of(key))
    sidecar_key = scheme.sidecar_key(key)
    if sidecar_key is None:
        return scheme.parse(key), None
    sidecar = read_sidecar(sidecar_key)
    if sidecar is None:
        raise NeedsSidecar(key, sidecar_key)
    return scheme.parse(key, sidecar), sidecar
