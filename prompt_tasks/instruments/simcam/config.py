"""The description of one simulated world: focal plane, sky and calibration epochs.

A :class:`SimConfig` is all the simulator, the central-repo builder and the ground truth need;
the same config gives the same pixels. ``central init`` stores it in the central repo as the
``camera`` dataset so every other process (workers, ``simulate``) rebuilds the same world.
"""

from __future__ import annotations

from functools import cached_property

from astropy.time import Time
from pydantic import BaseModel, ConfigDict, Field

from prompt_tasks.instruments.simcam.geometry import BANDS, FocalPlane

__all__ = ["SimConfig"]


class SimConfig(BaseModel):
    """Parameters of the simulated camera and sky (JSON-ready, immutable)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    n_detectors: int = Field(9, ge=1, le=189, description="Detectors of the focal plane.")
    size: int = Field(512, ge=16, description="Detector width and height (pixels).")
    seed: int = Field(20261124, description="Seed of everything random in the world.")
    field_ra: float = Field(105.0, description="Centre of the survey area (deg).")
    field_dec: float = Field(-15.0, description="Centre of the survey area (deg).")
    field_radius: float = Field(0.03, gt=0, description="Radius of the survey area the pointings cover (deg).")
    patch_size: int = Field(1000, ge=64, description="Inner size of a skymap patch (pixels).")
    bands: tuple[str, ...] = Field(BANDS, description="Bands with templates and calibrations.")
    star_density: float = Field(40000.0, ge=0, description="Stars per deg² brighter than r = 24 (low Galactic latitude).")
    star_slope: float = Field(0.25, description="d log10 N / dm of the star counts.")
    star_mag_range: tuple[float, float] = Field((15.0, 25.5), description="r magnitudes simulated.")
    variable_fraction: float = Field(0.02, ge=0, le=1, description="Fraction of stars that vary.")
    transient_density: float = Field(12000.0, ge=0, description="New (outbursting) sources per deg².")
    refcat_mag_limit: float = Field(22.0, description="Faintest r magnitude in the reference catalog.")
    epochs: tuple[str, ...] = Field(("2025-01-01T00:00:00", "2026-06-01T00:00:00"),
                                    description="TAI start of each calibration epoch (the last is open).")

    @cached_property
    def focal_plane(self) -> FocalPlane:
        """The focal plane."""
        return FocalPlane(self.n_detectors, self.size)

    @cached_property
    def epoch_starts(self) -> list[float]:
        """TAI unix seconds at which each calibration epoch starts."""
        return [float(Time(e, scale="tai").unix_tai) for e in self.epochs]

    def epoch_of(self, tai_unix: float) -> int:
        """Index of the calibration epoch holding ``tai_unix`` (0 before the first)."""
        index = 0
        for i, start in enumerate(self.epoch_starts):
            if tai_unix >= start:
                index = i
        return index

    @property
    def reference_time(self) -> float:
        """TAI unix seconds of phase zero of every light curve."""
        return self.epoch_starts[0]
