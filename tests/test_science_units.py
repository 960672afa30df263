"""Unit tests of the science payload's numeric parts, on synthetic images and catalogues."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from scipy import ndimage

from prompt_tasks.science.alerts import (
    AlertSchema,
    cutout_fits,
    read_alerts,
    write_alerts,
)
from prompt_tasks.science.associate import (
    AssociateConfig,
    AssociateTask,
    associate,
    dia_source_id,
)
from prompt_tasks.science.calib_verify import (
    CalibVerifyConfig,
    verify_bias,
    verify_flat,
)
from prompt_tasks.science.calibrate import combine_snaps, interpolate_bad
from prompt_tasks.science.detect import detect_dia_sources, electrons_to_njy
from prompt_tasks.science.imaging import background, find_point_sources, robust_stats
from prompt_tasks.science.isr import find_cosmic_rays
from prompt_tasks.science.matching import match_sky
from prompt_tasks.science.runner import (
    override_arguments,
    parse_override,
    pipeline_path,
)
from prompt_tasks.science.subtract import SubtractTask, fit_kernel

SHAPE = (256, 256)


def _wcs(
    ra: float, dec: float, angle_deg: float = 0.0, shape: tuple[int, int] = SHAPE
) -> WCS:
    """A TAN WCS of 0.2"/pixel centred on (ra, dec), rotated by ``angle_deg``."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    scale = 0.2 / 3600.0
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    wcs.wcs.cd = np.array([[-scale * c, scale * s], [scale * s, scale * c]])
    return wcs


def gaussian_image(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, sigma: float
) -> np.ndarray:
    """Point sources of total ``flux`` at (``x``, ``y``) with a circular Gaussian PSF."""
    image = np.zeros(shape)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for xi, yi, fi in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux), strict=True):
        ix, iy, half = round(xi), round(yi), math.ceil(5 * sigma)
        box = (slice(max(0, iy - half), iy + half + 1), slice(max(0, ix - half), ix + half + 1))
        r2 = (xx[box] - xi) ** 2 + (yy[box] - yi) ** 2
        image[box] += fi / (2 * math.pi * sigma**2) * np.exp(-r2 / (2 * sigma**2))
    return image


def _stars(
    rng: np.random.Generator, n: int, shape: tuple[int, int] = SHAPE, margin: int = 15
) -> tuple[np.ndarray, ...]:
    x = rng.uniform(margin, shape[1] - margin, n)
    y = rng.uniform(margin, shape[0] - margin, n)
    flux = 10 ** rng.uniform(3.0, 5.0, n)
    return x, y, flux


def test_robust_stats_ignore_outliers() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(10.0, 2.0, 100_000)
    data[:500] = 1e6
    median, sigma = robust_stats(data)
    assert median == pytest.approx(10.0, abs=0.05)
    assert sigma == pytest.approx(2.0, rel=0.03)


def test_background_model_recovers_gradient_under_stars() -> None:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    sky = 500.0 + 0.3 * xx + 0.1 * yy
    x, y, flux = _stars(rng, 60)
    image = sky + gaussian_image(SHAPE, x, y, flux, 1.8) + rng.normal(0, 5.0, SHAPE)
    model = background(image, 32)
    inner = (slice(32, -32), slice(32, -32))
    assert np.abs(model[inner] - sky[inner]).max() < 3.5  # 0.7 sigma of the pixel noise


def test_detect_peaks_completeness_and_false_detections() -> None:
    """Sources at S/N 10 are all found; pure noise gives about no 5-sigma peaks."""
    rng = np.random.default_rng(3)
    sigma_psf, noise = 1.8, 10.0
    # PSF-flux S/N of a Gaussian source in white noise: F / (noise * sqrt(4 pi) sigma).
    flux_snr10 = 10 * noise * math.sqrt(4 * math.pi) * sigma_psf
    xs = np.linspace(20, 236, 8)
    gx, gy = np.meshgrid(xs, xs)
    image = gaussian_image(
        SHAPE, gx.ravel(), gy.ravel(), np.full(gx.size, flux_snr10), sigma_psf
    )
    image += rng.normal(0, noise, SHAPE)
    peaks = find_point_sources(image, sigma_psf, 5.0)
    distance = np.hypot(
        np.asarray(peaks["x"])[:, None] - gx.ravel()[None],
        np.asarray(peaks["y"])[:, None] - gy.ravel()[None],
    )
    assert (distance.min(axis=0) < 1.5).all()
    assert np.median(distance.min(axis=1)) < 0.5  # centroid noise at S/N 10: ~0.25 px per axis
    assert len(peaks) <= gx.size + 1
    assert np.median(peaks["snr"]) == pytest.approx(10.0, rel=0.2)
    assert np.median(np.abs(peaks["psfFlux"] / flux_snr10 - 1)) < 0.1
    noise_only = find_point_sources(rng.normal(0, noise, (512, 512)), sigma_psf, 5.0)
    assert len(noise_only) <= 1


