"""SimCam, the simulated camera: its plugin, sky, raw simulator and calibrations.

Modules: :mod:`.geometry` (focal plane, footprints), :mod:`.visits` (visit ids),
:mod:`.instrument` (Butler ``Instrument``), :mod:`.formatter` (``CCDImage`` storage class),
:mod:`.translator` (header → records), :mod:`.config` (one simulated world),
:mod:`.sky` (stars, transients, ground truth), :mod:`.refcat`, :mod:`.skymap`,
:mod:`.templates`, :mod:`.calibs` (detector model, master calibrations), :mod:`.raws`
(raw simulator), :mod:`.night` (the summit simulator's plan). The data contract for
pipelines is ``DATASETS.md`` next to this file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prompt_tasks.instruments import InstrumentPlugin
from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.geometry import FocalPlane

__all__ = ["PLUGIN", "focal_plane"]


def focal_plane(camera: Mapping[str, Any] | None = None) -> FocalPlane:
    """The focal plane described by a ``camera`` dataset (default: 9 detectors of 512²)."""
    return SimConfig.model_validate(dict(camera or {})).focal_plane


def _translate(header: Mapping[str, Any], **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    from prompt_tasks.instruments.simcam.translator import records_from_header

    return records_from_header(header, **kwargs)


def _read_camera(butler: Any) -> Mapping[str, Any] | None:
    from prompt_tasks.instruments.simcam.central import read_camera

    return read_camera(butler)


def _seed_config() -> Any:
    from prompt_tasks.instruments.simcam.formatter import seed_config

    return seed_config()


PLUGIN = InstrumentPlugin(
    name="SimCam",
    instrument_class_name="prompt_tasks.instruments.simcam.instrument.SimCam",
    key_scheme="dmtn-219",
    geometry=focal_plane,
    translator=_translate,
    pipelines_dir=Path(__file__).with_name("pipelines"),
    seed_config=_seed_config,
    read_camera=_read_camera,
    commands="prompt_tasks.cli.simcam",
)
