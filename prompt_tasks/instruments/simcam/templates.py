"""Template coadds: deep, background-subtracted images of the static sky, per patch and band.

Pixels are in nJy (``mag = 31.4 - 2.5 log10(nJy)``), drawn with a 0.7" PSF, with the noise of
a stack of :data:`DEPTH_VISITS` 30-s visits. Variables show their mean magnitude and new
sources are absent, so a difference image shows exactly the transients of the ground truth.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.nddata import CCDData

from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.geometry import (
    PIXEL_SCALE,
    SKY_BRIGHTNESS,
    ZERO_POINTS,
)
from prompt_tasks.instruments.simcam.render import render_points
from prompt_tasks.instruments.simcam.sky import Sky
from prompt_tasks.instruments.simcam.skymap import SimSkyMap

__all__ = ["DEPTH_VISITS", "NJY_ZERO_POINT", "TEMPLATE_FWHM", "make_template"]

#: AB magnitude of 1 nJy.
NJY_ZERO_POINT = 31.4
#: PSF FWHM of the templates (arcsec).
TEMPLATE_FWHM = 0.7
#: Number of 30-s visits the template's noise corresponds to.
DEPTH_VISITS = 30


def make_template(config: SimConfig, skymap: SimSkyMap, tract: int, patch: int, band: str,
                  sky: Sky | None = None) -> CCDData:
    """The template coadd of one patch in ``band``."""
    sky = sky or Sky(config)
    info = skymap.patch(tract, patch)
    x0, y0, x1, y1 = info.bbox
    shape = (y1 - y0, x1 - x0)
    wcs = skymap.patch_wcs(tract, patch)
    # Sources just outside the patch still spill light into it.
    ra, dec, mag = sky.sources_at(_grown(skymap, tract, info.bbox), band, None)
    x, y = wcs.all_world2pix(ra, dec, 0) if len(ra) else (np.zeros(0), np.zeros(0))
    flux = 10 ** (-0.4 * (mag - NJY_ZERO_POINT))
    image = render_points(shape, x, y, flux, TEMPLATE_FWHM / PIXEL_SCALE)
    zp = ZERO_POINTS[band]
    njy_per_e_s = 10 ** (-0.4 * (zp - NJY_ZERO_POINT))
    sky_e_per_visit = 10 ** (-0.4 * (SKY_BRIGHTNESS[band] - zp)) * PIXEL_SCALE**2 * 30.0
    noise = math.sqrt(sky_e_per_visit) / 30.0 * njy_per_e_s / math.sqrt(DEPTH_VISITS)
    rng = np.random.default_rng([config.seed, 9_000_000, tract, patch, "ugrizy".index(band)])
    image += rng.normal(0.0, noise, shape)
    header = {k: v for k, v in wcs.to_header().items()}
    header.update({"OBSTYPE": "TEMPLATE", "BAND": band, "TRACT": tract, "PATCH": patch,
                   "PSFFWHM": TEMPLATE_FWHM, "NOISE": noise, "MAGZERO": NJY_ZERO_POINT,
                   "BUNIT": "nJy", "NVISITS": DEPTH_VISITS})
    return CCDData(image.astype(np.float32), unit="nJy", meta=header)


def _grown(skymap: SimSkyMap, tract: int, bbox: tuple[int, int, int, int]):
    """The patch's region grown by 20 pixels."""
    x0, y0, x1, y1 = bbox
    return skymap._polygon(tract, x0 - 20, y0 - 20, x1 + 20, y1 + 20)
