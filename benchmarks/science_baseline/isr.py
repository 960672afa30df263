"""Instrument signature removal: one raw snap to a calibrated image in electrons.

The recipe of the SimCam data contract: subtract the master bias, subtract the master dark
scaled by the dark time, divide by the flat, multiply by the gain; flag saturated pixels and
cosmic rays; attach a per-pixel uncertainty (photon plus read noise).
"""

from __future__ import annotations

import math
from typing import Any

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.nddata import CCDData, StdDevUncertainty
from scipy import ndimage

from benchmarks.science_baseline.imaging import card

__all__ = [
    "IsrConfig",
    "IsrConnections",
    "IsrTask",
    "find_cosmic_rays",
    "remove_signature",
]


class IsrConnections(
    pipe_base.PipelineTaskConnections, dimensions=("instrument", "exposure", "detector")
):
    """Raw snap and master calibrations in, ISR-corrected snap out."""

    raw = cT.Input(
        name="raw",
        storageClass="CCDImage",
        doc="Raw snap as delivered by the camera (ADU).",
        dimensions=("instrument", "exposure", "detector"),
    )
    bias = cT.PrerequisiteInput(
        name="bias",
        storageClass="CCDImage",
        doc="Master bias (ADU).",
        dimensions=("instrument", "detector"),
        isCalibration=True,
    )
    dark = cT.PrerequisiteInput(
        name="dark",
        storageClass="CCDImage",
        doc="Master dark (ADU per second of dark time).",
        dimensions=("instrument", "detector"),
        isCalibration=True,
    )
    flat = cT.PrerequisiteInput(
        name="flat",
        storageClass="CCDImage",
        doc="Master flat of the exposure's physical filter (mean 1).",
        dimensions=("instrument", "detector", "physical_filter"),
        isCalibration=True,
    )
    post_isr_image = cT.Output(
        name="post_isr_image",
        storageClass="CCDImage",
        doc="Snap with the instrument signature removed (electrons), mask = bad pixels.",
        dimensions=("instrument", "exposure", "detector"),
    )


class IsrConfig(pipe_base.PipelineTaskConfig, pipelineConnections=IsrConnections):
    """Fallback detector properties, used only when the raw header lacks them."""

    default_gain = pex_config.Field[float](
        doc="Gain (e-/ADU) if the header has no GAIN.", default=1.0
    )
    default_read_noise = pex_config.Field[float](
        doc="Read noise (e-) if no RDNOISE.", default=5.0
    )
    default_saturation = pex_config.Field[float](
        doc="Saturation (ADU) if no SATURATE.", default=65000.0
    )
    do_cosmic_rays = pex_config.Field[bool](
        doc="Flag cosmic-ray hits in the mask.", default=True
    )
    adc_max = pex_config.Field[float](
        doc="Largest value the digitizer delivers (ADU): pixels at it are saturated even when the "
        "header's SATURATE is higher.",
        default=65535.0,
    )
    hot_pixel_electrons = pex_config.Field[float](
        doc="Mask pixels whose dark charge in this exposure exceeds this (e-): their noise is unmodelled.",
        default=200.0,
    )
    cosmic_ray_threshold = pex_config.Field[float](
        doc="A cosmic ray stands this many sigma above its 3x3 median and is sharper than the PSF.",
        default=8.0,
    )


def find_cosmic_rays(
    data: np.ndarray, sigma: np.ndarray, threshold: float, ratio: float = 2.0
) -> np.ndarray:
    """Pixels hit by cosmic rays: significant and sharper than any well-sampled PSF.

    A star's peak exceeds the mean of its four neighbours (above the sky) by a factor
    bounded by the PSF width (1.25 for a 1.5-pixel sigma); a cosmic-ray hit exceeds it by more
    than ``ratio`` and by ``threshold`` sigma. The sky is the image median (cheap at 4k x 4k;
    a brighter local sky only makes the test stricter). Hits are grown by one pixel.
    """
    cross = np.array([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]])
    neighbours = ndimage.convolve(data, cross, mode="nearest")
    sky = float(np.median(data[::4, ::4]))
    sharp = (data - neighbours > threshold * sigma) & (
        data - sky > ratio * (neighbours - sky)
    )
    return ndimage.binary_dilation(sharp, iterations=1) if sharp.any() else sharp


def remove_signature(
    raw: CCDData,
    bias: CCDData,
    dark: CCDData,
    flat: CCDData,
    *,
    gain: float,
    read_noise: float,
    saturation: float,
    hot_pixel_electrons: float = math.inf,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Electrons, their standard deviation and the bad-pixel mask of one raw snap.

    Bad pixels are saturated, unflattenable (flat < 0.05) or hot (dark charge above
    ``hot_pixel_electrons``).
    """
    adu = np.asarray(raw.data, dtype=np.float64)
    saturated = adu >= saturation
    dark_time = float(raw.meta.get("DARKTIME", raw.meta.get("EXPTIME", 0.0)))
    dark_adu = np.asarray(dark.data, dtype=np.float64) * dark_time
    hot = dark_adu * gain > hot_pixel_electrons
    adu = adu - np.asarray(bias.data, dtype=np.float64) - dark_adu
    flat_data = np.asarray(flat.data, dtype=np.float64)
    good_flat = flat_data > 0.05
    electrons = (
        np.where(good_flat, adu / np.where(good_flat, flat_data, 1.0), 0.0) * gain
    )
    variance = np.clip(electrons, 0, None) + read_noise**2
    return electrons, np.sqrt(variance), saturated | ~good_flat | hot


class IsrTask(pipe_base.PipelineTask):
    """Remove the instrument signature from one snap (bias, dark, flat, gain, bad pixels)."""

    ConfigClass = IsrConfig
    config: IsrConfig
    _DefaultName = "isr"

    def run(
        self, raw: CCDData, bias: CCDData, dark: CCDData, flat: CCDData
    ) -> pipe_base.Struct:
        """Return ``post_isr_image``: the snap in electrons with uncertainty and mask."""
        meta: Any = raw.meta
        gain = float(meta.get("GAIN", self.config.default_gain))
        read_noise = float(meta.get("RDNOISE", self.config.default_read_noise))
        saturation = min(
            float(meta.get("SATURATE", self.config.default_saturation)),
            self.config.adc_max,
        )
        electrons, sigma, bad = remove_signature(
            raw,
            bias,
            dark,
            flat,
            gain=gain,
            read_noise=read_noise,
            saturation=saturation,
            hot_pixel_electrons=self.config.hot_pixel_electrons,
        )
        cosmic = np.zeros_like(bad)
        if self.config.do_cosmic_rays:
            cosmic = (
                find_cosmic_rays(electrons, sigma, self.config.cosmic_ray_threshold)
                & ~bad
            )
        header = raw.meta.copy()
        header["BUNIT"] = "electron"
        header["ISR_GAIN"] = card(gain, "gain applied (e-/ADU)")
        header["ISR_NSAT"] = card(
            int(bad.sum()), "saturated, hot or unflattenable pixels"
        )
        header["ISR_NCR"] = card(int(cosmic.sum()), "pixels flagged as cosmic rays")
        self.log.info(
            "ISR: median %.1f e-, %d saturated/bad and %d cosmic-ray pixels",
            float(np.median(electrons)),
            int(bad.sum()),
            int(cosmic.sum()),
        )
        image = CCDData(
            electrons.astype(np.float32),
            unit="electron",
            meta=header,
            mask=bad | cosmic,
            uncertainty=StdDevUncertainty(sigma.astype(np.float32)),
        )
        return pipe_base.Struct(post_isr_image=image)