def test_kernel_fit_matches_a_double_gaussian_psf_and_its_scale() -> None:
    """A core+wing PSF is not matched by one Gaussian; the fitted kernel basis matches it."""
    rng = np.random.default_rng(12)
    x, y, flux = _stars(rng, 60)

    def double(sigma: float) -> np.ndarray:
        return 0.9 * gaussian_image(SHAPE, x, y, flux, sigma) + 0.1 * gaussian_image(
            SHAPE, x, y, flux, 2 * sigma
        )

    template = double(1.5) + rng.normal(0, 2.0, SHAPE)
    science = 2.5 * double(1.9) + rng.normal(0, 5.0, SHAPE)
    kernel = math.sqrt(1.9**2 - 1.5**2)
    good = np.zeros(SHAPE, bool)
    good[20:-20, 20:-20] = True
    basis = [f * kernel for f in (1.0, 1.5, 2.0, 3.0)]
    matched, coefficients = fit_kernel(science, template, good, basis)
    assert coefficients[:-1].sum() == pytest.approx(2.5, rel=0.01)
    residual = (science - matched)[good]
    # Science noise 5 plus the scaled, convolved template noise (about 1.2): nothing else.
    assert np.std(residual) < 5.3
    single = 2.5 * ndimage.gaussian_filter(template, kernel)
    assert np.abs(residual).max() < 0.5 * np.abs((science - single)[good]).max()


def test_dia_detection_finds_both_signs_and_flags_dipoles() -> None:
    rng = np.random.default_rng(8)
    diff = rng.normal(0, 5.0, SHAPE)
    diff += gaussian_image(SHAPE, [60.0], [60.0], [5000.0], 1.8)
    diff -= gaussian_image(SHAPE, [180.0], [180.0], [5000.0], 1.8)
    diff += gaussian_image(SHAPE, [120.0], [200.0], [6000.0], 1.8) - gaussian_image(
        SHAPE, [123.0], [200.0], [6000.0], 1.8
    )
    table = detect_dia_sources(diff, 1.8, 5.0)
    assert np.all(np.abs(table["psfFlux"]) > 0) and np.all(table["psfFluxErr"] > 0)
    positive = table[~table["isNegative"]]
    negative = table[table["isNegative"]]
    assert any(np.hypot(positive["x"] - 60, positive["y"] - 60) < 1)
    assert any(np.hypot(negative["x"] - 180, negative["y"] - 180) < 1)
    assert np.all(negative["psfFlux"] < 0)
    assert table["isDipole"].sum() == 2
    assert electrons_to_njy(31.4) == 1.0
    assert electrons_to_njy(-99.0) == 1.0


