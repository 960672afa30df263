"""One-to-one positional matching of two sky catalogues (refcat calibration, association, scoring).

astropy's ``search_around_sky`` finds every pair within the radius; written by hand is only
the one-to-one rule (closest pairs first, no entry used twice), which astropy does not offer.
"""

from __future__ import annotations

from dataclasses import dataclass

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord, search_around_sky

__all__ = ["SkyMatch", "match_sky"]


@dataclass(frozen=True)
class SkyMatch:
    """One-to-one matches: indices into both catalogues and separations (arcsec)."""

    first: np.ndarray
    second: np.ndarray
    separation: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def match_sky(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray, radius_arcsec: float) -> SkyMatch:
    """Match catalogue 1 to catalogue 2 one-to-one within ``radius_arcsec``, closest pairs first."""
    if len(ra1) == 0 or len(ra2) == 0:
        return SkyMatch(np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    first = SkyCoord(np.asarray(ra1, float), np.asarray(dec1, float), unit="deg")
    second = SkyCoord(np.asarray(ra2, float), np.asarray(dec2, float), unit="deg")
    i1, i2, sep, _ = search_around_sky(first, second, radius_arcsec * u.arcsec)
    sep = sep.to_value(u.arcsec)
    used1, used2, keep = set(), set(), []
    for k in np.argsort(sep, kind="stable"):
        if i1[k] not in used1 and i2[k] not in used2:
            used1.add(i1[k])
            used2.add(i2[k])
            keep.append(k)
    idx = np.array(sorted(keep, key=lambda k: i1[k]), int)
    return SkyMatch(i1[idx].astype(int), i2[idx].astype(int), sep[idx])
