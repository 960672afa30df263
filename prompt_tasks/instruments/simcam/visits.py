"""SimCam visits: what is observed, when, and the ids derived from it.

A visit is a group of snaps taken at one pointing. All its ids follow from the TAI time of its
first shutter opening (the group id), so the summit simulator, the raw headers and the
translator agree without talking to each other:

- group id: ISO TAI time with milliseconds (``2026-11-24T01:00:00.000``);
- day_obs: ``YYYYMMDD`` of TAI − 12 h;
- visit seq: ``1 + floor(seconds since the day_obs rollover / 10)``;
- exposure seq_num: ``visit_seq * 10 + snap``; exposure id: ``day_obs * 100000 + seq_num``;
- visit id: the exposure id of snap 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from astropy.time import Time

from prompt_tasks.instruments.simcam.geometry import band_of

__all__ = [
    "MAX_SNAPS",
    "READOUT_S",
    "VisitSpec",
    "day_obs_of",
    "day_obs_start",
    "exposure_id",
    "group_id",
    "split_exposure_id",
    "visit_id",
    "visit_seq",
]

#: Snaps per visit the id scheme allows.
MAX_SNAPS = 10
#: Seconds between one snap's shutter close and the next one's open (readout).
READOUT_S = 1.0
#: Offset of the day_obs rollover from TAI midnight.
_ROLLOVER = timedelta(hours=12)


def _tai_datetime(tai_unix: float) -> datetime:
    """A naive datetime reading the TAI clock at ``tai_unix`` (TAI seconds since 1970)."""
    return datetime(1970, 1, 1) + timedelta(seconds=tai_unix)


def group_id(tai_unix: float) -> str:
    """The group id of a visit starting at ``tai_unix`` (ms precision)."""
    return _tai_datetime(round(tai_unix, 3)).isoformat(timespec="milliseconds")


def day_obs_of(tai_unix: float) -> int:
    """Rubin's observing day of a TAI instant, as ``YYYYMMDD``."""
    return int((_tai_datetime(tai_unix) - _ROLLOVER).strftime("%Y%m%d"))


def day_obs_start(day_obs: int) -> float:
    """TAI unix seconds of the start of ``day_obs`` (12:00 TAI)."""
    start = datetime.strptime(str(day_obs), "%Y%m%d") + _ROLLOVER
    return (start - datetime(1970, 1, 1)).total_seconds()


def visit_seq(tai_unix: float) -> int:
    """The visit sequence number within its day."""
    return 1 + int((tai_unix - day_obs_start(day_obs_of(tai_unix))) // 10)


def exposure_id(day_obs: int, seq: int, snap: int) -> int:
    """The exposure id of snap ``snap`` of visit ``seq`` on ``day_obs``."""
    if not 0 <= snap < MAX_SNAPS:
        raise ValueError(f"snap {snap} outside 0..{MAX_SNAPS - 1}")
    return day_obs * 100000 + seq * 10 + snap


def visit_id(day_obs: int, seq: int) -> int:
    """The visit id of visit ``seq`` on ``day_obs``."""
    return exposure_id(day_obs, seq, 0)


def split_exposure_id(exposure: int) -> tuple[int, int, int]:
    """``(day_obs, visit_seq, snap)`` of an exposure id."""
    day_obs, seq_num = divmod(exposure, 100000)
    return day_obs, seq_num // 10, seq_num % 10


@dataclass(frozen=True)
class VisitSpec:
    """One visit as the observatory plans it."""

    #: TAI unix seconds of the first snap's shutter opening.
    start: float
    ra: float
    dec: float
    camera_angle: float
    physical_filter: str
    snaps: int = 2
    #: Exposure time of one snap (s).
    exptime: float = 15.0
    #: Seeing FWHM (arcsec) during the visit.
    seeing: float = 0.8
    survey: str = "SIMSURVEY"
    target: str = "simfield"
    #: ``OBJECT`` for science, else ``BIAS``, ``DARK`` or ``FLAT``.
    imgtype: str = "OBJECT"
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        band_of(self.physical_filter)
        if self.imgtype not in ("OBJECT", "BIAS", "DARK", "FLAT"):
            raise ValueError(f"unknown image type {self.imgtype!r}")
        if not 1 <= self.snaps <= MAX_SNAPS:
            raise ValueError(f"a SimCam visit has 1..{MAX_SNAPS} snaps, not {self.snaps}")

    @property
    def band(self) -> str:
        """The band of the filter."""
        return band_of(self.physical_filter)

    @property
    def group(self) -> str:
        """The group id (``next_visit.groupId``)."""
        return group_id(self.start)

    @property
    def day_obs(self) -> int:
        """The observing day."""
        return day_obs_of(self.start)

    @property
    def seq(self) -> int:
        """The visit sequence number within the day."""
        return visit_seq(self.start)

    @property
    def visit(self) -> int:
        """The Butler visit id."""
        return visit_id(self.day_obs, self.seq)

    def exposure(self, snap: int) -> int:
        """The Butler exposure id of ``snap``."""
        return exposure_id(self.day_obs, self.seq, snap)

    def snap_begin(self, snap: int) -> float:
        """TAI unix seconds of ``snap``'s shutter opening."""
        return self.start + snap * (self.exptime + READOUT_S)

    def snap_end(self, snap: int) -> float:
        """TAI unix seconds of ``snap``'s shutter closing."""
        return self.snap_begin(snap) + self.exptime

    @property
    def duration(self) -> float:
        """Seconds from the first shutter opening to the last readout's end."""
        return self.snaps * (self.exptime + READOUT_S)

    def time(self, snap: int = 0) -> Time:
        """Mid-exposure time of ``snap`` as an astropy TAI Time."""
        return Time((self.snap_begin(snap) + self.exptime / 2), format="unix_tai", scale="tai")
