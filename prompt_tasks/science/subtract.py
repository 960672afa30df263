"""Image differencing: the template warped to the visit image, PSF-matched, scaled, subtracted.

Each overlapping template patch is resampled onto the science pixel grid through both WCSes
(bicubic, ``scipy.ndimage.map_coordinates``); the sharper of the two images is convolved with
the Gaussian that gives it the broader one's PSF; the template's photometric scale and a
residual offset are fitted robustly on the pixels (transients are clipped away), and the
difference is science minus the matched template.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.wcs import WCS
from scipy import ndimage, signal

from prompt_tasks.science.imaging import (
    GAUSSIAN_FWHM,
    card,
    detect_peaks,
    empirical_psf,
    robust_stats,
    wcs_of,
)

__all__ = [
    "PsfMatch",
    "SubtractConfig",
    "SubtractConnections",
    "SubtractTask",
    "fit_kernel",
    "fit_scale",
    "match_psfs",
    "saturated_regions",
    "warp_image",
]

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


def _node_positions(n: int, step: int) -> np.ndarray:
    """Exact-mapping nodes along an axis of ``n`` pixels: every ``step`` and the last pixel."""
    nodes = np.arange(0, n, step, dtype=np.float64)
    return nodes if nodes[-1] == n - 1 else np.append(nodes, n - 1)


def _linear_weights(n: int, nodes: np.ndarray) -> np.ndarray:
    """Matrix (n, len(nodes)) interpolating linearly between ``nodes``."""
    eye = np.eye(len(nodes))
    return np.stack(
        [
            np.interp(np.arange(n, dtype=np.float64), nodes, eye[k])
            for k in range(len(nodes))
        ],
        axis=1,
    )


def warp_image(
    data: np.ndarray,
    source_wcs: WCS,
    target_wcs: WCS,
    shape: tuple[int, int],
    order: int = 3,
    step: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (on ``source_wcs``) resampled onto the ``shape`` grid of ``target_wcs``.

    Returns the warped image and a boolean map of target pixels the source covers. The
    target→source pixel mapping is exact on a grid of nodes ``step`` apart and bilinear in
    between (a TAN-to-TAN mapping is smooth; the error is far below a millipixel).
    """
    ny, nx = shape
    ys, xs = _node_positions(ny, step), _node_positions(nx, step)
    gx, gy = np.meshgrid(xs, ys)
    ra, dec = target_wcs.all_pix2world(gx, gy, 0)
    sx, sy = source_wcs.all_world2pix(ra, dec, 0)
    wy, wx = _linear_weights(ny, ys), _linear_weights(nx, xs)
    src_x = wy @ sx @ wx.T
    src_y = wy @ sy @ wx.T
    finite = np.isfinite(data)
    warped = ndimage.map_coordinates(
        np.where(finite, data, 0.0).astype(np.float64),
        [src_y, src_x],
        order=order,
        mode="constant",
        cval=0.0,
    )
    sny, snx = data.shape
    margin = 1.0 if order > 1 else 0.0
    covered = (
        (src_x >= margin)
        & (src_x <= snx - 1 - margin)
        & (src_y >= margin)
        & (src_y <= sny - 1 - margin)
    )
    if not finite.all():
        holes = ndimage.map_coordinates(
            (~finite).astype(np.float64), [src_y, src_x], order=1, cval=1.0
        )
        covered &= holes < 0.01
    return np.where(covered, warped, 0.0), covered


@dataclass(frozen=True)
class PsfMatch:
    """How the two images were brought to a common PSF (sigmas in pixels)."""

    #: ``"template"`` or ``"both"`` (the science image pre-convolved too).
    convolved: str
    kernel_sigma: float
    matched_sigma: float
    preconvolution_sigma: float = 0.0


def match_psfs(
    science: np.ndarray,
    template: np.ndarray,
    science_sigma: float,
    template_sigma: float,
    min_ratio: float = 1.2,
    template_psf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, PsfMatch]:
    """Bring both images to one PSF by convolving the template (and the science).

    For Gaussian PSFs the matching kernel is exactly a Gaussian of sigma
    sqrt(science² − template²). When the science PSF is not at least ``min_ratio`` times
    broader than the template's, the science image is first convolved with (a Gaussian model
    of) the template's PSF: then science ⊗ PSF_template = template ⊗ PSF_science, and the
    kernel taking the template there is the science PSF itself, which a positive kernel can
    always represent, wings included ("pre-convolution"). ``template_psf``, an image of the
    template's PSF (e.g. stacked from its stars), makes that exact for PSFs that are not
    Gaussian.
    """
    if science_sigma >= min_ratio * template_sigma:
        pre, target = 0.0, science_sigma
    else:
        pre, target = template_sigma, math.hypot(science_sigma, template_sigma)
    if pre > 0 and template_psf is not None:
        science = signal.fftconvolve(science, template_psf, mode="same")
    elif pre > 0:
        science = ndimage.gaussian_filter(science, pre, mode="constant", truncate=4.0)
    kernel = math.sqrt(target**2 - template_sigma**2)
    template = ndimage.gaussian_filter(template, kernel, mode="constant", truncate=4.0)
    convolved = "both" if pre > 0 else "template"
    return science, template, PsfMatch(convolved, kernel, target, pre)


