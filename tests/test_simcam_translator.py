"""SimCam raw headers → Butler dimension records, checked against a real Butler repository."""

from __future__ import annotations

import io
from pathlib import Path

import astropy.units as u
import pytest
from astropy.io import fits
from astropy.time import Time
from lsst.daf.butler import Butler
from lsst.sphgeom import LonLat, UnitVector3d

from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.formatter import seed_config
from prompt_tasks.instruments.simcam.instrument import SimCam
from prompt_tasks.instruments.simcam.raws import simulate_calibration, simulate_snap
from prompt_tasks.instruments.simcam.translator import RECORD_ORDER, records_from_header, tai_nsec
from prompt_tasks.instruments.simcam.visits import VisitSpec, group_id

START = float(Time("2026-11-24T03:21:10.5", scale="tai").unix_tai)


@pytest.fixture(scope="module")
def config() -> SimConfig:
    return SimConfig(n_detectors=3, size=64, star_density=0.0, transient_density=0.0)


@pytest.fixture(scope="module")
def visit() -> VisitSpec:
    return VisitSpec(start=START, ra=105.01, dec=-15.02, camera_angle=42.0, physical_filter="SimCam-i",
                     snaps=2, exptime=15.0)


def _header(raw: bytes) -> fits.Header:
    return fits.getheader(io.BytesIO(raw))


def test_records_of_a_science_snap(config: SimConfig, visit: VisitSpec) -> None:
    header = _header(simulate_snap(config, visit, 2, 1))
    records = records_from_header(header)
    assert list(records) == list(RECORD_ORDER)
    (exposure,) = records["exposure"]
    assert exposure["id"] == visit.exposure(1) == 2026112355281
    assert exposure["day_obs"] == 20261123
    assert exposure["group"] == "2026-11-24T03:21:10.500" == visit.group
    assert exposure["physical_filter"] == "SimCam-i"
    assert exposure["exposure_time"] == 15.0 and exposure["dark_time"] == 16.0
    assert exposure["observation_type"] == "science"
    assert exposure["tracking_ra"] == pytest.approx(105.01) and exposure["tracking_dec"] == pytest.approx(-15.02)
    assert exposure["sky_angle"] == pytest.approx(42.0)
    begin, end = exposure["timespan"].begin, exposure["timespan"].end
    assert begin.scale == "tai"
    assert abs((begin - Time("2026-11-24T03:21:26.5", scale="tai")).sec) < 1e-3
    assert (end - begin).sec == pytest.approx(15.0)
    (vis,) = records["visit"]
    assert vis["id"] == visit.visit == 2026112355280
    assert vis["exposure_time"] == 30.0
    assert abs((vis["timespan"].begin - Time("2026-11-24T03:21:10.5", scale="tai")).sec) < 1e-3
    assert (vis["timespan"].end - vis["timespan"].begin).sec == pytest.approx(31.0)
    assert records["visit_definition"] == [{"instrument": "SimCam", "exposure": visit.exposure(1), "visit": visit.visit}]
    (region,) = records["visit_detector_region"]
    assert region["detector"] == 2
    # The predicted footprint contains the sky position of the raw's central pixel (its WCS).
    from astropy.wcs import WCS

    centre = WCS(header).pixel_to_world(31.5, 31.5)
    assert region["region"].contains(UnitVector3d(LonLat.fromDegrees(centre.ra.deg, centre.dec.deg)))
    assert vis["region"].contains(region["region"])
    assert len(records_from_header(header, all_detectors=True)["visit_detector_region"]) == 3


@pytest.mark.parametrize("isot", ["2026-11-24T03:21:10", "2026-11-24T03:21:10.5", "2026-11-24T03:21:26.500",
                                  "2027-06-30T23:59:59.999999", "2026-11-24T03:21:10.123456789"])
