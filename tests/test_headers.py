"""Raw headers: the FITS header parser, the calibration decision, reading from the bucket."""

from __future__ import annotations

import io
import uuid

import numpy as np
from astropy.io import fits

from prompt_tasks.model.headers import (
    calib_type_of,
    fits_header,
    should_start_calib,
)
from prompt_tasks.model.objectkeys import SnapKey
from prompt_tasks.objstore import header_reader, make_client, sidecar_reader
from prompt_tasks.settings import Settings


def fits_bytes(imgtype: str) -> bytes:
    """A small FITS file whose primary header has IMGTYPE ``imgtype``."""
    hdu = fits.PrimaryHDU(np.zeros((4, 4), dtype=np.int16))
    hdu.header["IMGTYPE"] = (imgtype, "image type")
    hdu.header["EXPTIME"] = 15.5
    hdu.header["DETECTOR"] = 3
    out = io.BytesIO()
    hdu.writeto(out)
    return out.getvalue()


def test_fits_header_parser() -> None:
    header = fits_header(fits_bytes("DARK"))
    assert (header["IMGTYPE"], header["EXPTIME"], header["DETECTOR"], header["SIMPLE"]) == ("DARK", 15.5, 3, "T")
    assert fits_header(b"not fits") == {}
    assert fits_header(fits_bytes("FLAT")[:200])["BITPIX"] == 16  # a truncated header still gives its cards


def test_calibration_decision() -> None:
    snap = SnapKey("SimCam", 1, "g", 0, "bias.fits")
    assert calib_type_of(snap) == "bias"
    assert calib_type_of(SnapKey("SimCam", 1, "g", 0, "raw_dark_001.fits")) == "dark"
    assert calib_type_of(SnapKey("SimCam", 1, "g", 0, "raw.fits")) is None
    assert calib_type_of(snap, {"IMGTYPE": "OBJECT"}) is None
    assert calib_type_of(SnapKey("LSSTCam", 1, "g", 0, "x.fits"), {"IMGTYPE": "FLAT"}) == "flat"
    assert should_start_calib("flat", announced=False)
    assert not should_start_calib("flat", announced=True)
    assert not should_start_calib(None, announced=False)


def test_readers_on_the_real_bucket(settings: Settings) -> None:
    client = make_client(settings)
    bucket, stem = settings.raw_bucket, f"headers-test/{uuid.uuid4().hex}"
    for key, data in ((f"{stem}/raw.fits", fits_bytes("BIAS")), (f"{stem}/ok.json", b'{"GROUPID": "g"}'),
                      (f"{stem}/bad.json", b"[1, 2"), (f"{stem}/list.json", b"[1, 2]")):
        client.put_object(bucket, key, io.BytesIO(data), len(data))
    read_header, read_sidecar = header_reader(client), sidecar_reader(client)
    assert read_header(bucket, f"{stem}/raw.fits")["IMGTYPE"] == "BIAS"  # type: ignore[index]
    assert read_header(bucket, f"{stem}/missing.fits") is None
    assert read_header(bucket, f"{stem}/ok.json") is None  # not FITS
    assert read_sidecar(bucket, f"{stem}/ok.json") == {"GROUPID": "g"}
    assert read_sidecar(bucket, f"{stem}/bad.json") is None
    assert read_sidecar(bucket, f"{stem}/list.json") is None
    assert read_sidecar(bucket, f"{stem}/missing.json") is None
