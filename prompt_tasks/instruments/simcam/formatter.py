"""``CCDImage``: FITS images as astropy ``CCDData``, read and written without afw.

The storage class and its formatter reach a repository through the seed config shipped next
to this module (``seed_butler.yaml``); every repository, central and local, must be created
with it (:func:`seed_config`).

Layout: the primary HDU holds the image and its header; optional ``MASK`` and ``UNCERT``
(standard deviation) image extensions follow. Raws straight from the camera (one primary HDU)
read through the same path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData, StdDevUncertainty
from lsst.daf.butler import Config, FormatterV2
from lsst.resources import ResourcePath

__all__ = ["SEED_CONFIG", "CCDImageFormatter", "read_ccd", "seed_config", "write_ccd"]

#: The repo seed config declaring ``CCDImage``.
SEED_CONFIG = Path(__file__).with_name("seed_butler.yaml")


def seed_config(registry_db: str | None = None) -> Config:
    """A fresh copy of the seed config, with ``registry.db`` set when given."""
    config = Config(str(SEED_CONFIG))
    if registry_db:
        config["registry", "db"] = registry_db
    return config


def read_ccd(source: Any, section: tuple[int, int, int, int] | None = None) -> CCDData:
    """Read a ``CCDImage`` FITS file (path or file object); ``section`` is ``(y0, y1, x0, x1)``."""
    with fits.open(source, memmap=False) as hdul:
        image = next(h for h in hdul if h.data is not None and h.name not in ("MASK", "UNCERT"))
        header = image.header.copy()
        data = image.data
        mask = hdul["MASK"].data if "MASK" in hdul else None
        uncert = hdul["UNCERT"].data if "UNCERT" in hdul else None
    if section is not None:
        y0, y1, x0, x1 = section
        data = data[y0:y1, x0:x1]
        mask = None if mask is None else mask[y0:y1, x0:x1]
        uncert = None if uncert is None else uncert[y0:y1, x0:x1]
    for key in ("BSCALE", "BZERO"):
        header.remove(key, ignore_missing=True)
    return CCDData(
        data,
        unit=header.get("BUNIT", "adu"),
        meta=header,
        mask=None if mask is None else mask.astype(bool),
        uncertainty=None if uncert is None else StdDevUncertainty(uncert),
    )


def write_ccd(ccd: CCDData) -> fits.HDUList:
    """The HDU list of ``ccd`` in the ``CCDImage`` layout."""
    header = fits.Header(ccd.meta) if ccd.meta else fits.Header()
    header["BUNIT"] = ccd.unit.to_string() if ccd.unit is not None else "adu"
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [fits.PrimaryHDU(np.asarray(ccd.data), header=header)]
    if ccd.mask is not None:
        hdus.append(fits.ImageHDU(np.asarray(ccd.mask, dtype=np.uint8), name="MASK"))
    if ccd.uncertainty is not None:
        hdus.append(fits.ImageHDU(np.asarray(ccd.uncertainty.array, dtype=np.float32), name="UNCERT"))
    return fits.HDUList(hdus)


class CCDImageFormatter(FormatterV2):
    """Read and write ``astropy.nddata.CCDData`` as FITS (read parameter ``section``)."""

    default_extension = ".fits"
    supported_extensions = frozenset({".fits", ".fit", ".fits.fz", ".fz"})
    can_read_from_local_file = True

    def read_from_local_file(self, path: str, component: str | None = None, expected_size: int = -1) -> Any:
        params = self.file_descriptor.parameters or {}
        return read_ccd(path, params.get("section"))

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        write_ccd(in_memory_dataset).writeto(uri.ospath, overwrite=True)
