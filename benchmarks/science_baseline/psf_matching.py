"""PSF matching of a template to a science image: Gaussian kernels, a fitted kernel basis.

Pure array functions used by the subtraction task: bring both images to one PSF
(:func:`match_psfs`, pre-convolving the science image when it is the sharper one), fit the
matching kernel as a weighted combination of Gaussians (:func:`fit_kernel`, Alard-Lupton
style) or just a photometric scale (:func:`fit_scale`), and find saturated stars to mask
(:func:`saturated_regions`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal

from benchmarks.science_baseline.imaging import robust_stats

__all__ = ["PsfMatch", "fit_kernel", "fit_scale", "match_psfs", "saturated_regions"]


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
