"""Drawing point sources: the PSF model shared by raws and templates."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FWHM_TO_SIGMA", "WING_FRACTION", "render_points"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: Fraction of a star's light in the PSF's broad wing (a Gaussian twice as wide as the core).
WING_FRACTION = 0.1


def render_points(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                  fwhm_px: float) -> np.ndarray:
    """An image of ``shape`` with the point sources ``flux`` at 0-based pixel ``(x, y)``.

    The PSF is a double Gaussian (core of FWHM ``fwhm_px`` plus a wing), normalised to 1 on
    a stamp of ±5 wing sigmas; sources whose stamp misses the image are skipped.
    """
    image = np.zeros(shape, np.float64)
    sigma = fwhm_px * FWHM_TO_SIGMA
    half = math.ceil(10 * sigma) + 1
    offsets = np.arange(-half, half + 1)
    ny, nx = shape
    for xi, yi, fi in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float), strict=False):
        ix, iy = round(xi), round(yi)
        if ix + half < 0 or iy + half < 0 or ix - half >= nx or iy - half >= ny or not fi > 0:
            continue
        gx, gy = offsets + ix - xi, offsets + iy - yi
        core_x, core_y = np.exp(-0.5 * (gx / sigma) ** 2), np.exp(-0.5 * (gy / sigma) ** 2)
        wing_x, wing_y = np.exp(-0.125 * (gx / sigma) ** 2), np.exp(-0.125 * (gy / sigma) ** 2)
        stamp = ((1 - WING_FRACTION) * np.outer(core_y, core_x) / (core_x.sum() * core_y.sum())
                 + WING_FRACTION * np.outer(wing_y, wing_x) / (wing_x.sum() * wing_y.sum()))
        x0, y0 = ix - half, iy - half
        sx0, sy0 = max(0, -x0), max(0, -y0)
        sx1, sy1 = min(stamp.shape[1], nx - x0), min(stamp.shape[0], ny - y0)
        image[y0 + sy0:y0 + sy1, x0 + sx0:x0 + sx1] += fi * stamp[sy0:sy1, sx0:sx1]
    return image