def test_subtract_task_warps_the_template_and_leaves_only_the_transient() -> None:
    """Template patches on a rotated, shifted grid (reproject), broader science PSF, a transient."""
    rng = np.random.default_rng(6)
    science_wcs = _wcs(150.0, 2.0)
    ra = 150.0 + rng.uniform(-22, 22, 40) / 3600
    dec = 2.0 + rng.uniform(-22, 22, 40) / 3600
    flux = 10 ** rng.uniform(3.5, 4.5, 40)
    templates = []
    for offset in (-12.0, 12.0):  # two overlapping patches
        shape = (200, 400)
        wcs = _wcs(150.0, 2.0 + offset / 3600, angle_deg=30.0, shape=shape)
        tx, ty = wcs.all_world2pix(ra, dec, 0)
        data = gaussian_image(shape, tx, ty, flux, 1.5) + rng.normal(0, 0.5, shape)
        templates.append(CCDData(data, unit="nJy", meta={**wcs.to_header(), "PSFFWHM": 1.5 * 2.3548 * 0.2}))
    sx, sy = science_wcs.all_world2pix(ra, dec, 0)
    science = 2.0 * gaussian_image(SHAPE, sx, sy, flux, 2.2) + rng.normal(0, 3.0, SHAPE)
    science += gaussian_image(SHAPE, [128.0], [100.0], [3000.0], 2.2)
    header = science_wcs.to_header()
    header["PSFSIG"] = 2.2
    image = CCDData(science, unit="electron", meta=header,
                    uncertainty=StdDevUncertainty(np.full(SHAPE, 3.0)))
    result = SubtractTask().run(image, templates)
    difference = result.difference
    assert difference.meta["TMPLSCAL"] == pytest.approx(2.0, rel=0.02)
    assert difference.meta["PSFMATCH"] == "template"
    good = ~difference.mask
    assert good.mean() > 0.8
    assert difference.meta["DIFNOISE"] < 3.5
    sources = detect_dia_sources(np.asarray(difference.data), 2.2, 5.0, mask=difference.mask)
    assert len(sources) == 1
    assert sources["x"][0] == pytest.approx(128.0, abs=0.3)
    assert sources["y"][0] == pytest.approx(100.0, abs=0.3)


def test_combine_snaps_rejects_cosmic_rays() -> None:
    rng = np.random.default_rng(9)
    base = 100.0 + gaussian_image(SHAPE, [128.0], [128.0], [20_000.0], 1.8)
    snaps = []
    for k in range(2):
        data = rng.poisson(base).astype(np.float64)
        if k == 1:
            data[40, 40] += 5000.0
        snaps.append(
            CCDData(
                data,
                unit="electron",
                meta={"EXPTIME": 15.0},
                uncertainty=StdDevUncertainty(np.sqrt(base)),
            )
        )
    total, sigma, bad = combine_snaps(snaps, 6.0)
    assert total[40, 40] == pytest.approx(200.0, abs=60.0)
    assert total[128, 128] == pytest.approx(2 * base[128, 128], rel=0.1)
    assert not bad.any()
    assert np.all(sigma > 0)


def test_cosmic_ray_finder_spares_stars() -> None:
    rng = np.random.default_rng(10)
    image = (
        200.0
        + gaussian_image(SHAPE, [100.0, 150.0], [100.0, 60.0], [2e5, 5e4], 1.6)
        + rng.normal(0, 14.0, SHAPE)
    )
    image[30, 200] += 3000.0
    sigma = np.sqrt(np.clip(image, 1, None))
    hits = find_cosmic_rays(image, sigma, 8.0)
    assert hits[30, 200]
    assert not hits[95:106, 95:106].any()
    assert not hits[55:66, 145:156].any()


def test_interpolate_bad_fills_hot_pixels() -> None:
    image = np.full(SHAPE, 10.0)
    bad = np.zeros(SHAPE, bool)
    image[50, 50] = 1e5
    bad[50, 50] = True
    filled = interpolate_bad(image, bad)
    assert filled[50, 50] == pytest.approx(10.0)


def test_match_sky_is_one_to_one_and_closest_first() -> None:
    ra2 = np.array([10.0, 10.0 + 1.0 / 3600])
    dec2 = np.array([0.0, 0.0])
    ra1 = np.array([10.0 + 0.6 / 3600, 10.0 + 0.2 / 3600, 20.0])
    dec1 = np.zeros(3)
    match = match_sky(ra1, dec1, ra2, dec2, 1.0)
    pairs = dict(zip(match.first.tolist(), match.second.tolist(), strict=True))
    assert pairs == {0: 1, 1: 0}
    assert match.separation.max() < 0.5


