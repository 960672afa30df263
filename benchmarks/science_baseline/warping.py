"""Resampling an image onto another image's pixel grid through both WCSes.

The target→source pixel mapping is computed exactly on a coarse grid of nodes and
interpolated bilinearly in between (TAN-to-TAN mappings are smooth); the pixels are then
resampled with a cubic spline (``scipy.ndimage.map_coordinates``).
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage

__all__ = ["warp_image"]


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
