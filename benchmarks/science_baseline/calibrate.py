"""Visit image and its calibration: combine the snaps, model the sky, measure PSF, astrometry, zero point.

The snaps of a visit are summed with cross-snap cosmic-ray rejection; the background is
subtracted; bright stars give the PSF width; matching them to the reference catalogue checks
the WCS (offset and scatter) and gives the photometric zero point. The results travel in the
visit image's header (``PSFSIG``, ``MAGZERO``, ``ASTOFFRA``...) for the later tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.table import Table, vstack
from scipy import ndimage

from benchmarks.science_baseline.imaging import (
    GAUSSIAN_FWHM,
    background_model,
    card,
    detect_peaks,
    measure_psf_sigma,
    peaks_table,
    robust_stats,
    wcs_of,
)
from benchmarks.science_baseline.matching import match_sky

__all__ = [
    "AstrometryCheck",
    "CalibrateConfig",
    "CalibrateConnections",
    "CalibrateTask",
    "combine_snaps",
    "interpolate_bad",
    "isolated",
]

_VISIT_DIMENSIONS = ("instrument", "visit", "detector")


class CalibrateConnections(
    pipe_base.PipelineTaskConnections, dimensions=_VISIT_DIMENSIONS
):
    """ISR'd snaps and the reference catalogue in; visit image and its stars out."""

    snaps = cT.Input(
        name="post_isr_image",
        storageClass="CCDImage",
        doc="ISR-corrected snaps of the visit (electrons).",
        dimensions=("instrument", "exposure", "detector"),
        multiple=True,
    )
    refcat = cT.PrerequisiteInput(
        name="sim_refcat",
        storageClass="ArrowAstropy",
        doc="Reference catalogue shards (HTM level 7) overlapping the detector.",
        dimensions=("htm7",),
        multiple=True,
        minimum=0,
    )
    visit_image = cT.Output(
        name="visit_image",
        storageClass="CCDImage",
        doc="Background-subtracted sum of the snaps (electrons) with PSF, WCS check and zero point.",
        dimensions=_VISIT_DIMENSIONS,
    )
    stars = cT.Output(
        name="single_visit_star",
        storageClass="ArrowAstropy",
        doc="Bright point sources of the visit image, with their reference-catalogue match.",
        dimensions=_VISIT_DIMENSIONS,
    )


class CalibrateConfig(
    pipe_base.PipelineTaskConfig, pipelineConnections=CalibrateConnections
):
    """Detection and matching thresholds of the calibration."""

    background_bin = pex_config.Field[int](
        doc="Background mesh cell size (pixels).", default=64
    )
    psf_sigma_guess = pex_config.Field[float](
        doc="First-pass PSF sigma (pixels).", default=1.7
    )
    star_threshold = pex_config.Field[float](
        doc="Detection threshold for stars (sigma).", default=10.0
    )
    psf_min_snr = pex_config.Field[float](
        doc="Minimum S/N of a PSF star.", default=30.0
    )
    isolation_radius = pex_config.Field[float](
        doc="No other star within this (pixels).", default=12.0
    )
    match_radius = pex_config.Field[float](
        doc="Reference match radius (arcsec).", default=1.5
    )
    snap_cr_threshold = pex_config.Field[float](
        doc="A snap pixel this many sigma above the mean of the others is a cosmic ray.",
        default=6.0,
    )