def test_associate_matches_known_objects_and_founds_new_ones() -> None:
    objects = pd.DataFrame(
        {
            "diaObjectId": [11, 12],
            "ra": [10.0, 10.01],
            "dec": [0.0, 0.0],
            "nDiaSources": [2, 1],
            "r_psfFluxNdata": [2, 1],
            "r_psfFluxMean": [100.0, 50.0],
            **{f"{b}_psfFluxNdata": [0, 0] for b in "ugizy"},
        }
    )
    sources = pd.DataFrame(
        {
            "diaSourceId": [1001, 1002],
            "ra": [10.0 + 0.3 / 3600, 10.5],
            "dec": [0.0, 0.0],
            "psfFlux": [130.0, 70.0],
        }
    )
    result = associate(sources, objects, "r", 61000.0, 1.0)
    assert result.n_matched == 1 and result.n_new == 1
    assert result.sources["diaObjectId"].tolist() == [11, 1002]
    updated = result.objects.set_index("diaObjectId")
    assert updated.loc[11, "nDiaSources"] == 3
    assert updated.loc[11, "r_psfFluxMean"] == pytest.approx(110.0)
    assert updated.loc[11, "ra"] == pytest.approx(10.0 + 0.1 / 3600, abs=1e-7)
    assert bool(updated.loc[1002, "isNew"])
    assert (
        updated.loc[1002, "r_psfFluxNdata"] == 1
        and updated.loc[1002, "g_psfFluxNdata"] == 0
    )


def test_associate_with_no_sources_yields_storable_empty_objects() -> None:
    sources = pd.DataFrame({"diaSourceId": [], "ra": [], "dec": [], "psfFlux": []})
    objects = pd.DataFrame({"diaObjectId": pd.Series([], dtype=np.int64)})
    result = associate(sources, objects, "r", 61000.0, 1.0)
    assert result.n_matched == 0 and result.n_new == 0
    assert result.objects.drop(columns=["isNew"]).empty  # what the task stores


def test_dia_source_ids_are_unique_and_fit_63_bits() -> None:
    ids = [dia_source_id(2026112400010, d, i) for d in (0, 188) for i in (0, 65535)]
    assert len({int(i) for i in ids}) == 4
    assert max(int(i) for i in ids) < 2**63
    with pytest.raises(ValueError):
        dia_source_id(1, 300, 0)


def _source_row(i: int) -> dict[str, object]:
    return {
        "diaSourceId": 1000 + i,
        "diaObjectId": 500 + i,
        "visit": 2026112400010,
        "detector": 4,
        "midpointMjdTai": 61000.1,
        "ra": 150.0 + i * 1e-3,
        "dec": 2.0,
        "x": 100.5,
        "y": 200.25,
        "psfFlux": 1234.5,
        "psfFluxErr": 45.6,
        "snr": 27.0,
        "isNegative": False,
        "band": "r",
        "psfNdata": 0,
        "trailNdata": 0,
        "dipoleNdata": 0,
        "bboxSize": 15,
        "timeProcessedMjdTai": 61000.2,
        "raErr": float("nan"),
    }


def test_alert_packets_round_trip_through_avro_against_the_schema() -> None:
    schema = AlertSchema()
    image = CCDData(
        np.arange(64 * 64, dtype=np.float32).reshape(64, 64),
        unit="electron",
        meta=_wcs(150, 2, shape=(64, 64)).to_header(),
    )
    alerts = []
    for i in range(3):
        source = schema.record("diaSource", _source_row(i))
        obj = schema.record(
            "diaObject",
            {
                "diaObjectId": 500 + i,
                "validityStartMjdTai": 61000.1,
                "ra": 150.0,
                "dec": 2.0,
                "nDiaSources": 1,
                **{f"{b}_psfFluxNdata": 0 for b in "ugrizy"},
            },
        )
        alerts.append(
            {
                "diaSourceId": source["diaSourceId"],
                "diaSource": source,
                "prvDiaSources": [schema.record("diaSource", _source_row(10 + i))],
                "diaObject": obj,
                "cutoutDifference": cutout_fits(image, 10.0, 60.0, 7),
            }
        )
    assert alerts[0]["diaSource"]["raErr"] is None  # NaN becomes null
    full = [
        {**{f["name"]: None for f in schema.definition["fields"]}, **a} for a in alerts
    ]
    payload = write_alerts(schema, full)
    writer_schema, records = read_alerts(payload)
    assert writer_schema["name"] == schema.name
    assert len(records) == 3
    for record, original in zip(records, full, strict=True):
        schema.validate(record)
        assert record["diaSourceId"] == original["diaSourceId"]
        assert record["diaSource"]["psfFlux"] == pytest.approx(1234.5)
        assert (
            record["prvDiaSources"][0]["diaSourceId"]
            == original["prvDiaSources"][0]["diaSourceId"]
        )
        assert record["cutoutDifference"][:6] == b"SIMPLE"
    with pytest.raises(ValueError, match="required"):
        schema.record("diaSource", {"diaSourceId": 1})
    bad = dict(full[0], diaSourceId="not a number")
    with pytest.raises(ValueError):
        write_alerts(schema, [bad])


