"""The raw simulator: per detector and snap, the FITS file SimCam would write.

Pixels: the sky (stars, variables, new sources of :class:`~.sky.Sky` at the snap's time)
drawn with the visit's seeing, a sky background by filter, the flat-field response of the
detector's calibration epoch, dark current, Poisson photon noise, full-well saturation,
cosmic rays, then the gain, the epoch's bias frame and read noise, digitised to int32 ADU.
Calibration exposures (``BIAS``, ``DARK``, ``FLAT``) come from the same detector model.

Headers follow LSSTCam's: OBSID, DAYOBS, SEQNUM, GROUPID, CURINDEX/MAXINDEX (1-based snap),
DETECTOR, FILTER, EXPTIME, DARKTIME, DATE-BEG/DATE-END (TAI), RA/DEC, ROTPA, IMGTYPE,
INSTRUME and a TAN WCS. Everything is seeded from the world seed and the exposure id, so the
same inputs give the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable

import numpy as np
from astropy.io import fits
from astropy.time import Time

from prompt_tasks.instruments.simcam import calibs
from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.geometry import (
    PIXEL_SCALE,
    SKY_BRIGHTNESS,
    ZERO_POINTS,
    band_of,
)
from prompt_tasks.instruments.simcam.render import render_points
from prompt_tasks.instruments.simcam.sky import Sky
from prompt_tasks.instruments.simcam.visits import (
    VisitSpec,
    day_obs_of,
    exposure_id,
    group_id,
    visit_seq,
)

__all__ = [
    "CALIBRATION_EXPTIME",
    "CALIBRATION_TYPES",
    "SATURATE_ADU",
    "bleed",
    "simulate_calibration",
    "simulate_snap",
    "simulate_visit",
    "snap_header",
]

#: Image types of calibration exposures.
CALIBRATION_TYPES = ("BIAS", "DARK", "FLAT")
#: Default exposure time of each calibration type (s).
CALIBRATION_EXPTIME = {"BIAS": 0.0, "DARK": 30.0, "FLAT": 5.0}
#: Digitiser ceiling (ADU).
SATURATE_ADU = 65535
#: Cosmic rays per cm²... per pixel per second, roughly 2 per cm² per minute on 10 µm pixels.
_COSMIC_RATE = 3.3e-7
_SITE_LAT, _SITE_LON = -30.2446, -70.7494
_DARK_OVERHEAD_S = 1.0


def _zenith_angle(ra: float, dec: float, tai_unix: float) -> tuple[float, float]:
    """Approximate (azimuth, zenith angle) in degrees at Cerro Pachón (no IERS data)."""
    jd = tai_unix / 86400.0 + 2440587.5
    gmst = (280.46061837 + 360.98564736629 * (jd - 2451545.0)) % 360.0
    ha = math.radians((gmst + _SITE_LON - ra) % 360.0)
    lat, d = math.radians(_SITE_LAT), math.radians(dec)
    alt = math.asin(math.sin(lat) * math.sin(d) + math.cos(lat) * math.cos(d) * math.cos(ha))
    az = math.atan2(-math.sin(ha) * math.cos(d), math.cos(lat) * math.sin(d) - math.sin(lat) * math.cos(d) * math.cos(ha))
    return math.degrees(az) % 360.0, 90.0 - math.degrees(alt)


def _iso(tai_unix: float) -> str:
    return Time(tai_unix, format="unix_tai", scale="tai").isot


def snap_header(config: SimConfig, *, detector: int, start: float, snap: int, nsnaps: int, exptime: float,
                imgtype: str, physical_filter: str, ra: float, dec: float, camera_angle: float,
                survey: str = "SIMSURVEY", target: str = "simfield", group_start: float | None = None
                ) -> fits.Header:
    """The header of one raw: ``start`` is this snap's shutter opening (TAI unix s)."""
    group_start = start if group_start is None else group_start
    day_obs = day_obs_of(group_start)
    seq = visit_seq(group_start)
    exp_id = exposure_id(day_obs, seq, snap)
    seq_num = exp_id % 100000
    det = config.focal_plane[detector]
    end = start + exptime
    az, zd = _zenith_angle(ra, dec, start + exptime / 2)
    band = band_of(physical_filter)
    header = fits.Header()
    cards: list[tuple[str, object, str]] = [
        ("INSTRUME", "SimCam", "instrument"),
        ("TELESCOP", "SimTel", "telescope"),
        ("OBSID", f"SC_O_{day_obs}_{seq_num:06d}", "observation id"),
        ("EXPID", exp_id, "Butler exposure id"),
        ("DAYOBS", str(day_obs), "observing day (TAI - 12 h)"),
        ("SEQNUM", seq_num, "sequence number within the day"),
        ("GROUPID", group_id(group_start), "group (visit) id"),
        ("CURINDEX", snap + 1, "snap index in the group (1-based)"),
        ("MAXINDEX", nsnaps, "snaps in the group"),
        ("IMGTYPE", imgtype, "image type"),
        ("OBJECT", target if imgtype == "OBJECT" else imgtype.lower(), "target"),
        ("PROGRAM", survey, "survey"),
        ("REASON", "science" if imgtype == "OBJECT" else "calibration", "observation reason"),
        ("DETECTOR", detector, "detector id"),
        ("DETNAME", det.name, "raft_sensor"),
        ("RAFTBAY", det.raft, "raft"),
        ("CCDSLOT", det.sensor, "sensor"),
        ("CAMDETS", config.n_detectors, "detectors of the simulated camera"),
        ("FILTER", physical_filter, "physical filter"),
        ("FILTBAND", band, "band"),
        ("EXPTIME", float(exptime), "exposure time (s)"),
        ("DARKTIME", float(exptime + _DARK_OVERHEAD_S), "dark time (s)"),
        ("TIMESYS", "TAI", "time scale of DATE-*"),
        ("DATE-BEG", _iso(start), "shutter open (TAI)"),
        ("DATE-END", _iso(end), "shutter close (TAI)"),
        ("MJD-BEG", Time(start, format="unix_tai", scale="tai").mjd, "shutter open (MJD TAI)"),
        ("MJD-END", Time(end, format="unix_tai", scale="tai").mjd, "shutter close (MJD TAI)"),
        ("RA", float(ra), "boresight RA (deg)"),
        ("DEC", float(dec), "boresight Dec (deg)"),
        ("ROTPA", float(camera_angle), "camera angle on the sky (deg)"),
        ("ROTCOORD", "sky", "rotation system"),
        ("AZSTART", az, "azimuth (deg)"),
        ("ELSTART", 90.0 - zd, "elevation (deg)"),
        ("GAIN", calibs.gain(detector), "e-/ADU"),
        ("RDNOISE", calibs.read_noise(detector), "read noise (e-)"),
        ("SATURATE", int(calibs.BIAS_LEVEL + 0.95 * calibs.FULL_WELL / calibs.gain(detector)), "saturation (ADU)"),
        ("BIASLVL", calibs.BIAS_LEVEL, "nominal bias level (ADU)"),
        ("PIXSCALE", PIXEL_SCALE, "arcsec per pixel"),
    ]
    for key, value, comment in cards:
        header[key] = (value, comment)
    if imgtype == "OBJECT":
        header.update(config.focal_plane.wcs_header(detector, ra, dec, camera_angle))
    return header


