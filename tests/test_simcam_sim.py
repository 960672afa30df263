"""The synthetic sky and the raw simulator: determinism, realism and ground truth."""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from prompt_tasks.instruments.simcam import calibs
from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.formatter import read_ccd, write_ccd
from prompt_tasks.instruments.simcam.geometry import ZERO_POINTS
from prompt_tasks.instruments.simcam.raws import (
    simulate_calibration,
    simulate_snap,
    simulate_visit,
)
from prompt_tasks.instruments.simcam.refcat import refcat_shard
from prompt_tasks.instruments.simcam.sky import Sky
from prompt_tasks.instruments.simcam.skymap import SimSkyMap
from prompt_tasks.instruments.simcam.templates import make_template
from prompt_tasks.instruments.simcam.visits import VisitSpec
from prompt_tasks.model.objectkeys import format_key, parse_key

NIGHT = float(Time("2026-11-24T02:00:00", scale="tai").unix_tai)
OLD_NIGHT = float(Time("2026-03-10T02:00:00", scale="tai").unix_tai)


@pytest.fixture(scope="module")
def config() -> SimConfig:
    return SimConfig(n_detectors=2, size=160, bands=("r",))


def _visit(start: float = NIGHT, **kw: object) -> VisitSpec:
    values: dict[str, object] = {"start": start, "ra": 105.0, "dec": -15.0, "camera_angle": 12.0,
                                 "physical_filter": "SimCam-r", "snaps": 2}
    values.update(kw)
    return VisitSpec(**values)  # type: ignore[arg-type]


def _pixels(raw: bytes) -> tuple[np.ndarray, fits.Header]:
    with fits.open(io.BytesIO(raw)) as hdul:
        return hdul[0].data.astype(np.float64), hdul[0].header.copy()


def test_same_seed_same_bytes_other_seed_other_pixels(config: SimConfig) -> None:
    visit = _visit()
    first = simulate_visit(config, visit, detectors=[0, 1], snaps=[0, 1])
    again = simulate_visit(SimConfig(**config.model_dump()), visit, detectors=[1, 0], snaps=[1, 0])
    assert set(first) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(first[k] == again[k] for k in first)
    assert first[(0, 0)] != first[(0, 1)]  # snaps have their own noise
    other = simulate_snap(config.model_copy(update={"seed": 1}), visit, 0, 0)
    assert not np.array_equal(_pixels(other)[0], _pixels(first[(0, 0)])[0])


def test_sky_is_the_same_whatever_the_query_order(config: SimConfig) -> None:
    plane = config.focal_plane
    region = plane.footprint(0, 105.0, -15.0, 0.0, pad_deg=0.05)
    one = Sky(config)
    a = one.stars(region)
    b = Sky(config).stars(plane.footprint(1, 105.0, -15.0, 0.0))
    c = one.stars(region)
    assert np.array_equal(a["id"], c["id"])
    inner = set(b["id"])
    assert inner and inner <= set(a["id"])


def test_star_counts_follow_the_power_law() -> None:
    config = SimConfig()
    stars = Sky(config).stars_in_trixel(Sky.trixels(config.focal_plane.footprint(4, 105.0, -15.0, 0.0))[0])
    counts, edges = np.histogram(stars["r_mag"], bins=np.arange(17.0, 25.0, 1.0))
    slope = np.polyfit(edges[:-1], np.log10(counts), 1)[0]
    assert slope == pytest.approx(config.star_slope, abs=0.05)
    assert set(stars.colnames) >= {f"{b}_mag" for b in "ugrizy"}
    assert np.all(stars["g_mag"] - stars["r_mag"] > -0.5)


def test_raw_header_is_lsst_like(config: SimConfig) -> None:
    visit = _visit()
    _, header = _pixels(simulate_snap(config, visit, 1, 1))
    for key in ("OBSID", "DAYOBS", "SEQNUM", "GROUPID", "CURINDEX", "DETECTOR", "FILTER", "EXPTIME",
                "DARKTIME", "DATE-BEG", "DATE-END", "RA", "DEC", "ROTPA", "IMGTYPE", "INSTRUME", "CTYPE1"):
        assert key in header, key
    assert header["IMGTYPE"] == "OBJECT" and header["TIMESYS"] == "TAI"
    assert header["GROUPID"] == visit.group and header["CURINDEX"] == 2 and header["MAXINDEX"] == 2
    assert header["DATE-BEG"].startswith("2026-11-24T02:00:16")
    assert header["BITPIX"] == 32


