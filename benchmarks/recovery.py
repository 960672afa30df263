"""Transient recovery: DIA sources scored against the simulator's ground truth (tests and benchmarks).

Each injected transient's expected difference-image flux follows from its magnitude now and in
the template, the image's zero point and exposure time; over the PSF-flux noise of the science
image it gives the S/N at which it should be seen. Transients expected above a S/N cut are the
ones detection is accountable for; detections matching no transient at all are false.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from prompt_tasks.science.matching import match_sky

__all__ = ["Recovery", "expected_snr", "score_recovery"]


def expected_snr(mag: np.ndarray, ref_mag: np.ndarray, zero_point: float, exptime: float, pixel_noise: float,
                 psf_sigma: float) -> np.ndarray:
    """Expected |S/N| of each transient's PSF flux: |flux now − flux in the template| over the
    PSF-flux error of a Gaussian PSF in white noise, ``pixel_noise · sqrt(4π) · psf_sigma``
    (``zero_point``: magnitude of 1 e-/s; the science image's pixel noise and PSF sigma)."""
    ref = np.asarray(ref_mag, np.float64)
    before = np.where(np.isfinite(ref), 10 ** (-0.4 * (np.where(np.isfinite(ref), ref, 99.0) - zero_point)), 0.0)
    now = 10 ** (-0.4 * (np.asarray(mag, np.float64) - zero_point))
    return np.abs(now - before) * exptime / (pixel_noise * math.sqrt(4 * math.pi) * psf_sigma)


@dataclass
class Recovery:
    """How many injected transients were found, and how many detections are false."""

    n_expected: int
    n_recovered: int
    n_detections: int
    n_false: int
    #: Truth rows with ``expected_snr``, ``inside``, ``recovered`` and the matched detection's ``snr``.
    table: Table = field(repr=False)

    @property
    def completeness(self) -> float:
        """Recovered fraction of the transients expected above the S/N cut (1 if none)."""
        return self.n_recovered / self.n_expected if self.n_expected else 1.0

    def as_dict(self) -> dict[str, float | int]:
        """A JSON-able summary."""
        return {"n_expected": self.n_expected, "n_recovered": self.n_recovered,
                "completeness": round(self.completeness, 4), "n_detections": self.n_detections,
                "n_false": self.n_false}


def score_recovery(detections: Table, truth: Table, *, zero_point: float, exptime: float, pixel_noise: float,
                   psf_sigma: float, min_snr: float = 8.0, radius_arcsec: float = 1.0,
                   shape: tuple[int, int] | None = None, edge: int = 8) -> Recovery:
    """Match ``detections`` (``ra``, ``dec``) to ``truth`` (``ra``, ``dec``, ``mag``, ``ref_mag``).

    Transients within ``edge`` pixels of the border of ``shape`` are not expected; a detection
    within ``radius_arcsec`` of any transient, expected or not, is not false.
    """
    truth = truth.copy()
    truth["expected_snr"] = expected_snr(truth["mag"], truth["ref_mag"], zero_point, exptime, pixel_noise, psf_sigma)
    truth["inside"] = np.ones(len(truth), bool)
    if shape is not None and "x" in truth.colnames:
        x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
        truth["inside"] = (x >= edge) & (x < shape[1] - edge) & (y >= edge) & (y < shape[0] - edge)
    match = match_sky(truth["ra"], truth["dec"], detections["ra"], detections["dec"], radius_arcsec)
    truth["recovered"] = np.isin(np.arange(len(truth)), match.first)
    truth["snr"] = np.full(len(truth), np.nan)
    if "snr" in detections.colnames and len(match):
        truth["snr"][match.first] = np.asarray(detections["snr"])[match.second]
    expected = truth["inside"] & (truth["expected_snr"] >= min_snr)
    return Recovery(n_expected=int(expected.sum()), n_recovered=int((expected & truth["recovered"]).sum()),
                    n_detections=len(detections), n_false=len(detections) - len(match), table=truth)
