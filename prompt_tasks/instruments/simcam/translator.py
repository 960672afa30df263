"""Raw FITS header → the Butler dimension records that make the raw processable.

Ingest without obs_base: a raw needs ``day_obs``, ``group`` and ``exposure`` records; a science
raw also needs ``visit``, ``visit_definition``, ``visit_system_membership`` and the
``visit_detector_region`` of its detector. Missing any of the visit records gives an **empty
quantum graph and no error**, so :func:`records_from_header` always returns them for science
exposures. Records are plain dicts in insertion order (:data:`RECORD_ORDER`); insert them with
``insertDimensionData(..., skip_existing=True)`` so snaps and detectors of one visit share them.

The visit spans from the first snap's shutter opening to the last snap's closing; all times
are TAI. Header times become timespans in integer nanoseconds (:func:`tai_nsec`), not through
``astropy.time``: translating a raw is on every snap's path, and the astropy route cost most of it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import astropy.units as u
from astropy.time import Time
from lsst.daf.butler import Timespan
from lsst.daf.butler.time_utils import TimeConverter

from prompt_tasks.instruments.simcam.geometry import focal_plane
from prompt_tasks.instruments.simcam.instrument import INSTRUMENT
from prompt_tasks.instruments.simcam.visits import (
    READOUT_S,
    split_exposure_id,
    visit_id,
)

__all__ = ["OBSERVATION_TYPES", "RECORD_ORDER", "VISIT_SYSTEM", "day_obs_timespan", "records_from_header", "tai_nsec"]

#: Insertion order (foreign keys first).
RECORD_ORDER: tuple[str, ...] = ("day_obs", "group", "exposure", "visit", "visit_definition",
                                 "visit_system_membership", "visit_detector_region")
#: IMGTYPE → Butler observation_type.
OBSERVATION_TYPES: dict[str, str] = {"OBJECT": "science", "BIAS": "bias", "DARK": "dark", "FLAT": "flat"}
#: The visit system visits are defined in (``by-group``).
VISIT_SYSTEM = 1
#: Shortest exposure timespan recorded, ns (zero-second biases still last this long).
_MIN_SPAN_NS = 1_000_000
#: The origin of Butler timespans: 1970-01-01 00:00:00 TAI.
_TAI_ORIGIN = datetime(1970, 1, 1)
_NS = 1_000_000_000


def tai_nsec(isot: str) -> int:
    """A TAI ISO time (``2026-11-24T04:00:00.123``) as nanoseconds since 1970-01-01 TAI, the unit
    of a Butler ``Timespan``.

    Integer arithmetic (TAI has no leap seconds) equal to daf_butler's own conversion of the
    astropy ``Time``; a time finer than the microsecond goes through astropy.
    """
    if len(isot.partition(".")[2]) > 6:
        return TimeConverter().astropy_to_nsec(Time(isot, format="isot", scale="tai"))
    delta = datetime.fromisoformat(isot) - _TAI_ORIGIN
    return (delta.days * 86_400 + delta.seconds) * _NS + delta.microseconds * 1_000


def _timespan(begin_ns: int, end_ns: int) -> Timespan:
    """The timespan [begin, end) in TAI nanoseconds (``end`` after ``begin``)."""
    return Timespan(None, None, _nsec=(begin_ns, end_ns))  # daf_butler's own constructor from ns


@functools.lru_cache(maxsize=64)
def day_obs_timespan(day_obs: int) -> Timespan:
    """The observing day ``day_obs`` as a TAI timespan (12:00 to 12:00 TAI); remembered, as every
    raw of the night asks for the same one (a Timespan is immutable)."""
    start = datetime.strptime(str(day_obs), "%Y%m%d") + timedelta(hours=12)
    begin = Time(start.isoformat(), scale="tai")
    return Timespan(begin, begin + 1 * u.day)


def records_from_header(header: Mapping[str, Any], *, all_detectors: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The dimension records of one raw, by element, in :data:`RECORD_ORDER`.

    Parameters
    ----------
    header
        The raw's primary header (an ``astropy.io.fits.Header`` or a dict).
    all_detectors
        Give the ``visit_detector_region`` of every detector of the camera, not only the
        raw's own (for a central repository).
    """
    exp_id = int(header["EXPID"])
    day_obs = int(header["DAYOBS"])
    _, seq, snap = split_exposure_id(exp_id)
    group = str(header["GROUPID"])
    physical_filter = str(header["FILTER"])
    imgtype = str(header["IMGTYPE"]).upper()
    observation_type = OBSERVATION_TYPES.get(imgtype, imgtype.lower())
    exptime = float(header["EXPTIME"])
    begin = tai_nsec(str(header["DATE-BEG"]))
    # A zero-length timespan is empty and overlaps nothing (a bias would find no calibration).
    end = max(tai_nsec(str(header["DATE-END"])), begin + _MIN_SPAN_NS)
    ra, dec, angle = float(header["RA"]), float(header["DEC"]), float(header["ROTPA"])
    zenith = 90.0 - float(header.get("ELSTART", 90.0))
    azimuth = float(header.get("AZSTART", 0.0))
    science = observation_type == "science"
    reason = str(header.get("REASON", "science" if science else "calibration"))
    program = str(header.get("PROGRAM", ""))
    target = str(header.get("OBJECT", ""))
    records: dict[str, list[dict[str, Any]]] = {
        "day_obs": [{"instrument": INSTRUMENT, "id": day_obs, "timespan": day_obs_timespan(day_obs)}],
        "group": [{"instrument": INSTRUMENT, "name": group}],
        "exposure": [{
            "instrument": INSTRUMENT, "id": exp_id, "obs_id": str(header["OBSID"]),
            "physical_filter": physical_filter, "group": group, "day_obs": day_obs,
            "exposure_time": exptime, "dark_time": float(header["DARKTIME"]),
            "observation_type": observation_type, "observation_reason": reason,
            "seq_num": int(header["SEQNUM"]), "seq_start": int(header["SEQNUM"]) - snap,
            "seq_end": int(header["SEQNUM"]) - snap + int(header.get("MAXINDEX", 1)) - 1,
            "target_name": target, "science_program": program,
            "tracking_ra": ra if science else None, "tracking_dec": dec if science else None,
            "sky_angle": angle if science else None, "azimuth": azimuth, "zenith_angle": zenith,
            "has_simulated": True, "can_see_sky": science, "timespan": _timespan(begin, end),
        }],
    }
    if not science:
        return records
    nsnaps = int(header.get("MAXINDEX", 1))
    visit = visit_id(day_obs, seq)
    group_begin = tai_nsec(group)
    visit_end = group_begin + round(((nsnaps - 1) * (exptime + READOUT_S) + exptime) * _NS)
    size = int(header["NAXIS1"])
    n_detectors = max(int(header.get("CAMDETS", 9)), int(header["DETECTOR"]) + 1)
    plane = focal_plane(n_detectors, size)
    detectors = range(n_detectors) if all_detectors else [int(header["DETECTOR"])]
    records["visit"] = [{
        "instrument": INSTRUMENT, "id": visit, "name": group, "physical_filter": physical_filter,
        "day_obs": day_obs, "seq_num": int(header["SEQNUM"]) - snap, "exposure_time": exptime * nsnaps,
        "target_name": target, "observation_reason": reason, "science_program": program,
        "azimuth": azimuth, "zenith_angle": zenith, "timespan": _timespan(group_begin, visit_end),
        "region": plane.visit_region(ra, dec, angle),
    }]
    records["visit_definition"] = [{"instrument": INSTRUMENT, "exposure": exp_id, "visit": visit}]
    records["visit_system_membership"] = [{"instrument": INSTRUMENT, "visit_system": VISIT_SYSTEM, "visit": visit}]
    records["visit_detector_region"] = [
        {"instrument": INSTRUMENT, "visit": visit, "detector": det,
         "region": plane.footprint(det, ra, dec, angle)}
        for det in detectors
    ]
    return records
