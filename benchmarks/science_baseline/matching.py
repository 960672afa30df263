"""Positional matching of two sky catalogues (calibration against the refcat, association).

Coordinates go to unit vectors on the sphere and a k-d tree answers nearest-neighbour
queries; matches are one-to-one, closest pairs first, within a radius.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["SkyMatch", "match_sky", "unit_vectors"]

_ARCSEC = math.pi / (180.0 * 3600.0)


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Cartesian unit vectors (N, 3) of sky positions in degrees."""
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    cos_dec = np.cos(dec)
    return np.stack(
        [cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)], axis=-1
    ).reshape(-1, 3)


class SkyMatch:
    """One-to-one matches: indices into both catalogues and separations in arcsec."""

    def __init__(
        self, first: np.ndarray, second: np.ndarray, separation: np.ndarray
    ) -> None:
        self.first = first
        self.second = second
        self.separation = separation

    def __len__(self) -> int:
        return len(self.first)


def match_sky(
    ra1: np.ndarray,
    dec1: np.ndarray,
    ra2: np.ndarray,
    dec2: np.ndarray,
    radius_arcsec: float,
) -> SkyMatch:
    """Match catalogue 1 to catalogue 2 one-to-one within ``radius_arcsec``.

    Candidate pairs are accepted closest first, so that a source between two objects goes to
    the nearer one and no entry of either catalogue is used twice.
    """
    empty = SkyMatch(np.zeros(0, dtype=int), np.zeros(0, dtype=int), np.zeros(0))
    if len(ra1) == 0 or len(ra2) == 0:
        return empty
    v1, v2 = unit_vectors(ra1, dec1), unit_vectors(ra2, dec2)
    chord = 2.0 * math.sin(radius_arcsec * _ARCSEC / 2.0)
    pairs = cKDTree(v2).query_ball_point(v1, chord)
    i1 = np.fromiter((i for i, js in enumerate(pairs) for _ in js), dtype=int)
    i2 = np.fromiter((j for js in pairs for j in js), dtype=int)
    if len(i1) == 0:
        return empty
    chords = np.linalg.norm(v1[i1] - v2[i2], axis=1)
    sep = 2.0 * np.arcsin(np.clip(chords / 2.0, 0, 1)) / _ARCSEC
    used1 = np.zeros(len(ra1), dtype=bool)
    used2 = np.zeros(len(ra2), dtype=bool)
    keep: list[int] = []
    for k in np.argsort(sep, kind="stable"):
        if not used1[i1[k]] and not used2[i2[k]]:
            used1[i1[k]] = used2[i2[k]] = True
            keep.append(int(k))
    idx = np.array(keep, dtype=int)
    order = np.argsort(i1[idx], kind="stable")
    idx = idx[order]
    return SkyMatch(i1[idx], i2[idx], sep[idx])
