"""The detectors' instrument signature and the master calibrations that remove it.

Each detector has a gain, a read noise, a bias frame, a dark current (with hot pixels) and a
flat-field response per band (vignetting over the focal plane, pixel response non-uniformity,
dust donuts). Bias level and dust change between calibration epochs, so a raw is only
corrected well by the calibrations of its own epoch. The raw simulator applies these truths;
:func:`master_bias`, :func:`master_dark` and :func:`master_flat` are what a calibration
production would have made of them (the truth plus the noise left after stacking).

Units: bias in ADU; dark in ADU per second; flat dimensionless with mean 1. Masters carry
their per-pixel noise in the header (``NOISE``), not as an extension.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from astropy.nddata import CCDData
from astropy.time import Time

from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.geometry import BANDS, PIXEL_SCALE, physical_filter

__all__ = [
    "BIAS_LEVEL",
    "FULL_WELL",
    "bias_frame",
    "dark_rate",
    "flat_response",
    "gain",
    "master_bias",
    "master_dark",
    "master_flat",
    "read_noise",
]

#: Nominal bias level (ADU).
BIAS_LEVEL = 1000.0
#: Full well (electrons).
FULL_WELL = 100_000.0
#: Frames stacked into a master (sets the master's residual noise).
_STACKED = 25
#: Largest detector size whose flat responses are memoised.
_MEMO_MAX_SIZE = 1024


def _rng(config: SimConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, 7_000_000, *key])


def gain(detector: int) -> float:
    """Electrons per ADU of ``detector``."""
    return 1.5 + 0.05 * ((detector * 7) % 5 - 2)


def read_noise(detector: int) -> float:
    """Read noise of ``detector`` (electrons)."""
    return 5.0 + (detector % 3)


def bias_frame(config: SimConfig, detector: int, epoch: int) -> np.ndarray:
    """The true bias (ADU) of ``detector`` in calibration ``epoch``: level, rows, a gradient."""
    n = config.size
    rng = _rng(config, detector, epoch, 1)
    level = BIAS_LEVEL + 12.0 * (detector % 9) + 40.0 * epoch
    rows = rng.normal(0.0, 1.5, (n, 1))
    cols = np.linspace(-3.0, 3.0, n)[None, :] * (1 if epoch % 2 == 0 else -1)
    return (level + rows + cols).astype(np.float32)


def dark_rate(config: SimConfig, detector: int) -> np.ndarray:
    """The true dark current (electrons per second) of ``detector``, hot pixels included."""
    n = config.size
    rng = _rng(config, detector, 2)
    rate = np.full((n, n), 0.02, np.float32)
    hot = rng.random((n, n)) < 5e-4
    rate[hot] = rng.uniform(5.0, 50.0, int(hot.sum())).astype(np.float32)
    return rate


def flat_response(config: SimConfig, detector: int, band: str, epoch: int) -> np.ndarray:
    """The true relative response of ``detector`` in ``band`` (mean 1, read-only).

    Vignetting is radial over the focal plane; the pixel response non-uniformity is fixed per
    detector (stronger in the blue); dust donuts differ between epochs. Detectors up to
    1024² are memoised (every snap of a visit needs the same response).
    """
    if config.size <= _MEMO_MAX_SIZE:
        return _flat_memo(config, detector, band, epoch)
    return _flat_response(config, detector, band, epoch)


@lru_cache(maxsize=64)
def _flat_memo(config: SimConfig, detector: int, band: str, epoch: int) -> np.ndarray:
    flat = _flat_response(config, detector, band, epoch)
    flat.setflags(write=False)
    return flat


def _flat_response(config: SimConfig, detector: int, band: str, epoch: int) -> np.ndarray:
    plane = config.focal_plane
    det = plane[detector]
    n = config.size
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    u, v = det.pixel_to_focal(x, y)
    r_deg = np.hypot(u, v) / 3600.0
    vignetting = 1.0 - 0.08 * (r_deg / 1.75) ** 2
    band_index = BANDS.index(band)
    prnu = 1.0 + _rng(config, detector, 3).normal(0.0, 0.012 - 0.001 * band_index, (n, n))
    response = vignetting * prnu
    donuts = _rng(config, detector, epoch, 4)
    for _ in range(2 + epoch):
        cx, cy = donuts.uniform(0, n, 2)
        radius = donuts.uniform(8, 25) / PIXEL_SCALE * 0.2
        ring = np.hypot(x - cx, y - cy)
        response *= 1.0 - 0.03 * np.exp(-0.5 * ((ring - radius) / (0.25 * radius)) ** 2)
    return (response / response.mean()).astype(np.float32)


def _meta(kind: str, detector: int, epoch: int, config: SimConfig, **extra: object) -> dict[str, object]:
    start = Time(config.epochs[epoch], scale="tai")
    return {"OBSTYPE": kind.upper(), "INSTRUME": "SimCam", "DETECTOR": detector,
            "DETNAME": config.focal_plane[detector].name, "CALIBEPO": epoch,
            "CALIBDT": start.isot, "NSTACKED": _STACKED, **extra}


def master_bias(config: SimConfig, detector: int, epoch: int) -> CCDData:
    """Master bias (ADU) of ``detector`` for ``epoch``."""
    truth = bias_frame(config, detector, epoch)
    sigma = read_noise(detector) / gain(detector) / math.sqrt(_STACKED)
    noise = _rng(config, detector, epoch, 11).normal(0, sigma, truth.shape)
    return CCDData((truth + noise).astype(np.float32), unit="adu",
                   meta=_meta("bias", detector, epoch, config, NOISE=sigma))


def master_dark(config: SimConfig, detector: int, epoch: int, dark_time: float = 30.0) -> CCDData:
    """Master dark (ADU per second) of ``detector`` for ``epoch``."""
    g = gain(detector)
    truth = dark_rate(config, detector) / g
    sigma = np.sqrt(truth * dark_time / g + (read_noise(detector) / g) ** 2) / dark_time / math.sqrt(_STACKED)
    noise = _rng(config, detector, epoch, 12).normal(0, 1, truth.shape) * sigma
    return CCDData((truth + noise).astype(np.float32), unit="adu / s",
                   meta=_meta("dark", detector, epoch, config, NOISE=float(np.median(sigma))))


def master_flat(config: SimConfig, detector: int, band: str, epoch: int, level_e: float = 20000.0) -> CCDData:
    """Master flat (mean 1) of ``detector`` in ``band`` for ``epoch``."""
    truth = flat_response(config, detector, band, epoch)
    sigma = 1.0 / math.sqrt(level_e * _STACKED)
    noise = _rng(config, detector, epoch, 13 + BANDS.index(band)).normal(0, sigma, truth.shape)
    data = truth * (1.0 + noise)
    data /= data.mean()
    return CCDData(data.astype(np.float32), unit="",
                   meta=_meta("flat", detector, epoch, config, FILTER=physical_filter(band), BAND=band, NOISE=sigma))