def test_associate_task_against_a_real_sqlite_apdb(tmp_path) -> None:
    """Association stores into an APDB, finds the objects again, and is idempotent."""
    from lsst.dax.apdb.sql import ApdbSql
    from lsst.sphgeom import Angle, Circle, LonLat, UnitVector3d

    config_path = tmp_path / "apdb.yaml"
    ApdbSql.init_database(db_url=f"sqlite:///{tmp_path / 'apdb.db'}").save(
        str(config_path)
    )
    config = AssociateConfig()
    config.apdb_config_url = str(config_path)
    task = AssociateTask(config=config)
    region = Circle(
        UnitVector3d(LonLat.fromDegrees(150.0, 2.0)), Angle.fromDegrees(0.1)
    )
    detections = Table(
        {
            "x": [10.0, 20.0],
            "y": [10.0, 20.0],
            "ra": [150.0, 150.01],
            "dec": [2.0, 2.0],
            "psfFlux": [1000.0, -500.0],
            "psfFluxErr": [50.0, 50.0],
            "snr": [20.0, 10.0],
            "isNegative": [False, True],
            "isDipole": [False, False],
        }
    )
    t1 = Time("2026-11-24T01:00:00", scale="tai")
    first = task.run(
        detections,
        region=region,
        visit_time=t1,
        visit=2026112300010,
        detector=4,
        band="r",
    )
    assert len(first.associated) == 2 and bool(np.all(first.objects["isNew"]))
    again = task.run(
        detections,
        region=region,
        visit_time=t1,
        visit=2026112300010,
        detector=4,
        band="r",
    )
    assert sorted(again.associated["diaSourceId"]) == sorted(
        first.associated["diaSourceId"]
    )
    t2 = Time("2026-11-24T01:01:00", scale="tai")
    moved = detections.copy()
    moved["ra"] = moved["ra"] + 0.2 / 3600
    second = task.run(
        moved, region=region, visit_time=t2, visit=2026112300020, detector=4, band="r"
    )
    assert sorted(second.associated["diaObjectId"]) == sorted(
        first.associated["diaObjectId"]
    )
    assert not np.any(second.objects["isNew"])
    assert len(second.history) == 2
    assert set(second.objects["nDiaSources"]) == {2}


def test_calibration_verdicts() -> None:
    rng = np.random.default_rng(11)
    config = CalibVerifyConfig()
    good = verify_bias(rng.normal(0, 5.0, SHAPE), 5.0, 0.5, config)
    assert good["failures"] == []
    offset = verify_bias(rng.normal(40.0, 5.0, SHAPE), 5.0, 0.5, config)
    assert offset["failures"]
    _yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    assert verify_flat(1000.0 + rng.normal(0, 10.0, SHAPE), config)["failures"] == []
    assert verify_flat(1000.0 * (1 + 0.1 * xx / SHAPE[1]), config)["failures"]


def test_runner_overrides_and_pipeline_paths() -> None:
    assert parse_override("associate:apdb_config_url=sqlite:///x=y") == (
        "associate",
        "apdb_config_url",
        "sqlite:///x=y",
    )
    assert override_arguments({"associate": {"match_radius": 2.0}}) == [
        "-c",
        "associate:match_radius=2.0",
    ]
    with pytest.raises(ValueError):
        parse_override("nolabel=1")
    for name in ("ApPipe", "SingleFrame", "CalibVerify", "Trivial"):
        assert pipeline_path(name).exists()
