"""The synthetic sky: stars, variable stars and new sources, deterministic from one seed.

The sky is generated per HTM level-7 trixel (about 0.3 deg²) from a seed made of the world's
seed and the trixel id, so any region is the same whoever asks for it and in whatever order.

- Stars follow a power-law number count ``log10 N(<m) = const + slope · m`` in r (normalised
  by ``star_density`` at r = 24), with stellar-locus-like colours in u g r i z y.
- A fraction of stars vary sinusoidally (amplitude 0.2-1 mag, periods 2 h-3 d) about the
  magnitude the templates show.
- New sources are absent from the templates; each has recurrent outbursts (1 mag/day rise,
  0.25 mag/day decline, recurrence 5-30 days), so any night has some of them on.

:meth:`Sky.truth` lists the transients a detector sees at a visit: what a difference-imaging
pipeline should find.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from astropy.table import Table, vstack
from lsst.sphgeom import HtmPixelization, Region

from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.geometry import BANDS, FocalPlane
from prompt_tasks.instruments.simcam.visits import VisitSpec

__all__ = ["HTM_LEVEL", "Sky", "colours", "difference_mag", "outburst_mag"]

HTM_LEVEL = 7
_PIXELIZATION = HtmPixelization(HTM_LEVEL)
#: Offset of new-source ids within a trixel's id block (stars use the ids below).
_NEW_ID_OFFSET = 500_000
_ID_BLOCK = 1_000_000
_DAY = 86400.0
#: Magnitudes fainter than this are "off".
FAINT = 30.0


def colours(g_r: np.ndarray) -> dict[str, np.ndarray]:
    """Offsets from r per band for a g−r colour (a rough stellar locus)."""
    g_r = np.asarray(g_r, float)
    return {
        "u": g_r + 0.6 + 1.3 * g_r,
        "g": g_r,
        "r": np.zeros_like(g_r),
        "i": -0.45 * g_r,
        "z": -0.65 * g_r,
        "y": -0.75 * g_r,
    }


def outburst_mag(peak: np.ndarray, period_d: np.ndarray, phase_d: np.ndarray, days: float) -> np.ndarray:
    """Magnitude of recurrent outbursts ``days`` after the reference time."""
    tau = np.mod(days - np.asarray(phase_d), np.asarray(period_d))
    rise = 2.0
    mag = np.where(tau < rise, peak + (rise - tau) * 1.0, peak + 0.25 * (tau - rise))
    return np.where(mag > FAINT, np.inf, mag)


def difference_mag(mag: np.ndarray, ref_mag: np.ndarray) -> np.ndarray:
    """Magnitude of the flux a difference image shows: ``|f(mag) - f(ref_mag)|``."""
    with np.errstate(divide="ignore"):
        flux = np.abs(10 ** (-0.4 * np.asarray(mag, float)) - 10 ** (-0.4 * np.asarray(ref_mag, float)))
        return np.where(flux > 0, -2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.inf)


def _trixel_area_deg2(index: int) -> float:
    a, b, c = (np.array([v.x(), v.y(), v.z()]) for v in _PIXELIZATION.triangle(index).getVertices())
    excess = 2.0 * math.atan2(abs(float(np.dot(a, np.cross(b, c)))), 1.0 + a @ b + b @ c + c @ a)
    return excess * (180.0 / math.pi) ** 2


def _points_in_trixel(index: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points spread over trixel ``index`` (uniform barycentric, then projected)."""
    verts = np.array([[v.x(), v.y(), v.z()] for v in _PIXELIZATION.triangle(index).getVertices()])
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    weights = np.column_stack([1 - s, s * (1 - r2), s * r2])
    xyz = weights @ verts
    xyz /= np.linalg.norm(xyz, axis=1)[:, None]
    ra = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1)))
    return ra, dec


