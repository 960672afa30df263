"""Image differencing: the template warped to the visit image, PSF-matched, scaled, subtracted.

Each overlapping template patch is resampled onto the science pixel grid through both WCSes
(:mod:`.warping`); the template is convolved to the science PSF (the science image first
pre-convolved with the template's PSF when it is the sharper one) with a kernel fitted as a
weighted sum of Gaussians, which also sets the photometric scale (:mod:`.psf_matching`);
saturated stars are masked, and the difference is science minus the matched template.
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
from astropy.wcs import WCS
from scipy import ndimage

from benchmarks.science_baseline.imaging import (
    GAUSSIAN_FWHM,
    card,
    detect_peaks,
    empirical_psf,
    robust_stats,
    wcs_of,
)
from benchmarks.science_baseline.psf_matching import (
    fit_kernel,
    fit_scale,
    match_psfs,
    saturated_regions,
)
from benchmarks.science_baseline.warping import warp_image

__all__ = ["SubtractConfig", "SubtractConnections", "SubtractTask"]

_VISIT_DIMENSIONS = ("instrument", "visit", "detector")


class SubtractConnections(
    pipe_base.PipelineTaskConnections, dimensions=_VISIT_DIMENSIONS
):
    """Visit image and overlapping template patches in; difference and matched template out."""

    science = cT.Input(
        name="visit_image",
        storageClass="CCDImage",
        doc="Calibrated, background-subtracted visit image.",
        dimensions=_VISIT_DIMENSIONS,
    )
    templates = cT.Input(
        name="template_coadd",
        storageClass="CCDImage",
        doc="Deep coadd patches of the visit's band overlapping the detector.",
        dimensions=("skymap", "tract", "patch", "band"),
        multiple=True,
        deferLoad=True,
    )
    difference = cT.Output(
        name="difference_image",
        storageClass="CCDImage",
        doc="Science minus PSF-matched template (electrons); mask = no template or bad science.",
        dimensions=_VISIT_DIMENSIONS,
    )
    matched_template = cT.Output(
        name="template_matched",
        storageClass="CCDImage",
        doc="Template warped to the science grid, PSF-matched and scaled (electrons).",
        dimensions=_VISIT_DIMENSIONS,
    )


class SubtractConfig(
    pipe_base.PipelineTaskConfig, pipelineConnections=SubtractConnections
):
    """Resampling and fitting parameters."""

    interpolation_order = pex_config.Field[int](
        doc="Spline order of the resampling.", default=3
    )
    mapping_step = pex_config.Field[int](
        doc="The pixel mapping is computed exactly every this many pixels and interpolated between.",
        default=32,
    )
    default_template_fwhm = pex_config.Field[float](
        doc="Template PSF FWHM (arcsec) when its header has no PSFFWHM.", default=0.7
    )
    kernel_basis = pex_config.ListField[float](
        doc="Widths (in units of the nominal matching kernel) of the Gaussians whose linear "
        "combination is fitted as the matching kernel; empty: the nominal Gaussian kernel only.",
        default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0],
    )
    min_psf_ratio = pex_config.Field[float](
        doc="Pre-convolve the science image unless its PSF is this much broader than the template's.",
        default=1.2,
    )
    saturated_min_pixels = pex_config.Field[int](
        doc="Masked blobs this large in the science image are saturated stars.",
        default=2,
    )
    saturated_grow = pex_config.Field[float](
        doc="Saturated stars are masked this many PSF sigmas beyond their core.",
        default=6.0,
    )
    fit_clip = pex_config.Field[float](
        doc="Pixels this many of their own sigmas off the kernel fit are left out (transients).",
        default=6.0,
    )
    min_coverage = pex_config.Field[float](
        doc="Fail (no work) when templates cover less than this fraction of the detector.",
        default=0.05,
    )


class SubtractTask(pipe_base.PipelineTask):
    """Subtract the PSF-matched, warped template from the visit image."""

    ConfigClass = SubtractConfig
    config: SubtractConfig
    _DefaultName = "subtract"

    def runQuantum(
        self,
        butlerQC: pipe_base.QuantumContext,
        inputRefs: pipe_base.InputQuantizedConnection,
        outputRefs: pipe_base.OutputQuantizedConnection,
    ) -> None:
        science = butlerQC.get(inputRefs.science)
        handles = butlerQC.get(inputRefs.templates)
        outputs = self.run(science, [handle.get() for handle in handles])
        butlerQC.put(outputs, outputRefs)

    def run(self, science: CCDData, templates: Sequence[CCDData]) -> pipe_base.Struct:
        """Return ``difference`` and ``matched_template`` for one visit image."""
        header = science.meta
        science_wcs = wcs_of(header)
        if science_wcs is None:
            raise pipe_base.NoWorkFound(
                "The visit image has no WCS: nothing to warp the template to."
            )
        shape = science.data.shape
        warped, covered, template_sigma = self._assemble_template(
            templates, science_wcs, shape
        )
        coverage = float(covered.mean())
        if coverage < self.config.min_coverage:
            raise pipe_base.NoWorkFound(
                f"Templates cover {coverage:.1%} of the detector."
            )
        science_sigma = float(header.get("PSFSIG", 1.7))
        # Science pixels flagged bad were interpolated by calibration: usable for detection,
        # not for fitting the template's scale.
        bad = ~covered
        science_bad = (
            np.zeros_like(bad)
            if science.mask is None
            else np.asarray(science.mask, dtype=bool)
        )
        sci = np.where(bad, 0.0, np.asarray(science.data, dtype=np.float64))
        template_psf = None
        if science_sigma < self.config.min_psf_ratio * template_sigma:
            template_psf = self._template_psf(warped, covered, template_sigma)
        sci_m, tmpl_m, match = match_psfs(
            sci,
            warped,
            science_sigma,
            template_sigma,
            self.config.min_psf_ratio,
            template_psf,
        )
        # Convolution spreads the template's edge: grow the mask by the kernels' reach.
        reach = math.ceil(
            3
            * max(
                match.kernel_sigma * max(self.config.kernel_basis or [1.0]),
                match.preconvolution_sigma,
            )
        )
        bad = ndimage.binary_dilation(bad, iterations=max(1, reach))
        # Saturated stars: their halos neither fit the kernel nor subtract cleanly.
        saturated = saturated_regions(
            science_bad,
            self.config.saturated_min_pixels,
            self.config.saturated_grow * match.matched_sigma,
        )
        bad |= saturated
        fit_pixels = ~(bad | science_bad)
        if self.config.kernel_basis:
            # Fit a sum-of-Gaussians kernel (core and wings) around the nominal one.
            sigmas = [f * match.kernel_sigma for f in self.config.kernel_basis]
            matched, coefficients = fit_kernel(
                sci_m,
                warped,
                fit_pixels,
                sigmas,
                self.config.fit_clip,
            )
            scale, offset = float(np.sum(coefficients[:-1])), float(coefficients[-1])
        else:
            scale, offset = fit_scale(sci_m, tmpl_m, fit_pixels, self.config.fit_clip)
            matched = scale * tmpl_m + offset
        difference = np.where(bad, 0.0, sci_m - matched)
        variance = (
            np.asarray(science.uncertainty.array, dtype=np.float64) ** 2
            if science.uncertainty
            else None
        )
        out_header = header.copy()
        out_header["PSFSIG"] = card(
            match.matched_sigma,
            "PSF sigma of the difference image (pixels)",
        )
        out_header["PSFMATCH"] = card(
            match.convolved, "image convolved for PSF matching"
        )
        out_header["SCISIG"] = card(science_sigma, "science PSF sigma (pixels)")
        out_header["PRECONV"] = card(
            match.preconvolution_sigma, "science pre-convolution sigma (pixels)"
        )
        out_header["KERNSIG"] = card(
            match.kernel_sigma, "matching kernel sigma (pixels)"
        )
        out_header["TMPLSIG"] = card(template_sigma, "template PSF sigma (pixels)")
        out_header["TMPLSCAL"] = card(
            scale, "fitted template scale (e- per template unit)"
        )
        out_header["TMPLOFFS"] = card(offset, "fitted residual offset (e-)")
        out_header["TMPLCOV"] = card(
            coverage, "fraction of pixels covered by the template"
        )
        _, noise = robust_stats(difference[~bad][::5])
        out_header["DIFNOISE"] = card(
            noise, "robust pixel noise of the difference (e-)"
        )
        self.log.info(
            "Subtract: %d template patch(es), coverage %.1f%%, %s convolved (kernel %.2f px), scale %.4g",
            len(templates),
            100 * coverage,
            match.convolved,
            match.kernel_sigma,
            scale,
        )
        uncertainty = None
        if variance is not None:
            uncertainty = StdDevUncertainty(np.sqrt(variance).astype(np.float32))
        diff_image = CCDData(
            difference.astype(np.float32),
            unit="electron",
            meta=out_header,
            mask=bad,
            uncertainty=uncertainty,
        )
        tmpl_image = CCDData(
            np.where(bad, 0.0, matched).astype(np.float32),
            unit="electron",
            meta=out_header.copy(),
            mask=bad,
        )
        return pipe_base.Struct(difference=diff_image, matched_template=tmpl_image)

    def _template_psf(
        self, warped: np.ndarray, covered: np.ndarray, sigma: float
    ) -> np.ndarray | None:
        """The warped template's PSF stacked from its bright isolated stars (None if too few)."""
        from benchmarks.science_baseline.calibrate import isolated

        stars = detect_peaks(
            warped / max(robust_stats(warped[covered][::7])[1], 1e-12),
            sigma,
            50.0,
            mask=~covered,
        )
        keep = isolated(stars.x, stars.y, 6 * sigma)
        half = math.ceil(5 * sigma)
        psf = empirical_psf(warped, stars.x[keep], stars.y[keep], half, mask=~covered)
        self.log.info(
            "Template PSF stacked from %d stars",
            int(keep.sum()) if psf is not None else 0,
        )
        return psf

    def _assemble_template(
        self, templates: Sequence[CCDData], science_wcs: WCS, shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Warp every patch onto the science grid; the first patch covering a pixel wins."""
        warped = np.zeros(shape, dtype=np.float64)
        covered = np.zeros(shape, dtype=bool)
        sigmas: list[float] = []
        for template in templates:
            wcs = wcs_of(template.meta)
            if wcs is None:
                continue
            image, cover = warp_image(
                np.asarray(template.data),
                wcs,
                science_wcs,
                shape,
                self.config.interpolation_order,
                self.config.mapping_step,
            )
            new = cover & ~covered
            warped[new] = image[new]
            covered |= new
            fwhm = float(
                template.meta.get("PSFFWHM", self.config.default_template_fwhm)
            )
            sigmas.append(fwhm / GAUSSIAN_FWHM / _pixel_scale_arcsec(science_wcs))
        template_sigma = float(np.median(sigmas)) if sigmas else math.nan
        return warped, covered, template_sigma


def _pixel_scale_arcsec(wcs: Any) -> float:
    """Mean pixel scale of ``wcs`` (arcsec)."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)
