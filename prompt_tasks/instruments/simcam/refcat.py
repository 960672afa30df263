"""The reference catalog: the sky's brighter stars, sharded by HTM level-7 trixel.

Like Rubin's refcats, one table per trixel (dataset ``sim_refcat``, dimension ``htm7``),
columns ``id``, ``ra``, ``dec`` (deg), ``<band>_mag`` and ``<band>_magErr`` (AB). Catalogue
magnitudes carry measurement noise drawn from the errors, so they are not the truth.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from lsst.sphgeom import Region

from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.geometry import BANDS
from prompt_tasks.instruments.simcam.sky import HTM_LEVEL, Sky

__all__ = ["HTM_LEVEL", "refcat_shard", "refcat_shards"]


def refcat_shard(config: SimConfig, index: int, sky: Sky | None = None) -> Table:
    """The reference catalog rows of level-7 trixel ``index``."""
    sky = sky or Sky(config)
    stars = sky.stars_in_trixel(index)
    stars = stars[stars["r_mag"] <= config.refcat_mag_limit]
    rng = np.random.default_rng([config.seed, 8_000_000, index])
    table = Table({"id": np.asarray(stars["id"], np.int64), "ra": np.asarray(stars["ra"], float),
                   "dec": np.asarray(stars["dec"], float)})
    for band in BANDS:
        true = np.asarray(stars[f"{band}_mag"], float)
        err = 0.005 + 0.02 * 10 ** (0.4 * (true - config.refcat_mag_limit))
        table[f"{band}_mag"] = true + rng.normal(0, 1, len(true)) * err
        table[f"{band}_magErr"] = err
    table.meta = {"HTM_LEVEL": HTM_LEVEL, "HTM_ID": index}
    return table


def refcat_shards(config: SimConfig, region: Region, sky: Sky | None = None) -> dict[int, Table]:
    """Every shard overlapping ``region``: ``{htm7 id: table}``."""
    sky = sky or Sky(config)
    return {index: refcat_shard(config, index, sky) for index in sky.trixels(region)}
