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
from scipy import ndimage

from prompt_tasks.science.imaging import GAUSSIAN_FWHM, card, robust_stats, wcs_of

__all__ = [
    "PsfMatch",
    "SubtractConfig",
    "SubtractConnections",
    "SubtractTask",
    "fit_scale",
    "match_psfs",
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
    fit_clip = pex_config.Field[float](
        doc="Sigma clipping of the scale fit.", default=3.0
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
    """Which image was convolved, with what kernel, and the common PSF sigma (pixels)."""

    convolved: str  # "template", "science" or "none"
    kernel_sigma: float
    matched_sigma: float


def match_psfs(
    science: np.ndarray,
    template: np.ndarray,
    science_sigma: float,
    template_sigma: float,
) -> tuple[np.ndarray, np.ndarray, PsfMatch]:
    """Convolve the sharper image with the Gaussian bringing it to the broader PSF.

    For Gaussian PSFs the matching kernel is exactly a Gaussian of sigma
    sqrt(broad² − sharp²).
    """
    if abs(science_sigma - template_sigma) < 1e-3:
        return science, template, PsfMatch("none", 0.0, science_sigma)
    broad, sharp = (
        max(science_sigma, template_sigma),
        min(science_sigma, template_sigma),
    )
    kernel = math.sqrt(broad**2 - sharp**2)
    if template_sigma < science_sigma:
        template = ndimage.gaussian_filter(
            template, kernel, mode="constant", truncate=4.0
        )
        return science, template, PsfMatch("template", kernel, broad)
    science = ndimage.gaussian_filter(science, kernel, mode="constant", truncate=4.0)
    return science, template, PsfMatch("science", kernel, broad)


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
        sci_m, tmpl_m, match = match_psfs(sci, warped, science_sigma, template_sigma)
        # Convolution spreads the template's edge: grow the mask by the kernel's reach.
        if match.kernel_sigma > 0:
            bad = ndimage.binary_dilation(
                bad, iterations=max(1, math.ceil(3 * match.kernel_sigma))
            )
        scale, offset = fit_scale(
            sci_m, tmpl_m, ~(bad | science_bad), self.config.fit_clip
        )
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