def saturated_regions(bad: np.ndarray, min_pixels: int, grow: float) -> np.ndarray:
    """Masked blobs of at least ``min_pixels`` (saturated star cores), grown by ``grow`` pixels.

    Isolated bad pixels (hot pixels, a cosmic ray in every snap) are left out: calibration
    interpolated them and they do no harm; a saturated core is surrounded by a bright halo
    that must be masked too.
    """
    if not bad.any():
        return np.zeros_like(bad)
    labels, n = ndimage.label(bad)
    sizes = ndimage.sum_labels(bad, labels, np.arange(1, n + 1))
    big = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    if not big.any():
        return big
    return ndimage.binary_dilation(big, iterations=max(1, math.ceil(grow)))


def fit_kernel(
    science: np.ndarray,
    template: np.ndarray,
    good: np.ndarray,
    sigmas: Sequence[float],
    clip: float = 6.0,
    iterations: int = 5,
    photon_noise: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Alard-Lupton-style matching: science ≈ Σ c_i (template ⊗ G_σi) + offset.

    The kernel is a linear combination of Gaussians of the given widths (σ = 0: a delta),
    fitted by weighted least squares over the ``good`` pixels. Each pixel is weighted by its
    noise: the sky noise plus, with ``photon_noise`` (science in electrons), the photon noise
    of the model, so bright stars (which carry the PSF-shape information) count fully without
    dominating. Pixels deviating by more than ``clip`` of their own sigma (transients, cosmic
    rays) are dropped at each iteration. A sum of Gaussians matches PSFs that are not single
    Gaussians (cores and wings of different widths); the sum of the coefficients is the
    photometric scale. Returns the matched template and the coefficients (offset last).
    """
    basis = [
        template
        if sigma <= 0
        else ndimage.gaussian_filter(template, sigma, mode="constant", truncate=4.0)
        for sigma in sigmas
    ]
    step = max(1, int(good.sum()) // 400_000)
    index = np.flatnonzero(good)[::step]
    design = np.column_stack([b.ravel()[index] for b in basis] + [np.ones(len(index))])
    target = science.ravel()[index]
    _, sky_sigma = robust_stats(target)
    sky_variance = max(sky_sigma, 1e-12) ** 2
    use = np.ones(len(index), dtype=bool)
    # First weights from the science pixels themselves, later ones from the model.
    weights = 1.0 / (sky_variance + (np.clip(target, 0, None) if photon_noise else 0.0))
    coefficients = np.zeros(len(basis) + 1)
    coefficients[0] = 1.0
    for _ in range(iterations):
        if use.sum() < 10 * design.shape[1]:
            break
        sqrt_w = np.sqrt(weights[use])
        coefficients, *_ = np.linalg.lstsq(
            design[use] * sqrt_w[:, None], target[use] * sqrt_w, rcond=None
        )
        model = design @ coefficients
        variance = sky_variance + (np.clip(model, 0, None) if photon_noise else 0.0)
        weights = 1.0 / variance
        normalized = (target - model) * np.sqrt(weights)
        _, scatter = robust_stats(normalized[use])
        use = np.abs(normalized) < clip * max(scatter, 1e-12)
    matched = (
        sum(c * b for c, b in zip(coefficients[:-1], basis, strict=True))
        + coefficients[-1]
    )
    return np.asarray(matched), coefficients


def fit_scale(
    science: np.ndarray,
    template: np.ndarray,
    good: np.ndarray,
    clip: float = 3.0,
    iterations: int = 5,
) -> tuple[float, float]:
    """Robust least squares of science ≈ scale × template + offset over the ``good`` pixels.

    Pixels with large residuals (transients, cosmic rays, artefacts) are clipped at each
    iteration, so the scale is set by the static sky.
    """
    s = science[good].astype(np.float64)
    t = template[good].astype(np.float64)
    use = np.ones(s.shape, dtype=bool)
    scale, offset = 1.0, 0.0
    for _ in range(iterations):
        if use.sum() < 10:
            break
        design = np.column_stack([t[use], np.ones(int(use.sum()))])
        (scale, offset), *_ = np.linalg.lstsq(design, s[use], rcond=None)
        residual = s - (scale * t + offset)
        _, sigma = robust_stats(residual[use])
        if sigma <= 0:
            break
        use = np.abs(residual) < clip * sigma
    return float(scale), float(offset)


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
        from prompt_tasks.science.calibrate import isolated

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