def test_header_times_count_nanoseconds_as_the_middleware_does(isot: str) -> None:
    """The integer route equals daf_butler's astropy conversion, offsets included: records made
    before and after it describe the same exposures the same way."""
    from lsst.daf.butler import Timespan
    from lsst.daf.butler.time_utils import TimeConverter

    time = Time(isot, format="isot", scale="tai")
    assert tai_nsec(isot) == TimeConverter().astropy_to_nsec(time)
    span = Timespan(time, time + 47.0 * u.s)
    assert span.nsec == (tai_nsec(isot), tai_nsec(isot) + round(47.0 * 1e9))


def test_calibration_exposures_have_no_visit(config: SimConfig) -> None:
    for imgtype in ("BIAS", "DARK", "FLAT"):
        header = _header(simulate_calibration(config, imgtype, START, 0, physical_filter="SimCam-g"))
        records = records_from_header(header)
        assert set(records) == {"day_obs", "group", "exposure"}
        assert records["exposure"][0]["observation_type"] == imgtype.lower()
        span = records["exposure"][0]["timespan"]
        assert not span.isEmpty() and span.end > span.begin
        assert records["group"][0]["name"] == group_id(START)


def test_records_insert_into_a_repository_and_snaps_share_the_visit(tmp_path: Path, config: SimConfig,
                                                                    visit: VisitSpec) -> None:
    Butler.makeRepo(str(tmp_path / "repo"), config=seed_config())
    butler = Butler.from_config(str(tmp_path / "repo"), writeable=True)
    SimCam().register(butler.registry)
    SimCam().register(butler.registry)  # idempotent
    for snap in range(visit.snaps):
        for detector in range(2):
            records = records_from_header(_header(simulate_snap(config, visit, detector, snap)))
            with butler.transaction():
                for element in RECORD_ORDER:
                    butler.registry.insertDimensionData(element, *records[element], skip_existing=True)
    definitions = list(butler.registry.queryDimensionRecords("visit_definition", instrument="SimCam"))
    assert {(r.exposure, r.visit) for r in definitions} == {(visit.exposure(0), visit.visit),
                                                             (visit.exposure(1), visit.visit)}
    regions = list(butler.registry.queryDimensionRecords("visit_detector_region", instrument="SimCam"))
    assert sorted(r.detector for r in regions) == [0, 1]
    pairs = list(butler.registry.queryDataIds(["exposure", "visit"], instrument="SimCam"))
    assert {(d["exposure"], d["visit"]) for d in pairs} == {(visit.exposure(s), visit.visit) for s in range(2)}


def test_a_raws_own_records_expand_its_data_id_as_the_registry_does(tmp_path: Path, config: SimConfig,
                                                                    visit: VisitSpec) -> None:
    from prompt_tasks.butler.ingest import own_records

    Butler.makeRepo(str(tmp_path / "repo"), config=seed_config())
    butler = Butler.from_config(str(tmp_path / "repo"), writeable=True)
    SimCam().register(butler.registry)
    merged: dict[str, list[dict]] = {}
    for snap in range(visit.snaps):
        for element, found in records_from_header(_header(simulate_snap(config, visit, 1, snap))).items():
            merged.setdefault(element, []).extend(found)
    for element in RECORD_ORDER:
        butler.registry.insertDimensionData(element, *merged[element], skip_existing=True)
    for snap in range(visit.snaps):
        exposure = visit.exposure(snap)
        own = own_records(butler.dimensions, merged, exposure)
        assert set(own) == {"exposure", "group", "day_obs"}
        ours = butler.registry.expandDataId(instrument="SimCam", exposure=exposure, detector=1, records=own)
        theirs = butler.registry.expandDataId(instrument="SimCam", exposure=exposure, detector=1)
        assert ours == theirs
        assert {e: ours.records[e] for e in ours.dimensions.elements} == {
            e: theirs.records[e] for e in theirs.dimensions.elements}
    # an exposure the records do not hold: nothing of its own, the registry is asked
    assert own_records(butler.dimensions, merged, 12345) == {}
