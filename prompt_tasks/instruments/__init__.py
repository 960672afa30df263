"""Instrument plugins: what the framework needs to know about a camera, found by name.

The framework core never names an instrument. A camera package declares an entry point in the
group ``prompt_tasks.instruments`` whose value is an :class:`InstrumentPlugin`::

    [options.entry_points]
    prompt_tasks.instruments =
        SimCam = prompt_tasks.instruments.simcam:PLUGIN

and :func:`load_plugin` finds it by instrument name. A plugin provides its Butler
``Instrument`` class, its focal-plane geometry (the sky footprint of a detector before any
pixel exists), its object-key scheme, its raw header translator, the directory of its
pipeline configuration, the seed config of its repositories, how to read the camera a
central repository holds, and any command-line commands of its own.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from lsst.sphgeom import ConvexPolygon

__all__ = [
    "ENTRY_POINT_GROUP",
    "FocalPlaneGeometry",
    "InstrumentPlugin",
    "UnknownInstrument",
    "known_instruments",
    "load_plugin",
]

#: Entry-point group instrument packages register their plugin under.
ENTRY_POINT_GROUP = "prompt_tasks.instruments"

#: Plugins shipped with prompt-tasks, found even before the package's metadata is installed.
_BUILTIN: dict[str, str] = {"SimCam": "prompt_tasks.instruments.simcam:PLUGIN"}


class UnknownInstrument(LookupError):
    """No plugin is registered under that instrument name."""


class FocalPlaneGeometry(Protocol):
    """What preload needs of a camera's geometry."""

    def footprint(self, detector: int, ra: float, dec: float, camera_angle: float,
                  pad_deg: float = 0.0) -> ConvexPolygon:
        """Sky polygon of ``detector`` for a boresight and camera angle."""
        ...


@dataclass(frozen=True)
class InstrumentPlugin:
    """An instrument, as the framework sees it."""

    #: Instrument name (as in Butler and in ``next_visit.instrument``).
    name: str
    #: Dotted name of its ``lsst.pipe.base.Instrument`` subclass.
    instrument_class_name: str
    #: Name of its object-key scheme in :mod:`prompt_tasks.model.objectkeys` (``dmtn-219`` by default).
    key_scheme: str
    #: Geometry from the instrument's camera description (the ``camera`` dataset, or None
    #: for the default configuration).
    geometry: Callable[[Mapping[str, Any] | None], FocalPlaneGeometry]
    #: Raw header → Butler dimension records, by element, in insertion order.
    translator: Callable[..., dict[str, list[dict[str, Any]]]]
    #: Directory of the instrument's pipeline YAML files and configs.
    pipelines_dir: Path
    #: Butler dataset type of raws: (name, dimensions, storage class).
    raw_definition: tuple[str, tuple[str, ...], str] = ("raw", ("instrument", "exposure", "detector"), "CCDImage")
    #: The seed config every repository of the instrument is created with (a ``Config``).
    seed_config: Callable[[], Any] | None = None
    #: The camera description a central repository holds (``Butler`` → mapping or None),
    #: for cameras whose focal plane is chosen when the repository is built.
    read_camera: Callable[[Any], Mapping[str, Any] | None] | None = None
    #: Dotted name of a module of ``prompt-tasks`` commands for this instrument (it exposes
    #: ``COMMANDS``, a list of click commands), e.g. a simulator's.
    commands: str | None = None

    @property
    def instrument_class(self) -> type:
        """The Butler ``Instrument`` class (imported on first use)."""
        module, _, attr = self.instrument_class_name.rpartition(".")
        return getattr(importlib.import_module(module), attr)


def _load_reference(reference: str) -> InstrumentPlugin:
    module, _, attr = reference.partition(":")
    plugin = getattr(importlib.import_module(module), attr)
    if not isinstance(plugin, InstrumentPlugin):
        raise TypeError(f"{reference} is a {type(plugin).__name__}, not an InstrumentPlugin")
    return plugin


@functools.cache
def _registered() -> Mapping[str, str]:
    """Instrument name → plugin reference, built in and installed.

    Found once per process: reading the entry points walks every installed distribution's
    metadata (milliseconds, and the stages look a plugin up several times per detector-visit),
    and what is installed does not change under a running worker.
    """
    found = dict(_BUILTIN)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found[entry.name] = entry.value
    return MappingProxyType(found)


def known_instruments() -> set[str]:
    """Names of every instrument with a plugin."""
    return set(_registered())


def load_plugin(name: str) -> InstrumentPlugin:
    """The plugin of instrument ``name``.

    Raises
    ------
    UnknownInstrument
        No plugin is registered under ``name``.
    """
    reference = _registered().get(name)
    if reference is None:
        raise UnknownInstrument(f"no instrument plugin {name!r}; known: {', '.join(sorted(known_instruments()))}")
    return _load_reference(reference)
