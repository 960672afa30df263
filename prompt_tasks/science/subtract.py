"""Image differencing: the template warped to the visit image, PSF-matched, scaled, subtracted.

The template patches of a tract share its WCS: they are placed side by side, cropped to the
detector, and warped once by reproject (``reproject_interp``, bicubic); a science image sharper
than the template is pre-convolved with the template's PSF (photutils ``EPSFBuilder``); the
template is convolved with a kernel fitted as a weighted sum of Gaussians, which also sets the
photometric scale; saturated stars are masked.
Written by hand: that kernel fit (Alard & Lupton 1998). photutils' ``create_matching_kernel``
divides the Fourier transforms of two noiseless PSF images, which amplifies the noise of PSFs
built from stars; no library used here fits a kernel basis to the images themselves. The
Gaussians are ``scipy.ndimage.gaussian_filter``: separable, 4x cheaper than astropy's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.nddata import CCDData, NDData, StdDevUncertainty
from astropy.wcs import WCS
from photutils.psf import EPSFBuilder, extract_stars
from reproject import reproject_interp
from scipy import ndimage, signal

from prompt_tasks.science.calibrate import isolated
from prompt_tasks.science.imaging import GAUSSIAN_FWHM, card, find_point_sources, pixel_scale, robust_stats, wcs_of

__all__ = ["SubtractConfig", "SubtractConnections", "SubtractTask", "fit_kernel", "saturated_regions"]

_VISIT = ("instrument", "visit", "detector")


class SubtractConnections(pipe_base.PipelineTaskConnections, dimensions=_VISIT):
    """Visit image and overlapping template patches in; difference and matched template out."""

    science = cT.Input(name="visit_image", storageClass="CCDImage", dimensions=_VISIT,
                       doc="Calibrated, background-subtracted visit image.")
    templates = cT.Input(name="template_coadd", storageClass="CCDImage", multiple=True, deferLoad=True,
                         doc="Deep coadd patches of the visit's band overlapping the detector.",
                         dimensions=("skymap", "tract", "patch", "band"))
    difference = cT.Output(name="difference_image", storageClass="CCDImage", dimensions=_VISIT,
                           doc="Science minus PSF-matched template (e-); mask = no template or bad science.")
    matched_template = cT.Output(name="template_matched", storageClass="CCDImage", dimensions=_VISIT,
                                 doc="Template warped to the science grid, PSF-matched and scaled (e-).")


class SubtractConfig(pipe_base.PipelineTaskConfig, pipelineConnections=SubtractConnections):
    """Resampling and fitting parameters."""

    interpolation = pex_config.Field[str](doc="reproject_interp order (bilinear leaves star residuals).", default="bicubic")
    default_template_fwhm = pex_config.Field[float](doc="Template PSF FWHM (arcsec) without PSFFWHM.", default=0.7)
    kernel_basis = pex_config.ListField[float](
        doc="Widths (in units of the nominal matching kernel) of the Gaussians whose linear combination is "
        "fitted as the matching kernel (0: a delta).", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    min_psf_ratio = pex_config.Field[float](
        doc="Pre-convolve the science image unless its PSF is this much broader than the template's.", default=1.1)
    saturated_min_pixels = pex_config.Field[int](doc="Masked blobs this large are saturated stars.", default=2)
    saturated_grow = pex_config.Field[float](doc="Saturated stars are masked this many PSF sigmas out.", default=6.0)
    fit_clip = pex_config.Field[float](doc="Pixels this many sigmas off the kernel fit are left out.", default=6.0)
    min_coverage = pex_config.Field[float](doc="No work when templates cover less than this.", default=0.05)


def saturated_regions(bad: np.ndarray, min_pixels: int, grow: float) -> np.ndarray:
    """Masked blobs of at least ``min_pixels`` (saturated cores with their halo), grown by ``grow`` pixels."""
    labels, n = ndimage.label(bad)
    if not n:
        return np.zeros_like(bad)
    sizes = ndimage.sum_labels(bad, labels, np.arange(1, n + 1))
    big = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    return ndimage.binary_dilation(big, iterations=max(1, math.ceil(grow))) if big.any() else big


def fit_kernel(science: np.ndarray, template: np.ndarray, good: np.ndarray, sigmas: Sequence[float],
               clip: float = 6.0, iterations: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Fit science ≈ Σ c_i (template ⊗ G_σi) + offset over the ``good`` pixels.

    Weighted least squares (sky plus photon noise of the model), pixels off by more than
    ``clip`` of their sigma (transients, cosmic rays) dropped at each iteration. Returns the
    matched template and the coefficients (by ascending sigma, offset last; the others sum to the flux scale).
    """
    basis, last, previous = [], 0.0, template
    for s in sorted(sigmas):  # each Gaussian from the narrower one before: G(a) ⊗ G(b) = G(hypot(a, b))
        if s > last:
            previous, last = ndimage.gaussian_filter(previous, math.sqrt(s**2 - last**2), mode="constant"), s
        basis.append(template if s <= 0 else previous)
    index = np.flatnonzero(good)[:: max(1, int(good.sum()) // 400_000)]
    design = np.column_stack([b.ravel()[index] for b in basis] + [np.ones(len(index))])
    target = science.ravel()[index]
    sky_var = max(robust_stats(target)[1], 1e-12) ** 2
    weights = 1.0 / (sky_var + np.clip(target, 0, None))
    use = np.ones(len(index), bool)
    coefficients = np.r_[1.0, np.zeros(len(basis))]
    for _ in range(iterations):
        if use.sum() < 10 * design.shape[1]:
            break
        root = np.sqrt(weights[use])
        coefficients = np.linalg.lstsq(design[use] * root[:, None], target[use] * root, rcond=None)[0]
        model = design @ coefficients
        weights = 1.0 / (sky_var + np.clip(model, 0, None))
        normalized = (target - model) * np.sqrt(weights)
        use = np.abs(normalized) < clip * max(robust_stats(normalized[use])[1], 1e-12)
    return sum(c * b for c, b in zip(coefficients[:-1], basis, strict=True)) + coefficients[-1], coefficients


def _seen(gaps: np.ndarray, gaps_wcs: WCS, wcs: WCS, shape: tuple[int, int], block: int = 8) -> bool:
    """Whether a ``gaps`` pixel (on ``gaps_wcs``) is near the ``shape`` grid of ``wcs`` (blocks' centres tested)."""
    padded = np.pad(gaps, [(0, -n % block) for n in gaps.shape])
    by, bx = np.nonzero(padded.reshape(padded.shape[0] // block, block, -1, block).any(axis=(1, 3)))
    x, y = wcs.world_to_pixel(gaps_wcs.pixel_to_world(bx * block + block / 2, by * block + block / 2))
    return bool(np.any((x > -3 * block) & (x < shape[1] + 3 * block) & (y > -3 * block) & (y < shape[0] + 3 * block)))


def warp_templates(templates: Sequence[CCDData], wcs: WCS, shape: tuple[int, int], order: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Template patches warped onto ``wcs``: each tract's patches (same WCS but CRPIX) placed side by side, cropped
    to the detector and reprojected once, a plane of gaps between patches alongside. Returns image and coverage."""
    warped, covered = np.zeros(shape), np.zeros(shape, bool)
    groups: dict[tuple, list[tuple[np.ndarray, WCS]]] = {}
    for t in templates:
        if (w := wcs_of(t.meta)) is not None:
            key = (*w.wcs.crval, *w.wcs.ctype, *np.round(w.wcs.crpix % 1, 6),  # patches on one pixel grid
                   *(w.wcs.cd if w.wcs.has_cd() else w.wcs.get_pc() * w.wcs.cdelt).ravel())
            groups.setdefault(key, []).append((np.asarray(t.data, np.float64), w))
    for patches in groups.values():
        w = patches[0][1]
        corners = np.array(w.world_to_pixel(wcs.pixel_to_world(*np.meshgrid([-1, shape[1]], [-1, shape[0]]))))
        lo, hi = np.floor(corners.min(axis=(1, 2))).astype(int) - 8, np.ceil(corners.max(axis=(1, 2))).astype(int) + 8
        canvas = np.zeros((2, *(hi - lo)[::-1])) + np.array([0.0, 1.0])[:, None, None]  # image, gaps (no patch: 1)
        for data, pw in patches:  # the first patch covering a pixel wins
            x, y = np.round(w.wcs.crpix - pw.wcs.crpix).astype(int) - lo
            view = canvas[:, max(y, 0):max(y + data.shape[0], 0), max(x, 0):max(x + data.shape[1], 0)]
            cut, fresh = data[max(-y, 0):, max(-x, 0):][: view.shape[1], : view.shape[2]], view[1] > 0
            view[0][fresh], view[1][fresh] = cut[fresh], 0.0
        canvas_wcs = w.deepcopy()
        canvas_wcs.wcs.crpix = w.wcs.crpix - lo
        image, footprint = reproject_interp((canvas if _seen(canvas[1] > 0, canvas_wcs, wcs, shape) else canvas[:1],
                                            canvas_wcs), wcs, shape_out=shape, order=order, roundtrip_coords=False)
        new = ~covered & (footprint[0] > 0.999) & np.isfinite(image[0]) & (np.abs(image[-1]) < 1e-3 if len(image) > 1 else True)
        warped[new], covered[new] = image[0][new], True
    return warped, covered


def template_psf(warped: np.ndarray, covered: np.ndarray, sigma: float, max_stars: int = 40) -> np.ndarray | None:
    """The warped template's PSF (sum 1): photutils' ePSF of its brightest isolated stars, None if too few."""
    stars = find_point_sources(warped, sigma, 50.0, mask=~covered, edge=math.ceil(6 * sigma))
    stars = stars[isolated(stars["x"], stars["y"], 6 * sigma)]
    stars = stars[np.argsort(-np.asarray(stars["snr"]))[:max_stars]]  # the builder's cost grows with the stars
    if len(stars) < 5:
        return None
    cutouts = extract_stars(NDData(warped, mask=~covered), stars, size=2 * math.ceil(5 * sigma) + 1)
    with warnings.catch_warnings():  # stars the builder rejects are reported as warnings
        warnings.simplefilter("ignore")
        epsf, _ = EPSFBuilder(oversampling=1, maxiters=5, progress_bar=False)(cutouts)
    data = np.clip(epsf.data, 0, None)
    return data / data.sum() if data.sum() > 0 else None


class SubtractTask(pipe_base.PipelineTask):
    """Subtract the PSF-matched, warped template from the visit image."""

    ConfigClass = SubtractConfig
    config: SubtractConfig
    _DefaultName = "subtract"

    def runQuantum(self, butlerQC: pipe_base.QuantumContext, inputRefs: pipe_base.InputQuantizedConnection,
                   outputRefs: pipe_base.OutputQuantizedConnection) -> None:
        science = butlerQC.get(inputRefs.science)
        templates = [handle.get() for handle in butlerQC.get(inputRefs.templates)]
        butlerQC.put(self.run(science, templates), outputRefs)

    def run(self, science: CCDData, templates: Sequence[CCDData]) -> pipe_base.Struct:
        """Return ``difference`` and ``matched_template`` for one visit image."""
        cfg, header = self.config, science.meta
        science_wcs = wcs_of(header)
        if science_wcs is None:
            raise pipe_base.NoWorkFound("The visit image has no WCS: nothing to warp the template to.")
        warped, covered = warp_templates(templates, science_wcs, science.data.shape, cfg.interpolation)
        coverage = float(covered.mean())
        if coverage < cfg.min_coverage:
            raise pipe_base.NoWorkFound(f"Templates cover {coverage:.1%} of the detector.")
        fwhm = np.median([float(t.meta.get("PSFFWHM", cfg.default_template_fwhm)) for t in templates])
        template_sigma = float(fwhm) / (GAUSSIAN_FWHM * pixel_scale(science_wcs))
        science_sigma = float(header.get("PSFSIG", 1.7))
        # For Gaussian PSFs the matching kernel is G(sqrt(target² − template²)); a science image
        # sharper than the template is first convolved with the template's PSF (then the kernel
        # is the science PSF, which a positive kernel can always represent).
        pre = 0.0 if science_sigma >= cfg.min_psf_ratio * template_sigma else template_sigma
        target = math.hypot(science_sigma, pre)
        kernel_sigma = math.sqrt(max(target**2 - template_sigma**2, 0.01))
        bad = ~covered
        science_bad = np.zeros_like(bad) if science.mask is None else np.asarray(science.mask, bool)
        sci = np.where(bad, 0.0, np.asarray(science.data, np.float64))
        psf = template_psf(warped, covered, template_sigma) if pre > 0 else None
        if pre > 0:  # a Gaussian of the template's width when it has too few stars for an ePSF
            sci = ndimage.gaussian_filter(sci, pre, mode="constant") if psf is None else signal.fftconvolve(
                sci, psf, mode="same")
        widths = [f * kernel_sigma for f in (cfg.kernel_basis or [1.0])]
        reach = math.ceil(3 * max(*widths, pre))
        bad = ndimage.binary_dilation(bad, iterations=max(1, reach))
        bad |= saturated_regions(science_bad, cfg.saturated_min_pixels, cfg.saturated_grow * target)
        matched, coefficients = fit_kernel(sci, warped, ~(bad | science_bad), widths, cfg.fit_clip)
        scale, offset = float(np.sum(coefficients[:-1])), float(coefficients[-1])
        difference = np.where(bad, 0.0, sci - matched)
        out = header.copy()
        for key, value, comment in (
            ("PSFSIG", target, "PSF sigma of the difference image (pixels)"),
            ("PSFMATCH", "both" if pre > 0 else "template", "image convolved for PSF matching"),
            ("SCISIG", science_sigma, "science PSF sigma (pixels)"),
            ("PRECONV", pre, "science pre-convolution sigma (pixels)"),
            ("KERNSIG", kernel_sigma, "matching kernel sigma (pixels)"),
            ("TMPLSIG", template_sigma, "template PSF sigma (pixels)"),
            ("TMPLSCAL", scale, "fitted template scale (e- per template unit)"),
            ("TMPLOFFS", offset, "fitted residual offset (e-)"),
            ("TMPLCOV", coverage, "fraction of pixels covered by the template"),
            ("DIFNOISE", robust_stats(difference[~bad][::5])[1], "robust pixel noise of the difference (e-)"),
        ):
            out[key] = card(value, comment)
        self.log.info("Subtract: %d template patch(es), coverage %.1f%%, %s convolved (kernel %.2f px), scale %.4g",
                      len(templates), 100 * coverage, out["PSFMATCH"], kernel_sigma, scale)
        sigma = None if science.uncertainty is None else StdDevUncertainty(science.uncertainty.array.astype(np.float32))
        return pipe_base.Struct(
            difference=CCDData(difference.astype(np.float32), unit="electron", meta=out, mask=bad, uncertainty=sigma),
            matched_template=CCDData(np.where(bad, 0.0, matched).astype(np.float32), unit="electron", meta=out.copy(),
                                     mask=bad))