def _contains(region: Region, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Which of the points lie inside ``region`` (vectorised)."""
    if len(ra) == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(region.contains(np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))),
                      dtype=bool)


class Sky:
    """The sky of one :class:`SimConfig`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._stars = lru_cache(maxsize=256)(self._make_stars)
        self._news = lru_cache(maxsize=256)(self._make_new_sources)

    # --- per-trixel generation ------------------------------------------------------------
    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, index, stream])

    def _make_stars(self, index: int) -> Table:
        cfg = self.config
        rng = self._rng(index, 1)
        bright, faint = cfg.star_mag_range
        alpha = cfg.star_slope
        per_deg2 = cfg.star_density * (10 ** (alpha * (faint - 24.0)) - 10 ** (alpha * (bright - 24.0)))
        n = int(rng.poisson(per_deg2 * _trixel_area_deg2(index)))
        ra, dec = _points_in_trixel(index, n, rng)
        lo = 10 ** (alpha * (bright - faint))
        r_mag = faint + np.log10(lo + rng.random(n) * (1 - lo)) / alpha
        g_r = np.clip(rng.normal(0.7, 0.35, n), -0.3, 1.6)
        offsets = colours(g_r)
        variable = rng.random(n) < cfg.variable_fraction
        table = Table({"id": index * _ID_BLOCK + np.arange(n, dtype=np.int64), "ra": ra, "dec": dec})
        for band in BANDS:
            table[f"{band}_mag"] = r_mag + offsets[band]
        table["variable"] = variable
        table["amplitude"] = np.where(variable, rng.uniform(0.2, 1.0, n), 0.0)
        table["period_d"] = rng.uniform(2 / 24, 3.0, n)
        table["phase"] = rng.uniform(0, 2 * np.pi, n)
        return table

    def _make_new_sources(self, index: int) -> Table:
        cfg = self.config
        rng = self._rng(index, 2)
        n = int(rng.poisson(cfg.transient_density * _trixel_area_deg2(index)))
        ra, dec = _points_in_trixel(index, n, rng)
        peak = rng.uniform(18.5, 22.5, n)
        g_r = rng.uniform(-0.3, 0.6, n)
        offsets = colours(g_r)
        table = Table({"id": index * _ID_BLOCK + _NEW_ID_OFFSET + np.arange(n, dtype=np.int64),
                       "ra": ra, "dec": dec})
        for band in BANDS:
            table[f"{band}_peak"] = peak + offsets[band]
        table["period_d"] = rng.uniform(5.0, 30.0, n)
        table["phase_d"] = rng.uniform(0.0, 30.0, n)
        return table

    # --- regions ----------------------------------------------------------------------------
    @staticmethod
    def trixels(region: Region) -> list[int]:
        """Level-7 HTM trixels overlapping ``region``."""
        out: list[int] = []
        for begin, end in _PIXELIZATION.envelope(region):
            out.extend(range(begin, end))
        return out

    def _gather(self, region: Region, make: Callable[[int], Table]) -> Table:
        tables = [t[_contains(region, t["ra"], t["dec"])] for t in map(make, self.trixels(region))]
        return vstack(tables, metadata_conflicts="silent")

    def stars(self, region: Region) -> Table:
        """Every star inside ``region`` (static magnitudes)."""
        return self._gather(region, self._stars)

    def stars_in_trixel(self, index: int) -> Table:
        """Every star of one level-7 trixel."""
        return self._stars(index)

    def new_sources(self, region: Region) -> Table:
        """Every new source inside ``region`` (light-curve parameters)."""
        return self._gather(region, self._news)

    def days(self, tai_unix: float) -> float:
        """Days since the reference time."""
        return (tai_unix - self.config.reference_time) / _DAY

    def variable_mag(self, stars: Table, band: str, tai_unix: float) -> np.ndarray:
        """Magnitudes of ``stars`` in ``band`` at ``tai_unix`` (variables vary)."""
        days = self.days(tai_unix)
        wobble = stars["amplitude"] * np.sin(2 * np.pi * days / stars["period_d"] + stars["phase"])
        return np.asarray(stars[f"{band}_mag"] + wobble, float)

    def sources_at(self, region: Region, band: str, tai_unix: float | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ra, dec, mag)`` of every source in ``region`` at ``tai_unix``.

        ``tai_unix=None`` gives the static sky the templates show: variables at their mean,
        no new sources.
        """
        stars = self.stars(region)
        if tai_unix is None:
            return (np.asarray(stars["ra"], float), np.asarray(stars["dec"], float),
                    np.asarray(stars[f"{band}_mag"], float))
        news = self.new_sources(region)
        new_mag = outburst_mag(news[f"{band}_peak"], news["period_d"], news["phase_d"], self.days(tai_unix))
        on = np.isfinite(new_mag)
        return (np.concatenate([stars["ra"], news["ra"][on]]),
                np.concatenate([stars["dec"], news["dec"][on]]),
                np.concatenate([self.variable_mag(stars, band, tai_unix), new_mag[on]]))

    # --- ground truth ---------------------------------------------------------------------
    def truth(self, visit: VisitSpec, detector: int, focal_plane: FocalPlane | None = None) -> Table:
        """The transients ``detector`` sees during ``visit`` (at its mid-time).

        Columns: ``id``, ``kind`` (``new`` or ``variable``), ``ra``, ``dec``, ``mag`` (visit
        band, at the visit's middle), ``ref_mag`` (what the template shows; ``inf`` for new
        sources), ``diff_mag`` (the magnitude of the flux in the difference image, what sets
        detectability), ``x``, ``y`` (0-based pixels on the detector).
        """
        plane = focal_plane or self.config.focal_plane
        region = plane.footprint(detector, visit.ra, visit.dec, visit.camera_angle)
        mid = visit.start + visit.duration / 2
        band = visit.band
        stars = self.stars(region)
        stars = stars[stars["variable"]]
        news = self.new_sources(region)
        new_mag = outburst_mag(news[f"{band}_peak"], news["period_d"], news["phase_d"], self.days(mid))
        news = news[np.isfinite(new_mag)]
        new_mag = new_mag[np.isfinite(new_mag)]
        ra = np.concatenate([news["ra"], stars["ra"]]).astype(float)
        dec = np.concatenate([news["dec"], stars["dec"]]).astype(float)
        x, y = plane.sky_to_pixel(detector, ra, dec, visit.ra, visit.dec, visit.camera_angle)
        mag = np.concatenate([new_mag, self.variable_mag(stars, band, mid)])
        ref_mag = np.concatenate([np.full(len(news), np.inf), np.asarray(stars[f"{band}_mag"], float)])
        return Table({
            "id": np.concatenate([news["id"], stars["id"]]).astype(np.int64),
            "kind": np.array(["new"] * len(news) + ["variable"] * len(stars), dtype="U8"),
            "ra": ra, "dec": dec, "mag": mag, "ref_mag": ref_mag, "diff_mag": difference_mag(mag, ref_mag),
            "x": np.asarray(x, float), "y": np.asarray(y, float),
        })
