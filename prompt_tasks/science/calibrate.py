"""Visit image and its calibration: combine the snaps, model the sky, measure PSF, astrometry, zero point.

Snaps are summed with cross-snap cosmic-ray rejection; the sky (photutils ``Background2D``) is
subtracted and bad pixels filled (astropy ``interpolate_replace_nans``); bright stars give the PSF
width (photutils ``fit_fwhm``) and, matched to the refcat, the WCS check and zero point, written
to the header (``PSFSIG``, ``MAGZERO``, ``ASTOFFRA``...). Written by hand: the snap combination,
as no library rejects outliers between exposures of known time ratio with per-pixel errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.convolution import Gaussian2DKernel, interpolate_replace_nans
from astropy.nddata import CCDData, StdDevUncertainty, block_reduce
from astropy.table import Table, vstack
from photutils.psf import fit_fwhm
from scipy.spatial import cKDTree

from prompt_tasks.science.imaging import (
    GAUSSIAN_FWHM,
    background,
    card,
    find_point_sources,
    pixel_scale,
    robust_stats,
    wcs_of,
)
from prompt_tasks.science.matching import match_sky

__all__ = ["CalibrateConfig", "CalibrateConnections", "CalibrateTask", "combine_snaps", "interpolate_bad",
           "isolated"]

_VISIT = ("instrument", "visit", "detector")


class CalibrateConnections(pipe_base.PipelineTaskConnections, dimensions=_VISIT):
    """ISR'd snaps and the reference catalogue in; visit image and its stars out."""

    snaps = cT.Input(name="post_isr_image", storageClass="CCDImage", doc="ISR-corrected snaps of the visit (e-).",
                     dimensions=("instrument", "exposure", "detector"), multiple=True)
    refcat = cT.PrerequisiteInput(name="sim_refcat", storageClass="ArrowAstropy",
                                  doc="Reference catalogue shards (HTM level 7) overlapping the detector.",
                                  dimensions=("htm7",), multiple=True, minimum=0)
    visit_image = cT.Output(name="visit_image", storageClass="CCDImage", dimensions=_VISIT,
                            doc="Background-subtracted sum of the snaps (e-) with PSF, WCS check and zero point.")
    stars = cT.Output(name="single_visit_star", storageClass="ArrowAstropy", dimensions=_VISIT,
                      doc="Bright point sources of the visit image, with their reference-catalogue match.")


class CalibrateConfig(pipe_base.PipelineTaskConfig, pipelineConnections=CalibrateConnections):
    """Detection and matching thresholds of the calibration."""

    background_bin = pex_config.Field[int](doc="Background mesh cell size (pixels).", default=64)
    psf_sigma_guess = pex_config.Field[float](doc="First-pass PSF sigma (pixels).", default=1.7)
    star_threshold = pex_config.Field[float](doc="Detection threshold for stars (sigma).", default=10.0)
    psf_min_snr = pex_config.Field[float](doc="Minimum S/N of a PSF star.", default=30.0)
    psf_max_stars = pex_config.Field[int](doc="At most this many stars are fitted for the PSF width.", default=25)
    isolation_radius = pex_config.Field[float](doc="No other star within this (pixels).", default=12.0)
    match_radius = pex_config.Field[float](doc="Reference match radius (arcsec).", default=1.5)
    snap_cr_threshold = pex_config.Field[float](
        doc="A snap pixel this many sigma above the mean of the others is a cosmic ray.", default=6.0)