def _snap_rng(config: SimConfig, exp_id: int, detector: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, exp_id // 100000, exp_id % 100000, detector])


def _cosmic_rays(rng: np.random.Generator, shape: tuple[int, int], seconds: float) -> np.ndarray:
    """Electrons deposited by cosmic rays: short straight tracks."""
    image = np.zeros(shape, np.float64)
    ny, nx = shape
    for _ in range(int(rng.poisson(_COSMIC_RATE * nx * ny * seconds))):
        x, y = rng.uniform(0, nx), rng.uniform(0, ny)
        length, angle = rng.exponential(6.0) + 1.0, rng.uniform(0, np.pi)
        energy = rng.uniform(2e3, 3e4)
        steps = max(int(length * 2), 1)
        for t in np.linspace(0, length, steps):
            ix, iy = int(x + t * math.cos(angle)), int(y + t * math.sin(angle))
            if 0 <= ix < nx and 0 <= iy < ny:
                image[iy, ix] += energy / steps
    return image


def _fill(segment: np.ndarray, charge: float, full_well: float) -> None:
    """Pour ``charge`` into ``segment`` (in order) up to ``full_well`` per pixel, in place."""
    room = np.maximum(full_well - segment, 0.0)
    cumulative = np.cumsum(room)
    k = int(np.searchsorted(cumulative, charge, side="right"))
    segment[:k] += room[:k]
    if k < len(segment):
        segment[k] += charge - (cumulative[k - 1] if k else 0.0)


def bleed(counts: np.ndarray, full_well: float) -> np.ndarray:
    """Charge above ``full_well`` spills along its column, half up and half down, as in a CCD.

    Charge that reaches the top or bottom edge is lost.
    """
    out = counts.copy()
    for col in np.flatnonzero((out > full_well).any(axis=0)):
        column = out[:, col]
        over = np.flatnonzero(column > full_well)
        half = float((column[over] - full_well).sum()) / 2
        column[over] = full_well
        _fill(column[over[0] - 1::-1] if over[0] > 0 else column[:0], half, full_well)
        _fill(column[over[-1] + 1:], half, full_well)
    return out


def _digitise(config: SimConfig, electrons: np.ndarray, detector: int, epoch: int, darktime: float,
              rng: np.random.Generator, seconds_exposed: float) -> np.ndarray:
    """Add dark current, photon noise, saturation, cosmic rays, gain, bias and read noise."""
    mean = electrons + calibs.dark_rate(config, detector) * darktime
    counts = rng.poisson(np.clip(mean, 0, None)).astype(np.float64)
    counts += _cosmic_rays(rng, counts.shape, darktime)
    counts = bleed(counts, calibs.FULL_WELL)
    adu = counts / calibs.gain(detector) + calibs.bias_frame(config, detector, epoch)
    adu += rng.normal(0.0, calibs.read_noise(detector) / calibs.gain(detector), adu.shape)
    return np.clip(np.rint(adu), 0, SATURATE_ADU).astype(np.int32)


def _to_bytes(data: np.ndarray, header: fits.Header) -> bytes:
    buffer = io.BytesIO()
    fits.PrimaryHDU(data, header=header).writeto(buffer)
    return buffer.getvalue()


def simulate_snap(config: SimConfig, visit: VisitSpec, detector: int, snap: int, sky: Sky | None = None) -> bytes:
    """The raw FITS bytes of ``detector`` for ``snap`` of ``visit`` (calibrations too)."""
    if visit.imgtype != "OBJECT":
        return simulate_calibration(config, visit.imgtype, visit.snap_begin(snap), detector,
                                    visit.physical_filter, exptime=visit.exptime, snap=snap,
                                    nsnaps=visit.snaps, group_start=visit.start, survey=visit.survey)
    sky = sky or Sky(config)
    plane = config.focal_plane
    start = visit.snap_begin(snap)
    header = snap_header(config, detector=detector, start=start, snap=snap, nsnaps=visit.snaps,
                         exptime=visit.exptime, imgtype="OBJECT", physical_filter=visit.physical_filter,
                         ra=visit.ra, dec=visit.dec, camera_angle=visit.camera_angle, survey=visit.survey,
                         target=visit.target, group_start=visit.start)
    band = visit.band
    zp = ZERO_POINTS[band]
    rng = _snap_rng(config, visit.exposure(snap), detector)
    seeing = visit.seeing * float(np.exp(rng.normal(0, 0.03)))
    region = plane.footprint(detector, visit.ra, visit.dec, visit.camera_angle, pad_deg=10 * seeing / 3600.0)
    ra, dec, mag = sky.sources_at(region, band, start + visit.exptime / 2)
    x, y = plane.sky_to_pixel(detector, ra, dec, visit.ra, visit.dec, visit.camera_angle)
    flux = 10 ** (-0.4 * (mag - zp)) * visit.exptime
    shape = (plane[detector].ny, plane[detector].nx)
    sky_level = 10 ** (-0.4 * (SKY_BRIGHTNESS[band] - zp)) * PIXEL_SCALE**2 * visit.exptime
    electrons = sky_level + render_points(shape, x, y, flux, seeing / PIXEL_SCALE)
    epoch = config.epoch_of(start)
    electrons *= calibs.flat_response(config, detector, band, epoch)
    darktime = float(header["DARKTIME"])
    data = _digitise(config, electrons, detector, epoch, darktime, rng, visit.exptime)
    header["SEEING"] = (round(seeing, 4), "true PSF FWHM (arcsec)")
    header["SKYLEVEL"] = (round(sky_level, 3), "true sky background (e-/pixel)")
    header["MAGZERO"] = (zp + 2.5 * math.log10(visit.exptime / calibs.gain(detector)),
                         "true mag of 1 ADU after ISR")
    return _to_bytes(data, header)


def simulate_visit(config: SimConfig, visit: VisitSpec, detectors: Iterable[int] | None = None,
                   snaps: Iterable[int] | None = None, sky: Sky | None = None) -> dict[tuple[int, int], bytes]:
    """Every raw of ``visit``: ``{(detector, snap): FITS bytes}``."""
    sky = sky or Sky(config)
    dets = range(config.n_detectors) if detectors is None else detectors
    snap_list = list(range(visit.snaps) if snaps is None else snaps)
    return {(det, snap): simulate_snap(config, visit, det, snap, sky) for det in dets for snap in snap_list}


def simulate_calibration(config: SimConfig, imgtype: str, start: float, detector: int,
                         physical_filter: str = "SimCam-r", exptime: float | None = None,
                         level_e: float = 20000.0, snap: int = 0, nsnaps: int = 1,
                         group_start: float | None = None, survey: str = "CALIB") -> bytes:
    """A raw calibration exposure (``BIAS``, ``DARK`` or ``FLAT``) starting at ``start``.

    ``snap`` of ``nsnaps`` in the group starting at ``group_start`` (default: ``start``).
    """
    imgtype = imgtype.upper()
    if imgtype not in CALIBRATION_TYPES:
        raise ValueError(f"{imgtype!r} is not one of {CALIBRATION_TYPES}")
    exptime = CALIBRATION_EXPTIME[imgtype] if exptime is None else exptime
    header = snap_header(config, detector=detector, start=start, snap=snap, nsnaps=nsnaps, exptime=exptime,
                         imgtype=imgtype, physical_filter=physical_filter, ra=0.0, dec=-90.0, camera_angle=0.0,
                         group_start=group_start, survey=survey)
    exp_id = int(header["EXPID"])
    rng = _snap_rng(config, exp_id, detector)
    shape = (config.size, config.size)
    epoch = config.epoch_of(start)
    if imgtype == "FLAT":
        electrons = level_e * calibs.flat_response(config, detector, band_of(physical_filter), epoch)
    else:
        electrons = np.zeros(shape, np.float32)
    darktime = float(header["DARKTIME"]) if exptime > 0 else 0.0
    header["DARKTIME"] = darktime
    data = _digitise(config, electrons.astype(np.float64), detector, epoch, darktime, rng, exptime)
    return _to_bytes(data, header)
