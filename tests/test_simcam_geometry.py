"""SimCam's focal plane: detector layout, WCS and predicted sky footprints."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from lsst.sphgeom import LonLat, UnitVector3d

from prompt_tasks.instruments import known_instruments, load_plugin
from prompt_tasks.instruments.simcam.geometry import (
    FILTERS,
    PIXEL_SCALE,
    FocalPlane,
    band_of,
    tangent_to_sky,
)


def _point(ra: float, dec: float) -> UnitVector3d:
    return UnitVector3d(LonLat.fromDegrees(float(ra), float(dec)))


def test_default_focal_plane_is_one_comcam_like_raft() -> None:
    plane = FocalPlane()
    assert [d.name for d in plane.detectors] == [f"R22_S{x}{y}" for x in range(3) for y in range(3)]
    assert [d.id for d in plane.detectors] == list(range(9))
    assert plane[4].u == pytest.approx(0.0) and plane[4].v == pytest.approx(0.0)


def test_full_focal_plane_has_189_unique_detectors_with_r22_first() -> None:
    plane = FocalPlane(189, 64)
    names = [d.name for d in plane.detectors]
    assert len(set(names)) == 189
    assert names[:9] == [d.name for d in FocalPlane().detectors]
    assert {d.raft for d in plane.detectors} == {f"R{x}{y}" for x in range(5) for y in range(5)} - {
        "R00", "R04", "R40", "R44"}
    assert {d.rotation for d in plane.detectors} == {0.0, 180.0}
    with pytest.raises(ValueError):
        FocalPlane(190)


@pytest.mark.parametrize("angle", [0.0, 37.0, 180.0])
def test_footprints_of_nine_detectors_tile_without_overlap(angle: float) -> None:
    plane = FocalPlane(9, 512)
    ra, dec = 105.0, -15.0
    polys = [plane.footprint(d, ra, dec, angle) for d in range(9)]
    for a, b in itertools.combinations(range(9), 2):
        assert polys[a].isDisjointFrom(polys[b]), (a, b)
    assert polys[4].contains(_point(ra, dec))
    # Sample a disc inside the raft, whatever its rotation: every point is in at most one
    # detector, and the detectors cover all but the gaps.
    rng = np.random.default_rng(1)
    radius = 1.5 * 512 * PIXEL_SCALE / 3600
    hits = []
    for _ in range(600):
        r, theta = radius * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        pra, pdec = tangent_to_sky(np.array([r * math.cos(theta)]), np.array([r * math.sin(theta)]), ra, dec)
        hits.append(sum(p.contains(_point(pra[0], pdec[0])) for p in polys))
    hits_arr = np.array(hits)
    assert hits_arr.max() == 1
    assert hits_arr.mean() > 0.9


@pytest.mark.parametrize("angle", [0.0, 90.0, 211.0])
def test_rotation_turns_the_focal_plane_on_the_sky(angle: float) -> None:
    plane = FocalPlane(9, 512)
    ra, dec = 30.0, 10.0
    centre = SkyCoord(ra, dec, unit="deg")
    # R22_S12 sits at +v (north at camera angle 0), R22_S21 at -u (east at angle 0).
    north = plane.by_name("R22_S12")
    east = plane.by_name("R22_S21")
    for det, pa0 in ((north, 0.0), (east, 90.0)):
        cx, cy = (det.nx - 1) / 2, (det.ny - 1) / 2
        dra, ddec = plane.pixel_to_sky(det.id, np.array([cx]), np.array([cy]), ra, dec, angle)
        pa = centre.position_angle(SkyCoord(dra[0], ddec[0], unit="deg")).deg
        assert (pa - (pa0 + angle) + 180) % 360 - 180 == pytest.approx(0.0, abs=0.05)
        foot = plane.footprint(det.id, ra, dec, angle)
        assert foot.contains(_point(dra[0], ddec[0]))


def test_wcs_header_agrees_with_the_geometry_and_round_trips() -> None:
    plane = FocalPlane(18, 256)
    ra, dec, angle = 200.0, -40.0, 63.0
    for det in (0, 7, 13):
        header = fits.Header(plane.wcs_header(det, ra, dec, angle))
        wcs = WCS(header)
        x = np.array([0.0, 100.0, 255.0])
        y = np.array([0.0, 200.0, 17.0])
        sra, sdec = plane.pixel_to_sky(det, x, y, ra, dec, angle)
        world = wcs.pixel_to_world(x, y)
        assert np.allclose(world.ra.deg, sra, atol=1e-9)
        assert np.allclose(world.dec.deg, sdec, atol=1e-9)
        px, py = plane.sky_to_pixel(det, sra, sdec, ra, dec, angle)
        assert np.allclose(px, x, atol=1e-6) and np.allclose(py, y, atol=1e-6)
        scales = np.sqrt(np.abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600
        assert scales == pytest.approx(PIXEL_SCALE)


def test_padding_grows_the_footprint() -> None:
    plane = FocalPlane()
    tight = plane.footprint(0, 10.0, 0.0, 0.0)
    padded = plane.footprint(0, 10.0, 0.0, 0.0, pad_deg=0.01)
    assert padded.contains(tight)
    assert not tight.contains(padded)


def test_visit_region_contains_every_detector() -> None:
    plane = FocalPlane(27, 128)
    region = plane.visit_region(5.0, 5.0, 20.0)
    for det in range(27):
        assert region.contains(plane.footprint(det, 5.0, 5.0, 20.0))


def test_filters_and_bands() -> None:
    assert set(FILTERS.values()) == set("ugrizy")
    assert band_of("SimCam-i") == "i" and band_of("i") == "i"
    with pytest.raises(ValueError):
        band_of("SimCam-w")


def test_plugin_is_found_by_name() -> None:
    assert "SimCam" in known_instruments()
    plugin = load_plugin("SimCam")
    assert plugin.instrument_class.getName() == "SimCam"
    assert plugin.key_scheme == "dmtn-219"
    plane = plugin.geometry({"n_detectors": 3, "size": 100})
    assert len(plane.detectors) == 3
    assert plugin.geometry(None).footprint(4, 0.0, 0.0, 0.0).contains(_point(0.0, 0.0))
    assert plugin.pipelines_dir.name == "pipelines"
    assert plugin.seed_config is not None and plugin.seed_config()["storageClasses", "CCDImage", "pytype"] == \
        "astropy.nddata.CCDData"
    with pytest.raises(LookupError):
        load_plugin("NoSuchCam")


def test_module_level_footprint_uses_the_default_plane() -> None:
    from prompt_tasks.instruments.simcam.geometry import footprint

    assert footprint(4, 0.0, 0.0, 0.0).contains(_point(0.0, 0.0))
    small = FocalPlane(9, 64)
    assert footprint(4, 0.0, 0.0, 0.0, focal_plane=small).getBoundingCircle().getOpeningAngle().asDegrees() < \
        footprint(4, 0.0, 0.0, 0.0).getBoundingCircle().getOpeningAngle().asDegrees()