def combine_snaps(snaps: Sequence[CCDData], cr_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum of the snaps, its standard deviation and the mask of pixels bad in every snap.

    A pixel masked in a snap, or ``cr_threshold`` sigma above the time-scaled mean of the
    other snaps (a cosmic ray: stars do not change in seconds), is replaced by that mean.
    """
    data = np.stack([np.asarray(s.data, np.float64) for s in snaps])
    sigma = np.stack([np.asarray(s.uncertainty.array, np.float64) if s.uncertainty is not None
                      else np.sqrt(np.clip(np.asarray(s.data, np.float64), 1, None)) for s in snaps])
    bad = np.stack([np.zeros(s.data.shape, bool) if s.mask is None else np.asarray(s.mask, bool) for s in snaps])
    times = np.array([float(s.meta.get("EXPTIME", 1.0)) or 1.0 for s in snaps])
    var, all_data, all_time = sigma**2, data.sum(axis=0), times.sum()
    all_var = var.sum(axis=0)
    for k in range(len(snaps) if len(snaps) > 1 else 0):  # the others' sum, scaled: all minus this snap
        scale = times[k] / (all_time - times[k])
        excess = data[k] - (all_data - data[k]) * scale
        bad[k] |= (excess > 0) & (excess**2 > cr_threshold**2 * (var[k] + (all_var - var[k]) * scale**2))
    good_time = (~bad * times[:, None, None]).sum(axis=0)
    safe = np.where(good_time > 0, good_time, 1.0)
    total = np.where(good_time > 0, np.where(bad, 0.0, data).sum(axis=0) / safe, 0.0) * all_time
    total_sigma = np.where(good_time > 0, np.sqrt(np.where(bad, 0.0, var).sum(axis=0)) / safe, 0.0) * all_time
    return total, total_sigma, good_time == 0


def interpolate_bad(image: np.ndarray, bad: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """``image`` with its ``bad`` pixels replaced by a Gaussian-weighted mean of good neighbours."""
    if not bad.any():
        return image
    filled = interpolate_replace_nans(np.where(bad, np.nan, image), Gaussian2DKernel(sigma, x_size=7, y_size=7))
    return np.where(np.isfinite(filled), filled, 0.0)


def isolated(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """True for points with no other point within ``radius`` pixels."""
    if len(x) < 2:
        return np.ones(len(x), bool)
    points = np.column_stack([x, y])
    return np.array([len(n) for n in cKDTree(points).query_ball_point(points, radius)]) == 1


class CalibrateTask(pipe_base.PipelineTask):
    """Build the visit image from its snaps and calibrate it against the reference catalogue."""

    ConfigClass = CalibrateConfig
    config: CalibrateConfig
    _DefaultName = "calibrate"

    def runQuantum(self, butlerQC: pipe_base.QuantumContext, inputRefs: pipe_base.InputQuantizedConnection,
                   outputRefs: pipe_base.OutputQuantizedConnection) -> None:
        inputs = butlerQC.get(inputRefs)
        band = str(butlerQC.quantum.dataId["band"])
        butlerQC.put(self.run(inputs["snaps"], inputs.get("refcat", []), band=band), outputRefs)

    def run(self, snaps: Sequence[CCDData], refcat: Sequence[Table], band: str) -> pipe_base.Struct:
        """Return ``visit_image`` and ``stars`` for the snaps of one visit-detector."""
        snaps = sorted(snaps, key=lambda s: str(s.meta.get("DATE-BEG", "")))
        total, sigma, bad = combine_snaps(snaps, self.config.snap_cr_threshold)
        sky = background(total, self.config.background_bin, mask=bad)
        image = interpolate_bad(total - sky, bad)
        header = snaps[0].meta.copy()
        exptime = float(sum(float(s.meta.get("EXPTIME", 0.0)) for s in snaps))
        if "DATE-END" in snaps[-1].meta:
            header["DATE-END"] = snaps[-1].meta["DATE-END"]
        wcs = wcs_of(header)
        psf_sigma, stars = self._measure_stars(image, bad)
        for key, value, comment in (
            ("EXPTIME", exptime, "total exposure time of the summed snaps (s)"),
            ("NSNAPS", len(snaps), "snaps summed into this visit image"),
            ("BGMEAN", float(np.mean(sky)), "mean subtracted sky (e-)"),
            ("BGNOISE", robust_stats(image[~bad][::7])[1], "robust pixel noise after background subtraction (e-)"),
            ("PSFSIG", psf_sigma, "PSF Gaussian sigma (pixels)"),
            ("PSFFWHM", psf_sigma * GAUSSIAN_FWHM * pixel_scale(wcs), "PSF FWHM (arcsec)"),
            ("NSTARS", len(stars), "stars detected for calibration"),
        ):
            header[key] = card(value, comment)
        stars["ra"], stars["dec"] = wcs.all_pix2world(stars["x"], stars["y"], 0) if wcs is not None and len(
            stars) else (np.full(len(stars), np.nan), np.full(len(stars), np.nan))
        shards = [s for s in refcat if len(s)]
        self._calibrate_against(stars, vstack(shards, metadata_conflicts="silent") if shards else None, band,
                                header, exptime)
        self.log.info('Calibrate: %d snaps, PSF FWHM %.2f", %d stars, %d matched, offset (%.3f, %.3f)" '
                      'scatter %.3f", zp %.3f', len(snaps), header["PSFFWHM"], len(stars), header["ASTNMAT"],
                      header["ASTOFFRA"], header["ASTOFFDE"], header["ASTRMS"], header["MAGZERO"])
        return pipe_base.Struct(stars=stars, visit_image=CCDData(
            image.astype(np.float32), unit="electron", meta=header, mask=bad,
            uncertainty=StdDevUncertainty(sigma.astype(np.float32))))

    def _measure_stars(self, image: np.ndarray, bad: np.ndarray) -> tuple[float, Table]:
        """Detect stars with the guessed PSF, fit the width of bright isolated ones, detect again."""
        cfg = self.config
        stars = find_point_sources(block_reduce(image, 2), cfg.psf_sigma_guess / 2, cfg.psf_min_snr,
                                   mask=block_reduce(bad, 2) > 0)  # binned 2x2: 4x cheaper; fit_fwhm fits the centres
        use = np.flatnonzero(isolated(stars["x"], stars["y"], cfg.isolation_radius / 2))
        use = use[np.argsort(-np.asarray(stars["snr"])[use])][: cfg.psf_max_stars]
        if len(use) < 3:
            return cfg.psf_sigma_guess, find_point_sources(image, cfg.psf_sigma_guess, cfg.star_threshold, mask=bad)
        size = 2 * math.ceil(3 * cfg.psf_sigma_guess) + 1
        fwhm = fit_fwhm(image, xypos=2 * np.column_stack([stars["x"][use], stars["y"][use]]) + 0.5, fit_shape=size,
                        mask=bad)
        psf_sigma = float(np.nanmedian(fwhm)) / GAUSSIAN_FWHM
        return psf_sigma, find_point_sources(image, psf_sigma, cfg.star_threshold, mask=bad)

    def _calibrate_against(self, stars: Table, refcat: Table | None, band: str, header: dict, exptime: float) -> None:
        """Match ``stars`` to the reference catalogue; write astrometry and zero point to ``header``."""
        stars["ref_id"] = np.full(len(stars), -1, np.int64)
        stars["ref_mag"] = np.full(len(stars), np.nan)
        column = f"{band}_mag"
        offsets, zero_point = (np.zeros(0), np.zeros(0)), math.nan
        if refcat is not None and len(stars) and column in refcat.colnames:
            match = match_sky(stars["ra"], stars["dec"], refcat["ra"], refcat["dec"], self.config.match_radius)
            s, r = match.first, match.second
            stars["ref_id"][s] = np.asarray(refcat["id"][r], np.int64)
            stars["ref_mag"][s] = np.asarray(refcat[column][r], np.float64)
            ref_ra, ref_dec = np.asarray(refcat["ra"][r], float), np.asarray(refcat["dec"][r], float)
            offsets = ((np.asarray(stars["ra"][s]) - ref_ra) * np.cos(np.radians(ref_dec)) * 3600.0,
                       (np.asarray(stars["dec"][s]) - ref_dec) * 3600.0)
            flux = np.asarray(stars["psfFlux"][s])
            if (flux > 0).any():
                zero_point = float(np.median(np.asarray(refcat[column][r])[flux > 0] + 2.5 * np.log10(flux[flux > 0])))
        n = len(offsets[0])
        scatter = math.hypot(robust_stats(offsets[0])[1], robust_stats(offsets[1])[1]) / math.sqrt(2)
        per_second = zero_point - 2.5 * math.log10(exptime) if exptime > 0 else math.nan
        for key, value, comment in (
            ("ASTNMAT", n, "stars matched to the reference catalogue"),
            ("ASTOFFRA", float(np.median(offsets[0])) if n else math.nan, "median RA offset from refcat (arcsec)"),
            ("ASTOFFDE", float(np.median(offsets[1])) if n else math.nan, "median Dec offset from refcat (arcsec)"),
            ("ASTRMS", scatter if n >= 2 else math.nan, "per-axis astrometric scatter (arcsec)"),
            ("MAGZERO", zero_point, "mag of 1 e- in this image (summed snaps)"),
            ("MAGZERO1", per_second, "mag of 1 e-/s"),
        ):  # FITS headers cannot hold NaN: -99 stands for 'not measured'
            header[key] = card(value if math.isfinite(value) else -99.0, comment)
