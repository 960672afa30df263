"""SimCam's focal plane, filters and photometry, and the sky footprint of a detector.

The focal plane is a set of square detectors on an LSSTCam-like grid of 3×3-detector rafts
(21 science rafts, 189 detectors). Detector ids run raft by raft from the centre outwards, so
the first nine are always raft ``R22`` (the ComCam-like default) and any count is a compact
patch of the focal plane.

Sky geometry is a pure gnomonic (TAN) projection about the boresight, without distortion:
focal-plane coordinates ``(u, v)`` in arcsec map to tangent-plane coordinates
``(xi, eta) = M(camera_angle) · (u, v)``, where with a camera angle of 0 ``+v`` points north
and ``+u`` west, and the camera angle is the position angle of ``+v`` east of north. Every
detector's FITS WCS is that same projection (``CRVAL`` = boresight), so great-circle detector
edges are exact and footprints of neighbours never overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

__all__ = [
    "BANDS",
    "DETECTOR_GAP_PX",
    "FILTERS",
    "PIXEL_SCALE",
    "RAFT_GAP_PX",
    "SKY_BRIGHTNESS",
    "ZERO_POINTS",
    "DetectorGeometry",
    "FocalPlane",
    "band_of",
    "focal_plane",
    "footprint",
    "physical_filter",
    "sky_to_tangent",
    "tangent_to_sky",
]

#: Arcsec per pixel.
PIXEL_SCALE = 0.2
#: Bands, blue to red.
BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z", "y")
#: Physical filter name → band.
FILTERS: dict[str, str] = {f"SimCam-{band}": band for band in BANDS}
#: Magnitude giving 1 electron per second (AB), per band (LSST-like throughputs).
ZERO_POINTS: dict[str, float] = {"u": 26.5, "g": 28.3, "r": 28.1, "i": 27.9, "z": 27.5, "y": 26.7}
#: Dark-sky brightness (AB mag per arcsec²) per band.
SKY_BRIGHTNESS: dict[str, float] = {"u": 22.9, "g": 22.3, "r": 21.2, "i": 20.5, "z": 19.6, "y": 18.6}
#: Gap between detectors of a raft, and extra gap between rafts (pixels).
DETECTOR_GAP_PX = 8
RAFT_GAP_PX = 40

# Science rafts of the 5x5 grid (corners hold wavefront sensors, not simulated), centre out.
_RAFTS = sorted(
    ((rx, ry) for rx in range(5) for ry in range(5) if (rx, ry) not in {(0, 0), (0, 4), (4, 0), (4, 4)}),
    key=lambda r: ((r[0] - 2) ** 2 + (r[1] - 2) ** 2, r[1], r[0]),
)
MAX_DETECTORS = 9 * len(_RAFTS)


def physical_filter(band: str) -> str:
    """The physical filter name of ``band``."""
    return f"SimCam-{band}"


def band_of(filter_name: str) -> str:
    """The band of a physical filter (a bare band name is accepted too)."""
    if filter_name in FILTERS:
        return FILTERS[filter_name]
    if filter_name in BANDS:
        return filter_name
    raise ValueError(f"unknown SimCam filter {filter_name!r}")


@dataclass(frozen=True)
class DetectorGeometry:
    """One detector: id, name and its placement on the focal plane."""

    id: int
    raft: str
    sensor: str
    #: Centre on the focal plane (arcsec, ``u`` west-ish, ``v`` north-ish at angle 0).
    u: float
    v: float
    #: Rotation of the detector's pixel axes on the focal plane (deg, counter-clockwise).
    rotation: float
    nx: int
    ny: int

    @property
    def name(self) -> str:
        """``Rxy_Syz``."""
        return f"{self.raft}_{self.sensor}"

    def pixel_to_focal(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel coordinates → focal-plane arcsec."""
        c, s = math.cos(math.radians(self.rotation)), math.sin(math.radians(self.rotation))
        dx = (np.asarray(x, float) - (self.nx - 1) / 2) * PIXEL_SCALE
        dy = (np.asarray(y, float) - (self.ny - 1) / 2) * PIXEL_SCALE
        return self.u + c * dx - s * dy, self.v + s * dx + c * dy

    def focal_to_pixel(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Focal-plane arcsec → 0-based pixel coordinates."""
        c, s = math.cos(math.radians(self.rotation)), math.sin(math.radians(self.rotation))
        du, dv = np.asarray(u, float) - self.u, np.asarray(v, float) - self.v
        return ((c * du + s * dv) / PIXEL_SCALE + (self.nx - 1) / 2,
                (-s * du + c * dv) / PIXEL_SCALE + (self.ny - 1) / 2)


def _sky_matrix(camera_angle: float) -> np.ndarray:
    """Focal plane (u, v) → tangent plane (xi east, eta north)."""
    phi = math.radians(camera_angle)
    return np.array([[-math.cos(phi), math.sin(phi)], [math.sin(phi), math.cos(phi)]])


def tangent_to_sky(xi: np.ndarray, eta: np.ndarray, ra: float, dec: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic deprojection: tangent-plane degrees about (ra, dec) → (ra, dec) degrees."""
    xi_r, eta_r = np.radians(np.asarray(xi, float)), np.radians(np.asarray(eta, float))
    ra0, dec0 = math.radians(ra), math.radians(dec)
    denom = math.cos(dec0) - eta_r * math.sin(dec0)
    out_ra = ra0 + np.arctan2(xi_r, denom)
    out_dec = np.arctan2(math.sin(dec0) + eta_r * math.cos(dec0), np.hypot(xi_r, denom))
    return np.degrees(out_ra) % 360.0, np.degrees(out_dec)


def sky_to_tangent(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection about (ra0, dec0): degrees → tangent-plane degrees (xi, eta)."""
    a, d = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi), np.degrees(eta)


def _polygon(ra: np.ndarray, dec: np.ndarray) -> ConvexPolygon:
    return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(float(r), float(d))) for r, d in zip(ra, dec, strict=False)])


@dataclass(frozen=True)
class FocalPlane:
    """The detectors of a SimCam configuration."""

    n_detectors: int = 9
    size: int = 512

    def __post_init__(self) -> None:
        if not 1 <= self.n_detectors <= MAX_DETECTORS:
            raise ValueError(f"SimCam has 1..{MAX_DETECTORS} detectors, not {self.n_detectors}")
        if self.size < 16:
            raise ValueError(f"detector size {self.size} is too small")

    @cached_property
    def detectors(self) -> tuple[DetectorGeometry, ...]:
        """Every detector, by id."""
        pitch = self.size + DETECTOR_GAP_PX
        raft_pitch = 3 * pitch + RAFT_GAP_PX
        out = []
        for det_id in range(self.n_detectors):
            rx, ry = _RAFTS[det_id // 9]
            sx, sy = divmod(det_id % 9, 3)
            u = ((rx - 2) * raft_pitch + (sx - 1) * pitch) * PIXEL_SCALE
            v = ((ry - 2) * raft_pitch + (sy - 1) * pitch) * PIXEL_SCALE
            # Like LSSTCam's two sensor vendors, alternate rafts are turned by 180 degrees.
            rotation = 180.0 if (rx + ry) % 2 else 0.0
            out.append(DetectorGeometry(det_id, f"R{rx}{ry}", f"S{sx}{sy}", -u, v, rotation,
                                        self.size, self.size))
        return tuple(out)

    def __getitem__(self, detector: int) -> DetectorGeometry:
        return self.detectors[detector]

    def by_name(self, name: str) -> DetectorGeometry:
        """The detector called ``name`` (``R22_S11``)."""
        for det in self.detectors:
            if det.name == name:
                return det
        raise KeyError(name)

    @property
    def radius_deg(self) -> float:
        """Distance from the boresight to the farthest detector corner (deg)."""
        half = self.size * PIXEL_SCALE / 2 * math.sqrt(2)
        return max(math.hypot(d.u, d.v) + half for d in self.detectors) / 3600.0

    def wcs_header(self, detector: int, ra: float, dec: float, camera_angle: float) -> dict[str, float | str]:
        """FITS TAN WCS keywords of ``detector`` for a boresight and camera angle."""
        det = self[detector]
        c, s = math.cos(math.radians(det.rotation)), math.sin(math.radians(det.rotation))
        rot = np.array([[c, -s], [s, c]])
        cd = _sky_matrix(camera_angle) @ rot * (PIXEL_SCALE / 3600.0)
        # Pixel of the boresight: solve u=v=0 (FITS pixels are 1-based).
        off = rot.T @ np.array([-det.u, -det.v]) / PIXEL_SCALE
        return {
            "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
            "CRVAL1": float(ra), "CRVAL2": float(dec),
            "CRPIX1": float(off[0] + (det.nx - 1) / 2 + 1), "CRPIX2": float(off[1] + (det.ny - 1) / 2 + 1),
            "CD1_1": float(cd[0, 0]), "CD1_2": float(cd[0, 1]), "CD2_1": float(cd[1, 0]), "CD2_2": float(cd[1, 1]),
            "RADESYS": "ICRS", "EQUINOX": 2000.0,
        }

    def pixel_to_sky(self, detector: int, x: np.ndarray, y: np.ndarray, ra: float, dec: float,
                     camera_angle: float) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel coordinates of ``detector`` → (ra, dec) degrees."""
        u, v = self[detector].pixel_to_focal(x, y)
        xi, eta = _sky_matrix(camera_angle) @ np.vstack([np.ravel(u), np.ravel(v)]) / 3600.0
        return tangent_to_sky(xi, eta, ra, dec)

    def sky_to_pixel(self, detector: int, sky_ra: np.ndarray, sky_dec: np.ndarray, ra: float, dec: float,
                     camera_angle: float) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) degrees → 0-based pixel coordinates of ``detector``."""
        xi, eta = sky_to_tangent(sky_ra, sky_dec, ra, dec)
        # _sky_matrix is its own inverse (a reflection).
        u, v = _sky_matrix(camera_angle) @ np.vstack([np.ravel(xi), np.ravel(eta)]) * 3600.0
        return self[detector].focal_to_pixel(u, v)

    def footprint(self, detector: int, ra: float, dec: float, camera_angle: float,
                  pad_deg: float = 0.0) -> ConvexPolygon:
        """The sky polygon ``detector`` sees, grown by ``pad_deg`` on every side.

        This is what preload uses before any pixel exists: the detector's outer pixel edges
        projected through the boresight and camera angle.
        """
        det = self[detector]
        pad = pad_deg * 3600.0 / PIXEL_SCALE
        x0, x1 = -0.5 - pad, det.nx - 0.5 + pad
        y0, y1 = -0.5 - pad, det.ny - 0.5 + pad
        cra, cdec = self.pixel_to_sky(detector, np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]),
                                      ra, dec, camera_angle)
        poly = _polygon(cra, cdec)
        return poly

    @cached_property
    def extent(self) -> tuple[float, float, float, float]:
        """``(u0, u1, v0, v1)``: the focal-plane box (arcsec) holding every detector's outer
        pixel edges. It does not depend on the pointing: computed once per focal plane."""
        us, vs = [], []
        for det in self.detectors:
            u, v = det.pixel_to_focal(np.array([-0.5, det.nx - 0.5, det.nx - 0.5, -0.5]),
                                      np.array([-0.5, -0.5, det.ny - 0.5, det.ny - 0.5]))
            us.append(u)
            vs.append(v)
        u_all, v_all = np.concatenate(us), np.concatenate(vs)
        return float(u_all.min()), float(u_all.max()), float(v_all.min()), float(v_all.max())

    def visit_region(self, ra: float, dec: float, camera_angle: float, pad_deg: float = 0.0) -> ConvexPolygon:
        """A polygon enclosing every detector of the focal plane (with a pixel to spare)."""
        u0, u1, v0, v1 = self.extent
        pad = pad_deg * 3600.0 + PIXEL_SCALE  # one pixel more, so edges never coincide
        u0, u1, v0, v1 = u0 - pad, u1 + pad, v0 - pad, v1 + pad
        us, vs = np.array([u0, u1, u1, u0]), np.array([v0, v0, v1, v1])
        xi, eta = _sky_matrix(camera_angle) @ np.vstack([us, vs]) / 3600.0
        return _polygon(*tangent_to_sky(xi, eta, ra, dec))


@cache
def focal_plane(n_detectors: int = 9, size: int = 512) -> FocalPlane:
    """The focal plane of ``n_detectors`` of ``size``² pixels, built once per process (it is
    immutable; its detectors and extent are computed on first use and kept)."""
    return FocalPlane(n_detectors, size)


def footprint(detector: int, ra: float, dec: float, camera_angle: float, pad_deg: float = 0.0,
              focal_plane: FocalPlane | None = None) -> ConvexPolygon:
    """The predicted sky footprint of ``detector`` (default focal plane: 9 detectors of 512²)."""
    return (focal_plane or FocalPlane()).footprint(detector, ra, dec, camera_angle, pad_deg)