def test_pixels_have_sky_noise_bias_and_stars(config: SimConfig) -> None:
    visit = _visit()
    data, header = _pixels(simulate_snap(config, visit, 0, 0))
    epoch = config.epoch_of(visit.start)
    gain = header["GAIN"]
    corrected = (data - calibs.bias_frame(config, 0, epoch)) / calibs.flat_response(config, 0, "r", epoch)
    sky_adu = header["SKYLEVEL"] / gain
    assert np.median(corrected) == pytest.approx(sky_adu, rel=0.05)
    # Photon plus read noise, within 15 % (stars and cosmic rays clipped by the MAD).
    mad = 1.4826 * np.median(np.abs(corrected - np.median(corrected)))
    expected = np.sqrt(header["SKYLEVEL"] + header["RDNOISE"] ** 2) / gain
    assert mad == pytest.approx(expected, rel=0.15)
    assert corrected.max() > sky_adu + 50 * expected  # bright stars are there


def test_calibration_must_match_the_epoch(config: SimConfig) -> None:
    old = _visit(start=OLD_NIGHT)
    assert config.epoch_of(OLD_NIGHT) == 0 and config.epoch_of(NIGHT) == 1
    data, _ = _pixels(simulate_snap(config, old, 0, 0))
    right = data - calibs.master_bias(config, 0, 0).data
    wrong = data - calibs.master_bias(config, 0, 1).data
    assert abs(np.median(wrong) - np.median(right)) > 30


def test_calibration_exposures(config: SimConfig) -> None:
    bias, h_bias = _pixels(simulate_calibration(config, "bias", NIGHT, 0))
    dark, h_dark = _pixels(simulate_calibration(config, "DARK", NIGHT, 0))
    flat, h_flat = _pixels(simulate_calibration(config, "FLAT", NIGHT, 0, physical_filter="SimCam-r"))
    assert (h_bias["IMGTYPE"], h_dark["IMGTYPE"], h_flat["IMGTYPE"]) == ("BIAS", "DARK", "FLAT")
    assert h_bias["EXPTIME"] == 0.0 and h_dark["EXPTIME"] > 0
    truth = calibs.bias_frame(config, 0, 1)
    assert np.median(bias - truth) == pytest.approx(0.0, abs=1.0)
    hot = calibs.dark_rate(config, 0) > 1
    assert hot.any() and np.median((dark - bias)[hot]) > 50
    response = (flat - truth) / np.median(flat - truth)
    assert np.corrcoef(response.ravel(), calibs.flat_response(config, 0, "r", 1).ravel())[0, 1] > 0.3
    with pytest.raises(ValueError):
        simulate_calibration(config, "SKYFLAT", NIGHT, 0)


def test_transients_in_the_truth_are_in_the_pixels() -> None:
    config = SimConfig(n_detectors=1, size=256, transient_density=200000.0, star_density=0.0, bands=("r",))
    visit = _visit(seeing=0.9, snaps=1, camera_angle=0.0)
    truth = Sky(config).truth(visit, 0)
    inside = truth[(truth["x"] > 10) & (truth["x"] < 245) & (truth["y"] > 10) & (truth["y"] < 245)
                   & (truth["mag"] < 21.5)]
    assert len(inside) >= 3
    assert set(inside["kind"]) <= {"new", "variable"}
    data, header = _pixels(simulate_snap(config, visit, 0, 0))
    image = (data - calibs.bias_frame(config, 0, 1)) / calibs.flat_response(config, 0, "r", 1)
    image -= np.median(image)
    for row in inside:
        x, y = round(float(row["x"])), round(float(row["y"]))
        measured = image[y - 6:y + 7, x - 6:x + 7].sum() * header["GAIN"]
        expected = 10 ** (-0.4 * (row["mag"] - ZERO_POINTS["r"])) * visit.exptime
        assert measured == pytest.approx(expected, rel=0.35), dict(row)


def test_keys_of_a_visit_follow_dmtn_219(config: SimConfig) -> None:
    visit = _visit()
    key = format_key("SimCam", 1, visit.group, 0)
    parsed = parse_key(key)
    assert (parsed.instrument, parsed.detector, parsed.group, parsed.snap) == ("SimCam", 1, visit.group, 0)


