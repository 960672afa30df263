"""Butler formatters of the science payload's own storage classes.

``AlertPacket``: the alerts of a visit-detector as the bytes of one Avro object container
file (schema in the file header, one record per alert), stored as ``.avro``. Registered in an
instrument seed config next to the image storage class, so every repo can read and write it.
"""

from __future__ import annotations

from typing import Any

from lsst.daf.butler import FormatterV2
from lsst.resources import ResourcePath

__all__ = ["SEED_CONFIG", "AvroBytesFormatter"]

#: The seed-config entries (storage classes and formatters) this module provides.
SEED_CONFIG: dict[str, Any] = {
    "storageClasses": {"AlertPacket": {"pytype": "builtins.bytes"}},
    "datastore": {"formatters": {"AlertPacket": "prompt_tasks.science.formatters.AvroBytesFormatter"}},
}


class AvroBytesFormatter(FormatterV2):
    """Read and write an Avro container file held in memory as ``bytes``."""

    default_extension = ".avro"
    supported_extensions = frozenset({".avro"})
    can_read_from_uri = True

    def read_from_uri(self, uri: ResourcePath, component: str | None = None, expected_size: int = -1) -> Any:
        """The file's bytes, unchanged."""
        return uri.read()

    def to_bytes(self, in_memory_dataset: Any) -> bytes:
        """The bytes to write (the dataset is already serialized)."""
        if not isinstance(in_memory_dataset, bytes | bytearray):
            raise TypeError(f"AlertPacket datasets are bytes, not {type(in_memory_dataset).__name__}")
        return bytes(in_memory_dataset)
