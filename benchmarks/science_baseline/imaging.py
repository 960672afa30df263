"""Pixel-level building blocks shared by the science tasks (numpy/scipy/astropy only).

Robust statistics, a meshed background model, a matched-filter peak detector and an
adaptive-moment PSF width: the measurements the ISR, calibration, subtraction and detection
tasks are made of. Everything here takes arrays and returns arrays or plain numbers, so it is
unit-tested on synthetic images without a Butler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

__all__ = [
    "GAUSSIAN_FWHM",
    "Peaks",
    "background_model",
    "card",
    "detect_peaks",
    "empirical_psf",
    "gaussian_image",
    "measure_psf_sigma",
    "peaks_table",
    "robust_sigma",
    "robust_stats",
    "wcs_of",
]

#: FWHM of a Gaussian in units of its sigma.
GAUSSIAN_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def robust_stats(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based sigma of the finite ``values`` (outlier-proof)."""
    finite = np.asarray(values)[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    median = float(np.median(finite))
    return median, float(1.4826 * np.median(np.abs(finite - median)))


def robust_sigma(values: np.ndarray) -> float:
    """MAD-based standard deviation of the finite ``values``."""
    return robust_stats(values)[1]


def card(
    value: float | str | bool, comment: str
) -> tuple[float | int | str | bool, str]:
    """A FITS header (value, comment) pair that fits one 80-character card.

    Floats are rounded to 7 significant digits and comments cut to 44 characters, so that
    astropy never has to truncate (and warn).
    """
    if isinstance(value, float) and math.isfinite(value):
        value = float(f"{value:.7g}")
    return value, comment[:44]


def wcs_of(header: fits.Header | dict) -> WCS | None:
    """The celestial WCS in ``header``, or None when it has none."""
    if "CTYPE1" not in header:
        return None
    hdr = header if isinstance(header, fits.Header) else fits.Header(header)
    return WCS(hdr).celestial


def background_model(
    image: np.ndarray,
    bin_size: int = 64,
    mask: np.ndarray | None = None,
    clip: float = 3.0,
) -> np.ndarray:
    """A smooth sky background the size of ``image``.

    Bright pixels (more than ``clip`` sigma above the median, grown by 2 pixels) and the pixels
    of ``mask`` are ignored; the median of each ``bin_size`` cell is median-filtered over 3x3
    cells and interpolated bilinearly between cell centres.
    """
    median, sigma = robust_stats(image[::4, ::4] if image.size > 1 << 20 else image)
    bad = ~np.isfinite(image)
    if sigma > 0:
        bad |= ndimage.binary_dilation(image > median + clip * sigma, iterations=2)
    if mask is not None:
        bad |= mask
    ny, nx = image.shape
    gy, gx = max(1, math.ceil(ny / bin_size)), max(1, math.ceil(nx / bin_size))
    padded = np.full((gy * bin_size, gx * bin_size), np.nan, dtype=np.float64)
    padded[:ny, :nx] = np.where(bad, np.nan, image)
    cells = (
        padded.reshape(gy, bin_size, gx, bin_size)
        .transpose(0, 2, 1, 3)
        .reshape(gy, gx, -1)
    )
    counts = np.isfinite(cells).sum(axis=2)
    grid = np.full((gy, gx), median, dtype=np.float64)
    enough = counts > bin_size  # at least one row's worth of unmasked pixels
    if enough.any():
        grid[enough] = np.nanmedian(cells[enough], axis=1)
    grid = ndimage.median_filter(grid, size=3, mode="nearest")
    return (
        _interpolation_matrix(ny, gy, bin_size)
        @ grid
        @ _interpolation_matrix(nx, gx, bin_size).T
    )


def _interpolation_matrix(n: int, cells: int, bin_size: int) -> np.ndarray:
    """Weights (n, cells) interpolating linearly between cell centres, flat beyond them."""
    position = np.clip(
        (np.arange(n, dtype=np.float64) + 0.5) / bin_size - 0.5, 0, cells - 1
    )
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, cells - 1)
    frac = position - lower
    weights = np.zeros((n, cells))
    weights[np.arange(n), lower] += 1 - frac
    weights[np.arange(n), upper] += frac
    return weights