def test_refcat_shard_and_template(config: SimConfig) -> None:
    sky = Sky(config)
    index = sky.trixels(config.focal_plane.footprint(0, 105.0, -15.0, 0.0))[0]
    shard = refcat_shard(config, index, sky)
    assert {"id", "ra", "dec", "r_mag", "r_magErr", "u_mag"} <= set(shard.colnames)
    assert len(shard) > 10 and shard["r_mag"].max() < config.refcat_mag_limit + 0.5
    assert np.array_equal(shard["id"], refcat_shard(config, index)["id"])
    skymap = SimSkyMap.for_field(105.0, -15.0, 0.02, patch_inner=200)
    template = make_template(config, skymap, 0, 0, "r", sky)
    assert template.data.shape == (300, 300)
    assert template.meta["BUNIT"] == "nJy" and template.meta["CTYPE1"] == "RA---TAN"
    again = read_ccd(_roundtrip(template))
    assert np.array_equal(again.data, template.data)
    assert again.meta["PATCH"] == 0


def _roundtrip(ccd: object) -> io.BytesIO:
    buffer = io.BytesIO()
    write_ccd(ccd).writeto(buffer)  # type: ignore[arg-type]
    buffer.seek(0)
    return buffer


def test_recovery_score_counts_matches_and_false_detections() -> None:
    from prompt_tasks.instruments.simcam.recovery import score

    truth_ra, truth_dec = np.array([10.0, 10.01, 10.02]), np.array([0.0, 0.0, 0.0])
    truth_mag = np.array([20.0, 22.0, 24.5])
    one_arcsec = 1 / 3600
    det_ra = np.array([10.0 + 0.3 * one_arcsec, 10.02, 10.5])
    det_dec = np.array([0.0, 0.2 * one_arcsec, 0.0])
    result = score(truth_ra, truth_dec, truth_mag, det_ra, det_dec, radius_arcsec=1.0, mag_limit=23.0)
    assert (result.injected, result.found, result.false) == (2, 1, 1)
    assert result.completeness == 0.5
    assert (result + result).injected == 4
    assert score([], [], [], det_ra, det_dec).false == 3


def test_difference_magnitude_of_transients(config: SimConfig) -> None:
    from prompt_tasks.instruments.simcam.sky import difference_mag

    assert difference_mag(np.array([20.0]), np.array([np.inf]))[0] == pytest.approx(20.0)
    assert np.isinf(difference_mag(np.array([20.0]), np.array([20.0]))[0])
    assert difference_mag(np.array([20.0]), np.array([20.7525]))[0] == pytest.approx(20.7525, abs=1e-3)
    truth = Sky(config).truth(_visit(), 0)
    assert "diff_mag" in truth.colnames
    new = truth[truth["kind"] == "new"]
    assert np.allclose(new["diff_mag"], new["mag"])


def test_saturated_charge_bleeds_along_the_column() -> None:
    from prompt_tasks.instruments.simcam.raws import bleed

    counts = np.full((21, 5), 100.0)
    counts[10, 2] = 100.0 + 5 * 1000.0  # 5000 e- above a full well of 1000
    out = bleed(counts, 1000.0)
    assert out.max() <= 1000.0
    assert out.sum() == pytest.approx(counts.sum())  # charge is conserved
    assert np.count_nonzero(out[:, 2] >= 1000.0) >= 5  # a vertical trail
    assert np.array_equal(out[:, [0, 1, 3, 4]], counts[:, [0, 1, 3, 4]])
    assert out[7, 2] == out[13, 2]  # symmetric up and down


def test_a_bright_star_saturates_with_a_trail() -> None:
    from prompt_tasks.instruments.simcam.raws import bleed
    from prompt_tasks.instruments.simcam.render import render_points

    flux = 10 ** (-0.4 * (12.0 - ZERO_POINTS["r"])) * 15.0  # a 12th-magnitude star in 15 s
    image = render_points((128, 128), np.array([64.0]), np.array([64.0]), np.array([flux]), 4.0)
    out = bleed(image, calibs.FULL_WELL)
    assert out.max() == calibs.FULL_WELL
    assert np.count_nonzero(out[:, 64] >= calibs.FULL_WELL) > np.count_nonzero(out[64, :] >= calibs.FULL_WELL)