def combine_snaps(
    snaps: Sequence[CCDData], cr_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum of the snaps, its standard deviation and bad-pixel mask.

    A pixel masked in a snap, or standing ``cr_threshold`` sigma above the exposure-time-scaled
    mean of the other snaps (a cosmic ray: stars do not change in seconds), is replaced by that
    scaled mean. Pixels bad in every snap stay masked.
    """
    data = np.stack([np.asarray(s.data, dtype=np.float64) for s in snaps])
    sigma = np.stack(
        [
            np.asarray(s.uncertainty.array, dtype=np.float64)
            if s.uncertainty is not None
            else np.sqrt(np.clip(np.asarray(s.data, dtype=np.float64), 1, None))
            for s in snaps
        ]
    )
    bad = np.stack(
        [
            np.zeros(s.data.shape, bool) if s.mask is None else np.asarray(s.mask, bool)
            for s in snaps
        ]
    )
    times = np.array([float(s.meta.get("EXPTIME", 1.0)) or 1.0 for s in snaps])
    total_time = times.sum()
    if len(snaps) > 1:
        for k in range(len(snaps)):
            others = [j for j in range(len(snaps)) if j != k]
            rate = data[others].sum(axis=0) / times[others].sum()
            rate_sigma = np.sqrt((sigma[others] ** 2).sum(axis=0)) / times[others].sum()
            expected = rate * times[k]
            noise = np.hypot(sigma[k], rate_sigma * times[k])
            bad[k] |= data[k] - expected > cr_threshold * noise
    good = ~bad
    good_time = (good * times[:, None, None]).sum(axis=0)
    rate = np.where(
        good_time > 0,
        (data * good).sum(axis=0) / np.where(good_time > 0, good_time, 1),
        0.0,
    )
    var_rate = np.where(
        good_time > 0,
        (sigma**2 * good).sum(axis=0) / np.where(good_time > 0, good_time, 1) ** 2,
        0.0,
    )
    total = rate * total_time
    total_sigma = np.sqrt(var_rate) * total_time
    return total, total_sigma, good_time == 0


def interpolate_bad(
    image: np.ndarray, bad: np.ndarray, sigma: float = 1.5
) -> np.ndarray:
    """``image`` with its ``bad`` pixels replaced by a Gaussian-weighted mean of good neighbours.

    Isolated bad pixels (hot pixels, cosmic rays in every snap) become plausible sky so they
    do not leave holes or spikes for detection; the mask still records them.
    """
    if not bad.any():
        return image
    good = (~bad).astype(np.float64)
    numerator = ndimage.gaussian_filter(
        np.where(bad, 0.0, image), sigma, mode="constant"
    )
    denominator = ndimage.gaussian_filter(good, sigma, mode="constant")
    filled = np.where(
        denominator > 1e-3,
        numerator / np.where(denominator > 1e-3, denominator, 1.0),
        0.0,
    )
    return np.where(bad, filled, image)


def isolated(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """True for points with no other point within ``radius`` pixels."""
    if len(x) < 2:
        return np.ones(len(x), dtype=bool)
    from scipy.spatial import cKDTree

    points = np.column_stack([x, y])
    counts = np.array(
        [len(n) for n in cKDTree(points).query_ball_point(points, radius)]
    )
    return counts == 1


class AstrometryCheck:
    """Offsets of detected stars from their reference positions (arcsec).

    The offset is the median per axis; the scatter is the per-axis robust (MAD) standard
    deviation about it, so a blended or mismatched star does not dominate it.
    """

    def __init__(self, d_ra: np.ndarray, d_dec: np.ndarray) -> None:
        self.n = len(d_ra)
        self.offset_ra = float(np.median(d_ra)) if self.n else math.nan
        self.offset_dec = float(np.median(d_dec)) if self.n else math.nan
        if self.n >= 2:
            _, sigma_ra = robust_stats(d_ra)
            _, sigma_dec = robust_stats(d_dec)
            self.scatter = float(math.sqrt((sigma_ra**2 + sigma_dec**2) / 2))
        else:
            self.scatter = math.nan


class CalibrateTask(pipe_base.PipelineTask):
    """Build the visit image from its snaps and calibrate it against the reference catalogue."""

    ConfigClass = CalibrateConfig
    config: CalibrateConfig
    _DefaultName = "calibrate"

    def runQuantum(
        self,
        butlerQC: pipe_base.QuantumContext,
        inputRefs: pipe_base.InputQuantizedConnection,
        outputRefs: pipe_base.OutputQuantizedConnection,
    ) -> None:
        inputs = butlerQC.get(inputRefs)
        band = str(butlerQC.quantum.dataId["band"])
        outputs = self.run(inputs["snaps"], inputs.get("refcat", []), band=band)
        butlerQC.put(outputs, outputRefs)

    def run(
        self, snaps: Sequence[CCDData], refcat: Sequence[Table], band: str
    ) -> pipe_base.Struct:
        """Return ``visit_image`` and ``stars`` for the snaps of one visit-detector."""
        snaps = sorted(snaps, key=lambda s: str(s.meta.get("DATE-BEG", "")))
        total, sigma, bad = combine_snaps(snaps, self.config.snap_cr_threshold)
        background = background_model(total, self.config.background_bin, mask=bad)
        image = interpolate_bad(total - background, bad)
        header = snaps[0].meta.copy()
        exptime = float(sum(float(s.meta.get("EXPTIME", 0.0)) for s in snaps))
        header["EXPTIME"] = card(exptime, "total exposure time of the summed snaps (s)")
        header["NSNAPS"] = card(len(snaps), "snaps summed into this visit image")
        if "DATE-END" in snaps[-1].meta:
            header["DATE-END"] = snaps[-1].meta["DATE-END"]
        wcs = wcs_of(header)
        psf_sigma, stars = self._measure_stars(image, bad)
        _, noise = robust_stats(image[~bad][::7])
        header["BGMEAN"] = card(float(np.mean(background)), "mean subtracted sky (e-)")
        header["BGNOISE"] = card(
            noise,
            "robust pixel noise after background subtraction (e-)",
        )
        header["PSFSIG"] = card(psf_sigma, "PSF Gaussian sigma (pixels)")
        header["PSFFWHM"] = card(
            psf_sigma * GAUSSIAN_FWHM * _pixel_scale(wcs),
            "PSF FWHM (arcsec)",
        )
        header["NSTARS"] = card(len(stars), "stars detected for calibration")
        stars_table = peaks_table(stars, wcs)
        self._calibrate_against(stars_table, _merge(refcat), band, header, exptime)
        self.log.info(
            'Calibrate: %d snaps, PSF FWHM %.2f", %d stars, %d matched, offset (%.3f, %.3f)" scatter %.3f", zp %.3f',
            len(snaps),
            header["PSFFWHM"],
            len(stars),
            header["ASTNMAT"],
            header["ASTOFFRA"],
            header["ASTOFFDE"],
            header["ASTRMS"],
            header["MAGZERO"],
        )
        visit_image = CCDData(
            image.astype(np.float32),
            unit="electron",
            meta=header,
            mask=bad,
            uncertainty=StdDevUncertainty(sigma.astype(np.float32)),
        )
        return pipe_base.Struct(visit_image=visit_image, stars=stars_table)

    def _measure_stars(self, image: np.ndarray, bad: np.ndarray) -> tuple[float, Any]:
        """Detect bright stars twice (guessed, then measured PSF) and return the PSF sigma."""
        psf_sigma = self.config.psf_sigma_guess
        stars = detect_peaks(image, psf_sigma, self.config.star_threshold, mask=bad)
        for _ in range(2):
            use = (stars.snr > self.config.psf_min_snr) & isolated(
                stars.x, stars.y, self.config.isolation_radius
            )
            widths = measure_psf_sigma(
                image, stars.x[use], stars.y[use], guess=psf_sigma
            )
            widths = widths[np.isfinite(widths)]
            if len(widths) < 3:
                break
            psf_sigma = float(np.median(widths))
            stars = detect_peaks(image, psf_sigma, self.config.star_threshold, mask=bad)
        return psf_sigma, stars

    def _calibrate_against(
        self, stars: Table, refcat: Table | None, band: str, header: Any, exptime: float
    ) -> None:
        """Match ``stars`` to the reference catalogue; write astrometry and zero point to ``header``."""
        stars["ref_id"] = np.full(len(stars), -1, dtype=np.int64)
        stars["ref_mag"] = np.full(len(stars), np.nan)
        column = f"{band}_mag"
        n_match = 0
        check = AstrometryCheck(np.zeros(0), np.zeros(0))
        zero_point = math.nan
        if (
            refcat is not None
            and len(refcat)
            and len(stars)
            and column in refcat.colnames
        ):
            match = match_sky(
                stars["ra"],
                stars["dec"],
                refcat["ra"],
                refcat["dec"],
                self.config.match_radius,
            )
            n_match = len(match)
            if n_match:
                s, r = match.first, match.second
                stars["ref_id"][s] = np.asarray(refcat["id"][r], dtype=np.int64)
                stars["ref_mag"][s] = np.asarray(refcat[column][r], dtype=np.float64)
                cos_dec = np.cos(
                    np.radians(np.asarray(refcat["dec"][r], dtype=np.float64))
                )
                d_ra = (
                    (np.asarray(stars["ra"][s]) - np.asarray(refcat["ra"][r]))
                    * cos_dec
                    * 3600.0
                )
                d_dec = (
                    np.asarray(stars["dec"][s]) - np.asarray(refcat["dec"][r])
                ) * 3600.0
                check = AstrometryCheck(d_ra, d_dec)
                flux = np.asarray(stars["psfFlux"][s])
                ok = flux > 0
                if ok.any():
                    zps = np.asarray(refcat[column][r])[ok] + 2.5 * np.log10(flux[ok])
                    zero_point = float(np.median(zps))
        header["ASTNMAT"] = card(n_match, "stars matched to the reference catalogue")
        header["ASTOFFRA"] = card(
            _finite(check.offset_ra),
            "median RA offset from refcat (arcsec)",
        )
        header["ASTOFFDE"] = card(
            _finite(check.offset_dec),
            "median Dec offset from refcat (arcsec)",
        )
        header["ASTRMS"] = card(
            _finite(check.scatter),
            "per-axis astrometric scatter (arcsec)",
        )
        header["MAGZERO"] = card(
            _finite(zero_point),
            "mag of 1 e- in this image (summed snaps)",
        )
        per_second = zero_point - 2.5 * math.log10(exptime) if exptime > 0 else math.nan
        header["MAGZERO1"] = card(_finite(per_second), "mag of 1 e-/s")


def _finite(value: float) -> float:
    """FITS headers cannot hold NaN: -99 stands for 'not measured'."""
    return value if math.isfinite(value) else -99.0


def _merge(shards: Sequence[Table]) -> Table | None:
    """All reference shards as one table (None when there are none)."""
    shards = [s for s in shards if len(s)]
    if not shards:
        return None
    return (
        shards[0]
        if len(shards) == 1
        else vstack(list(shards), metadata_conflicts="silent")
    )


def _pixel_scale(wcs: Any) -> float:
    """Pixel scale (arcsec) of ``wcs``; 0.2 when the image has no WCS."""
    if wcs is None:
        return 0.2
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)
