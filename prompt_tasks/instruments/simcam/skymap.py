"""A simple tract/patch skymap (lsst-skymap is not installable from PyPI).

One tract per survey field: a TAN projection about the field centre, north up, 0.2"/pixel,
cut into square patches of ``patch_inner`` pixels that overlap their neighbours by
``patch_border`` pixels on each side. Patch ids are ``y * nx + x``. The skymap is described by
a plain dict (the ``skyMap`` dataset) and rebuilt from it with :meth:`SimSkyMap.from_dict`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.wcs import WCS
from lsst.sphgeom import ConvexPolygon, Region

from prompt_tasks.instruments.simcam.geometry import PIXEL_SCALE, tangent_to_sky

__all__ = ["SKYMAP", "PatchInfo", "SimSkyMap"]

#: Name of the skymap ``central init`` registers.
SKYMAP = "sim"


@dataclass(frozen=True)
class PatchInfo:
    """One patch: ids, cell indices, the pixel box within its tract (with border) and region."""

    tract: int
    id: int
    cell_x: int
    cell_y: int
    #: Tract pixels covered, 0-based, half-open: ``(x0, y0, x1, y1)``.
    bbox: tuple[int, int, int, int]
    region: ConvexPolygon


@dataclass(frozen=True)
class SimSkyMap:
    """Tracts (one per field) and their patches."""

    name: str
    tracts: dict[int, tuple[float, float, int, int]]
    pixel_scale: float = PIXEL_SCALE
    patch_inner: int = 1000
    patch_border: int = 50

    @classmethod
    def for_field(cls, ra: float, dec: float, half_width_deg: float, name: str = SKYMAP,
                  patch_inner: int = 1000, patch_border: int = 50) -> SimSkyMap:
        """A one-tract skymap covering a square of ``2 * half_width_deg`` about (ra, dec)."""
        n = max(1, math.ceil(2 * half_width_deg * 3600 / PIXEL_SCALE / patch_inner))
        return cls(name, {0: (ra, dec, n, n)}, PIXEL_SCALE, patch_inner, patch_border)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimSkyMap:
        """Rebuild from :meth:`to_dict` (the ``skyMap`` dataset)."""
        tracts = {int(k): (float(v["ra"]), float(v["dec"]), int(v["nx"]), int(v["ny"]))
                  for k, v in data["tracts"].items()}
        return cls(data["name"], tracts, float(data["pixel_scale"]), int(data["patch_inner"]),
                   int(data["patch_border"]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "name": self.name, "pixel_scale": self.pixel_scale, "patch_inner": self.patch_inner,
            "patch_border": self.patch_border,
            "tracts": {str(k): {"ra": ra, "dec": dec, "nx": nx, "ny": ny}
                       for k, (ra, dec, nx, ny) in self.tracts.items()},
        }

    @property
    def hash(self) -> bytes:
        """A digest of the description (the ``skymap`` record's ``hash``)."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).digest()

    def tract_wcs(self, tract: int) -> WCS:
        """The tract's WCS (0-based tract pixels through astropy)."""
        ra, dec, nx, ny = self.tracts[tract]
        scale = self.pixel_scale / 3600.0
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval = [ra, dec]
        wcs.wcs.crpix = [nx * self.patch_inner / 2 + 0.5, ny * self.patch_inner / 2 + 0.5]
        wcs.wcs.cd = [[-scale, 0.0], [0.0, scale]]
        return wcs

    def patch_wcs(self, tract: int, patch: int) -> WCS:
        """The WCS of a patch image (its pixel (0, 0) is the bbox corner)."""
        x0, y0, _, _ = self.patch(tract, patch).bbox
        wcs = self.tract_wcs(tract).deepcopy()
        wcs.wcs.crpix = [wcs.wcs.crpix[0] - x0, wcs.wcs.crpix[1] - y0]
        return wcs

    def _polygon(self, tract: int, x0: float, y0: float, x1: float, y1: float) -> ConvexPolygon:
        from lsst.sphgeom import LonLat, UnitVector3d

        ra, dec, nx, ny = self.tracts[tract]
        cx, cy = nx * self.patch_inner / 2 - 0.5, ny * self.patch_inner / 2 - 0.5
        xs, ys = np.array([x0, x1, x1, x0]) - 0.5, np.array([y0, y0, y1, y1]) - 0.5
        xi, eta = -(xs - cx) * self.pixel_scale / 3600.0, (ys - cy) * self.pixel_scale / 3600.0
        ras, decs = tangent_to_sky(xi, eta, ra, dec)
        return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(float(a), float(d))) for a, d in zip(ras, decs, strict=False)])

    def tract_region(self, tract: int) -> ConvexPolygon:
        """The sky a tract covers."""
        _, _, nx, ny = self.tracts[tract]
        return self._polygon(tract, 0, 0, nx * self.patch_inner, ny * self.patch_inner)

    def patch(self, tract: int, patch: int) -> PatchInfo:
        """One patch of a tract."""
        _, _, nx, ny = self.tracts[tract]
        if not 0 <= patch < nx * ny:
            raise KeyError(f"tract {tract} has no patch {patch}")
        cy, cx = divmod(patch, nx)
        b, n = self.patch_border, self.patch_inner
        bbox = (cx * n - b, cy * n - b, (cx + 1) * n + b, (cy + 1) * n + b)
        return PatchInfo(tract, patch, cx, cy, bbox, self._polygon(tract, *bbox))

    def patches(self, tract: int) -> Iterator[PatchInfo]:
        """Every patch of a tract."""
        _, _, nx, ny = self.tracts[tract]
        for patch in range(nx * ny):
            yield self.patch(tract, patch)

    def patches_overlapping(self, region: Region) -> list[PatchInfo]:
        """Patches whose (bordered) region overlaps ``region``."""
        return [p for tract in self.tracts for p in self.patches(tract)
                if not p.region.isDisjointFrom(region)]
