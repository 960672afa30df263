"""How many injected transients a pipeline found: ground truth against detected DIA sources.

:func:`score` is pure: truth (``ra``, ``dec``, ``mag``) against detections (``ra``, ``dec``)
matched within a radius. :func:`apdb_sources` reads one visit-detector's DIA sources back from
the APDB, which is where ``ApPipe`` stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Recovery", "apdb_sources", "score"]


@dataclass(frozen=True)
class Recovery:
    """Completeness and false detections of one or more visit-detectors."""

    #: Injected transients brighter than the magnitude limit.
    injected: int
    #: Of those, how many a detection matched.
    found: int
    #: Detections matching no transient (of any magnitude).
    false: int

    @property
    def completeness(self) -> float:
        """``found / injected`` (1 when nothing was injected)."""
        return self.found / self.injected if self.injected else 1.0

    def __add__(self, other: Recovery) -> Recovery:
        return Recovery(self.injected + other.injected, self.found + other.found, self.false + other.false)


def _xyz(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    a, d = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])


def score(truth_ra: Any, truth_dec: Any, truth_mag: Any, det_ra: Any, det_dec: Any,
          radius_arcsec: float = 1.0, mag_limit: float = 23.0) -> Recovery:
    """Match detections to the truth within ``radius_arcsec`` (any detection counts once)."""
    t_xyz, d_xyz = _xyz(truth_ra, truth_dec), _xyz(det_ra, det_dec)
    bright = np.asarray(truth_mag, float) <= mag_limit
    if len(t_xyz) == 0 or len(d_xyz) == 0:
        return Recovery(int(bright.sum()), 0, len(d_xyz))
    cos_radius = np.cos(np.radians(radius_arcsec / 3600.0))
    close = (t_xyz @ d_xyz.T) >= cos_radius  # truth × detections
    found = int((close.any(axis=1) & bright).sum())
    false = int((~close.any(axis=0)).sum())
    return Recovery(int(bright.sum()), found, false)


def apdb_sources(apdb_config: str, region: Any, visit: int, detector: int, visit_time: Any) -> Any:
    """The DIA sources of one visit-detector in the APDB (a pandas frame, maybe empty)."""
    from lsst.dax.apdb import Apdb

    apdb = Apdb.from_uri(apdb_config)
    frame = apdb.getDiaSources(region, None, visit_time)
    if frame is None or len(frame) == 0:
        return frame
    return frame[(frame["visit"] == visit) & (frame["detector"] == detector)]
