"""Transient recovery: DIA sources scored against the simulator's ground truth.

For each injected transient the expected difference-image flux follows from its magnitude now
and in the template, the image's zero point and exposure time; dividing by the PSF-flux noise
of the difference gives the S/N at which it should be seen. Transients expected above a S/N
cut are the ones detection is accountable for (completeness); detections matching no
transient at all are false (artefacts or noise peaks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from prompt_tasks.science.matching import match_sky

__all__ = ["Recovery", "expected_snr", "score_recovery"]


def expected_snr(
    mag: np.ndarray,
    ref_mag: np.ndarray,
    zero_point: float,
    exptime: float,
    pixel_noise: float,
    psf_sigma: float,
) -> np.ndarray:
    """Expected |S/N| of each transient's PSF flux on the difference image.

    ``zero_point`` is the magnitude of 1 e-/s; ``pixel_noise`` the per-pixel noise (e-) and
    ``psf_sigma`` the PSF sigma (pixels) of the science image, which give the best S/N any
    detector can reach: the PSF-flux error of a Gaussian PSF in white noise is
    ``pixel_noise · sqrt(4π) · psf_sigma``. (A difference image's pixel noise is no measure
    of it: PSF matching correlates the noise.)
    """
    now = 10 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - zero_point)) * exptime
    ref = np.asarray(ref_mag, dtype=np.float64)
    before = np.where(
        np.isfinite(ref),
        10 ** (-0.4 * (np.where(np.isfinite(ref), ref, 99.0) - zero_point)),
        0.0,
    )
    before = before * exptime
    error = pixel_noise * math.sqrt(4 * math.pi) * psf_sigma
    return np.abs(now - before) / error


@dataclass
class Recovery:
    """How many injected transients were found, and how many detections are false."""

    n_expected: int
    n_recovered: int
    n_detections: int
    n_false: int
    #: Truth rows with ``expected_snr``, ``recovered`` and the matched detection's ``snr``.
    table: Table = field(repr=False)

    @property
    def completeness(self) -> float:
        """Recovered fraction of the transients expected above the S/N cut (1 if none)."""
        return self.n_recovered / self.n_expected if self.n_expected else 1.0

    def as_dict(self) -> dict[str, float | int]:
        """A JSON-able summary."""
        return {
            "n_expected": self.n_expected,
            "n_recovered": self.n_recovered,
            "completeness": round(self.completeness, 4),
            "n_detections": self.n_detections,
            "n_false": self.n_false,
        }


def score_recovery(
    detections: Table,
    truth: Table,
    *,
    zero_point: float,
    exptime: float,
    pixel_noise: float,
    psf_sigma: float,
    min_snr: float = 8.0,
    radius_arcsec: float = 1.0,
    shape: tuple[int, int] | None = None,
    edge: int = 8,
) -> Recovery:
    """Match ``detections`` (``ra``, ``dec``) to ``truth`` (``ra``, ``dec``, ``mag``, ``ref_mag``).

    Transients outside the image (``x``, ``y`` within ``edge`` of the border of ``shape``) are
    not expected. A detection within ``radius_arcsec`` of any transient, expected or not, is
    not false.
    """
    truth = truth.copy()
    snr = expected_snr(
        truth["mag"], truth["ref_mag"], zero_point, exptime, pixel_noise, psf_sigma
    )
    inside = np.ones(len(truth), dtype=bool)
    if shape is not None and "x" in truth.colnames:
        x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
        inside = (
            (x >= edge) & (x < shape[1] - edge) & (y >= edge) & (y < shape[0] - edge)
        )
    truth["expected_snr"] = snr
    truth["inside"] = inside
    match = match_sky(
        truth["ra"], truth["dec"], detections["ra"], detections["dec"], radius_arcsec
    )
    recovered = np.zeros(len(truth), dtype=bool)
    recovered[match.first] = True
    truth["recovered"] = recovered
    found_snr = np.full(len(truth), np.nan)
    if "snr" in detections.colnames and len(match):
        found_snr[match.first] = np.asarray(detections["snr"])[match.second]
    truth["snr"] = found_snr
    expected = inside & (snr >= min_snr)
    matched_detections = np.zeros(len(detections), dtype=bool)
    matched_detections[match.second] = True
    return Recovery(
        n_expected=int(expected.sum()),
        n_recovered=int((expected & recovered).sum()),
        n_detections=len(detections),
        n_false=int((~matched_detections).sum()),
        table=truth,
    )