def gaussian_image(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, sigma: float
) -> np.ndarray:
    """Point sources of total ``flux`` at (``x``, ``y``) with a circular Gaussian PSF."""
    image = np.zeros(shape, dtype=np.float64)
    half = math.ceil(5 * sigma)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    for xi, yi, fi in zip(
        np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux), strict=True
    ):
        ix, iy = round(xi), round(yi)
        stamp = np.exp(
            -((xx - (xi - ix)) ** 2 + (yy - (yi - iy)) ** 2) / (2 * sigma**2)
        )
        stamp *= fi / (2 * math.pi * sigma**2)
        y0, y1 = iy - half, iy + half + 1
        x0, x1 = ix - half, ix + half + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1 = stamp.shape[0] - max(0, y1 - shape[0])
        sx1 = stamp.shape[1] - max(0, x1 - shape[1])
        if sy1 > sy0 and sx1 > sx0:
            image[max(0, y0) : min(shape[0], y1), max(0, x0) : min(shape[1], x1)] += (
                stamp[sy0:sy1, sx0:sx1]
            )
    return image


@dataclass(frozen=True)
class Peaks:
    """Point-source detections of :func:`detect_peaks` (pixel coordinates, PSF fluxes)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    snr: np.ndarray
    #: Robust standard deviation of the matched-filtered image (noise of one detection).
    filtered_sigma: float

    def __len__(self) -> int:
        return len(self.x)


def detect_peaks(
    image: np.ndarray,
    psf_sigma: float,
    threshold: float = 5.0,
    mask: np.ndarray | None = None,
    negative: bool = False,
    edge: int = 4,
    variance: np.ndarray | None = None,
) -> Peaks:
    """Find point sources by matched filtering with the PSF.

    ``image`` must be background-subtracted. It is convolved with a Gaussian of the PSF's
    width; local maxima whose filtered value exceeds ``threshold`` times its noise are
    sources. The noise is the robust sigma of the filtered image, measured on the image
    itself so correlated noise (resampling, convolution) is accounted for; with a per-pixel
    ``variance`` it is modulated by the variance under the filter (the photon noise of
    bright stars), scaled so that it agrees with the measured noise on typical pixels. PSF
    fluxes follow from the filtered peak value (exact for a Gaussian PSF). ``negative`` finds
    sources of negative flux.
    """
    data = np.where(np.isfinite(image), image, 0.0).astype(np.float64)
    if negative:
        data = -data
    bad = np.zeros(data.shape, dtype=bool) if mask is None else mask.copy()
    data[bad] = 0.0
    filtered = ndimage.gaussian_filter(data, psf_sigma, mode="constant", truncate=4.0)
    # Pixels whose filter window touches masked pixels are unreliable.
    near_bad = (
        ndimage.binary_dilation(bad, iterations=max(1, round(2 * psf_sigma)))
        if bad.any()
        else bad
    )
    valid = ~near_bad
    valid[:edge, :] = valid[-edge:, :] = False
    valid[:, :edge] = valid[:, -edge:] = False
    stride = max(1, int(valid.sum()) // 200_000)
    _, sigma = robust_stats(filtered[valid][::stride])
    if sigma <= 0:
        empty = np.zeros(0)
        return Peaks(empty, empty, empty, empty, empty, float(sigma))
    noise: np.ndarray | float = sigma
    if variance is not None:
        # Var(sum G_k I_k) = sum G_k^2 V_k, and G_sigma^2 = G_(sigma/sqrt2) / (4 pi sigma^2).
        var = np.where(np.isfinite(variance) & ~bad, variance, 0.0).astype(np.float64)
        model = np.sqrt(
            np.clip(
                ndimage.gaussian_filter(var, psf_sigma / math.sqrt(2), mode="constant"),
                0,
                None,
            )
            / (4 * math.pi * psf_sigma**2)
        )
        typical = float(np.median(model[valid][::stride])) if valid.any() else 0.0
        if typical > 0:
            noise = np.maximum(model * (sigma / typical), sigma)
    size = max(3, 2 * round(1.5 * psf_sigma) + 1)
    is_peak = (filtered == ndimage.maximum_filter(filtered, size=size)) & valid
    snr_map = filtered / noise
    is_peak &= snr_map > threshold
    py, px = np.nonzero(is_peak)
    x = px + _gaussian_offset(filtered, py, px, axis=1)
    y = py + _gaussian_offset(filtered, py, px, axis=0)
    peak = filtered[py, px]
    flux = peak * 4 * math.pi * psf_sigma**2
    snr = snr_map[py, px]
    flux_err = flux / np.where(snr == 0, 1, snr)
    sign = -1.0 if negative else 1.0
    return Peaks(x, y, sign * flux, np.abs(flux_err), snr, float(sigma))


def _gaussian_offset(
    image: np.ndarray, py: np.ndarray, px: np.ndarray, axis: int
) -> np.ndarray:
    """Sub-pixel offset of peaks along ``axis`` from a Gaussian through three samples.

    The logarithm of a Gaussian is a parabola, so the vertex of the parabola through the log
    of the peak pixel and its two neighbours is the exact centre of a Gaussian profile (and
    unbiased towards the pixel centre, unlike first moments in a small box).
    """
    if len(px) == 0:
        return np.zeros(0)
    ny, nx = image.shape
    if axis == 1:
        before = image[py, np.clip(px - 1, 0, nx - 1)]
        after = image[py, np.clip(px + 1, 0, nx - 1)]
    else:
        before = image[np.clip(py - 1, 0, ny - 1), px]
        after = image[np.clip(py + 1, 0, ny - 1), px]
    centre = image[py, px]
    tiny = 1e-12 * np.maximum(np.abs(centre), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        lb, lc, la = (np.log(np.maximum(v, tiny)) for v in (before, centre, after))
        curvature = lb - 2 * lc + la
        offset = np.where(curvature < 0, 0.5 * (lb - la) / curvature, 0.0)
    return np.clip(np.nan_to_num(offset), -0.5, 0.5)


def measure_psf_sigma(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    guess: float = 2.0,
    half: int = 10,
    iterations: int = 8,
) -> np.ndarray:
    """PSF Gaussian sigma (pixels) of each star at (``x``, ``y``) by adaptive second moments.

    ``image`` is background-subtracted. For a Gaussian of sigma p weighted by a Gaussian of
    sigma w the weighted second moment is q = p²w²/(p²+w²), so p² = q w²/(w² − q); the weight
    is iterated to w = p. Stars too close to the edge give NaN.
    """
    ny, nx = image.shape
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    out = np.full(len(x), np.nan)
    for k, (xk, yk) in enumerate(zip(x, y, strict=True)):
        ix, iy = round(xk), round(yk)
        if not (half <= ix < nx - half and half <= iy < ny - half):
            continue
        stamp = image[iy - half : iy + half + 1, ix - half : ix + half + 1]
        dx, dy = xx - (xk - ix), yy - (yk - iy)
        r2 = dx**2 + dy**2
        w2 = guess**2
        p2 = math.nan
        for _ in range(iterations):
            weight = np.exp(-r2 / (2 * w2))
            norm = float((stamp * weight).sum())
            if norm <= 0:
                p2 = math.nan
                break
            q = float((stamp * weight * r2).sum()) / (2 * norm)
            if not 0 < q < w2:
                p2 = math.nan
                break
            p2 = q * w2 / (w2 - q)
            w2 = p2
        out[k] = math.sqrt(p2) if math.isfinite(p2) and p2 > 0 else math.nan
    return out


def empirical_psf(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    half: int,
    mask: np.ndarray | None = None,
) -> np.ndarray | None:
    """A PSF image (2·half+1 square, sum 1) stacked from the stars at (``x``, ``y``).

    Each star's cutout is shifted to the stamp centre (cubic spline), normalized to unit
    sum and the median of the stack taken, so a neighbour or a cosmic ray in one stamp does
    not enter. Stars whose stamp leaves the image or touches ``mask`` are skipped; None when
    fewer than three stars remain.
    """
    ny, nx = image.shape
    pad = half + 2
    stamps = []
    for xi, yi in zip(np.asarray(x, float), np.asarray(y, float), strict=True):
        ix, iy = round(xi), round(yi)
        if not (pad <= ix < nx - pad and pad <= iy < ny - pad):
            continue
        window = (slice(iy - pad, iy + pad + 1), slice(ix - pad, ix + pad + 1))
        if mask is not None and mask[window].any():
            continue
        cut = ndimage.shift(
            image[window].astype(np.float64),
            (iy - yi, ix - xi),
            order=3,
            mode="nearest",
        )
        stamp = cut[2:-2, 2:-2]
        total = stamp.sum()
        if total > 0:
            stamps.append(stamp / total)
    if len(stamps) < 3:
        return None
    psf = np.clip(np.median(stamps, axis=0), 0, None)
    return psf / psf.sum()


def peaks_table(peaks: Peaks, wcs: WCS | None) -> Table:
    """Detections as an astropy table with sky coordinates when a WCS is known."""
    table = Table()
    table["x"] = np.asarray(peaks.x, dtype=np.float64)
    table["y"] = np.asarray(peaks.y, dtype=np.float64)
    if wcs is not None and len(peaks):
        ra, dec = wcs.all_pix2world(peaks.x, peaks.y, 0)
    else:
        ra = dec = np.full(len(peaks), np.nan)
    table["ra"] = np.asarray(ra, dtype=np.float64)
    table["dec"] = np.asarray(dec, dtype=np.float64)
    table["psfFlux"] = np.asarray(peaks.flux, dtype=np.float64)
    table["psfFluxErr"] = np.asarray(peaks.flux_err, dtype=np.float64)
    table["snr"] = np.asarray(peaks.snr, dtype=np.float64)
    return table
