"""``central init``: the central repository and APDB, built twice (the second run is a no-op)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from astropy.time import Time
from click.testing import CliRunner
from lsst.daf.butler import Butler, CollectionType

from prompt_tasks.instruments.simcam.central import (
    CALIB_COLLECTION,
    DEFAULTS_COLLECTION,
    CentralMismatch,
    apdb_config_path,
    init_central,
    read_camera,
)
from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.skymap import SimSkyMap
from prompt_tasks.settings import Settings
from tests.servers import postgres_schema
from tests.simcam_fixtures import SmallCentral, small_config


def _calib_run(butler: Butler, dataset_type: str, when: str, **data_id: object) -> str:
    with butler.query() as query:
        x = query.expression_factory
        refs = list(
            query.where({"instrument": "SimCam", **data_id})
            .datasets(dataset_type, CALIB_COLLECTION, find_first=True)
            .where(x[dataset_type].timespan.overlaps(Time(when, scale="tai")))
        )
    assert len(refs) == 1
    return refs[0].run


def check_central(central: SmallCentral) -> None:
    """What every central repository must hold, whatever its registry."""
    butler = Butler.from_config(central.uri)
    config = central.config
    chain = list(butler.registry.getCollectionChain(DEFAULTS_COLLECTION))
    assert chain == ["SimCam/calib", "SimCam/templates", "refcats/sim", "skymaps"]
    assert butler.registry.getCollectionType(CALIB_COLLECTION) == CollectionType.CALIBRATION
    assert SimConfig.model_validate(read_camera(butler)) == config
    # Calibrations: the validity range picks the epoch.
    last = config.n_detectors - 1
    assert _calib_run(butler, "bias", "2026-03-01T00:00:00", detector=last) == "SimCam/calib/epoch1"
    assert _calib_run(butler, "bias", "2026-11-24T00:00:00", detector=last) == "SimCam/calib/epoch2"
    assert _calib_run(butler, "flat", "2026-11-24T00:00:00", detector=0,
                      physical_filter="SimCam-g") == "SimCam/calib/epoch2"
    assert _calib_run(butler, "dark", "2025-02-01T00:00:00", detector=0) == "SimCam/calib/epoch1"
    assert len(butler.query_datasets("flat", collections="SimCam/calib/epoch1", find_first=False)) == \
        config.n_detectors * len(config.bands)
    # Skymap, templates and refcat.
    (skymap_ref,) = butler.query_datasets("skyMap", collections=DEFAULTS_COLLECTION)
    skymap = SimSkyMap.from_dict(butler.get(skymap_ref))
    templates = butler.query_datasets("template_coadd", collections=DEFAULTS_COLLECTION)
    n_patches = sum(1 for t in skymap.tracts for _ in skymap.patches(t))
    assert len(templates) == n_patches * len(config.bands)
    footprint = config.focal_plane.footprint(0, config.field_ra, config.field_dec, 0.0)
    overlapping = butler.query_datasets("template_coadd", collections=DEFAULTS_COLLECTION,
                                        where="patch.region OVERLAPS fp AND band = 'r'", bind={"fp": footprint})
    assert overlapping
    template = butler.get(overlapping[0])
    assert template.meta["CTYPE1"] == "RA---TAN" and template.meta["BAND"] == "r"
    shards = butler.query_datasets("sim_refcat", collections=DEFAULTS_COLLECTION,
                                   where="htm7.region OVERLAPS fp", bind={"fp": footprint})
    assert shards
    table = butler.get(shards[0])
    assert {"id", "ra", "dec", "g_mag", "r_mag"} <= set(table.colnames) and len(table) > 0
    # APDB.
    from lsst.dax.apdb import Apdb

    path = apdb_config_path(central.settings)
    assert path.exists()
    Apdb.from_uri(str(path))


def test_central_holds_the_contract(simcam_central: SmallCentral) -> None:
    check_central(simcam_central)


def test_second_init_is_a_no_op(simcam_central: SmallCentral) -> None:
    lines: list[str] = []
    steps = init_central(simcam_central.settings, echo=lines.append)
    assert steps and all(step.created == 0 for step in steps), steps
    assert all(step.existing > 0 for step in steps)
    assert len(lines) == len(steps)


def test_another_world_is_refused(simcam_central: SmallCentral) -> None:
    with pytest.raises(CentralMismatch, match="n_detectors"):
        init_central(simcam_central.settings, config=small_config(n_detectors=3))


def test_cli_init_twice(tmp_path: Path, servers: Settings) -> None:
    from prompt_tasks.cli import main
    from prompt_tasks.stack.env import settings_env

    env = {**settings_env(servers), "PROMPT_TASKS_STATE_DIR": str(tmp_path)}
    runner = CliRunner()
    args = ["central", "init", "--detectors", "1", "--size", "64", "--bands", "r", "--field-radius", "0.002"]
    first = runner.invoke(main, args, env=env)
    assert first.exit_code == 0, first.output
    assert "built" in first.output
    second = runner.invoke(main, ["central", "init"], env=env)
    assert second.exit_code == 0, second.output
    assert "nothing to do" in second.output
    clash = runner.invoke(main, ["central", "init", "--detectors", "2"], env=env)
    assert clash.exit_code == 1 and "n_detectors" in clash.output


@pytest.fixture
def postgres_url() -> Iterator[tuple[str, str]]:
    """A fresh schema on the test PostgreSQL server, dropped afterwards."""
    with postgres_schema("central") as url_schema:
        yield url_schema


@pytest.mark.postgres
def test_central_on_postgresql_twice(tmp_path: Path, servers: Settings, postgres_url: tuple[str, str]) -> None:
    url, schema = postgres_url
    settings = servers.model_copy(update={"state_dir": tmp_path, "apdb_url": url})
    config = small_config(n_detectors=1, bands=("g", "r"))
    first = init_central(settings, config=config, registry_db=url, registry_namespace=schema,
                         apdb_namespace=f"{schema}_apdb")
    assert sum(step.created for step in first) > 0
    check_central(SmallCentral(settings, config))
    second = init_central(settings, registry_db=url, registry_namespace=schema, apdb_namespace=f"{schema}_apdb")
    assert all(step.created == 0 for step in second), second
