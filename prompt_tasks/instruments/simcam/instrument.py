"""``SimCam``: the simulated camera as a Butler instrument.

Registering it writes the instrument, all 189 possible detectors, the physical filters and the
visit systems. Detector ids and names do not depend on how many detectors a configuration uses
(see :mod:`.geometry`), so every repository, central or local, registers the same records and
the focal plane in use (detector count, image size) is the ``camera`` dataset instead.
"""

from __future__ import annotations

from lsst.daf.butler import DataId, FormatterV2, Registry
from lsst.pipe.base import Instrument
from lsst.utils.introspection import get_full_type_name

from prompt_tasks.instruments.simcam.formatter import CCDImageFormatter
from prompt_tasks.instruments.simcam.geometry import FILTERS, MAX_DETECTORS, FocalPlane

__all__ = ["INSTRUMENT", "VISIT_SYSTEMS", "SimCam"]

INSTRUMENT = "SimCam"
#: Visit systems: id → name. Visits group the snaps of a group (``by-group``).
VISIT_SYSTEMS: dict[int, str] = {0: "one-to-one", 1: "by-group"}


class SimCam(Instrument):
    """The simulated camera: up to 189 detectors of an LSSTCam-like layout."""

    raw_definition = ("raw", ("instrument", "exposure", "detector"), "CCDImage")
    policyName = "simcam"

    @classmethod
    def getName(cls) -> str:
        return INSTRUMENT

    def register(self, registry: Registry, *, update: bool = False) -> None:
        """Write the instrument's dimension records (idempotent)."""
        plane = FocalPlane(MAX_DETECTORS)
        with registry.transaction():
            registry.syncDimensionData(
                "instrument",
                {
                    "name": INSTRUMENT,
                    "detector_max": MAX_DETECTORS,
                    "visit_max": 100000 * 100000000,
                    "exposure_max": 100000 * 100000000,
                    "visit_system": 1,
                    "class_name": get_full_type_name(self),
                },
                update=update,
            )
            for det in plane.detectors:
                registry.syncDimensionData(
                    "detector",
                    {"instrument": INSTRUMENT, "id": det.id, "full_name": det.name,
                     "name_in_raft": det.sensor, "raft": det.raft, "purpose": "SCIENCE"},
                    update=update,
                )
            for name, band in FILTERS.items():
                registry.syncDimensionData(
                    "physical_filter", {"instrument": INSTRUMENT, "name": name, "band": band}, update=update
                )
            for system_id, system_name in VISIT_SYSTEMS.items():
                registry.syncDimensionData(
                    "visit_system", {"instrument": INSTRUMENT, "id": system_id, "name": system_name},
                    update=update,
                )

    def getRawFormatter(self, dataId: DataId) -> type[FormatterV2]:
        return CCDImageFormatter
