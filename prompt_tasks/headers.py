"""Raw headers: read from the bucket, and what they say about the raw.

A raw describes itself in its FITS primary header, and for some cameras (LSSTCam) in a JSON
sidecar next to it. This module reads either from the object store (small, bounded reads that
turn every failure into ``None``) and decides, purely, whether a raw is a calibration
exposure (bias, dark, flat...) and whether it starts the raw-calibration route.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import urllib3

from prompt_tasks.keys import SnapKey

if TYPE_CHECKING:
    from minio import Minio

__all__ = [
    "CALIB_TYPES",
    "HEADER_BYTES",
    "calib_type_of",
    "fits_header",
    "s3_header_reader",
    "s3_sidecar_reader",
    "should_start_calib",
]

log = logging.getLogger(__name__)

#: Image types that are calibration exposures.
CALIB_TYPES = frozenset({"bias", "zero", "dark", "flat", "domeflat", "skyflat", "twflat", "flat-lamp"})

_HEADER_TYPE_FIELDS = ("IMGTYPE", "OBSTYPE", "EXPTYPE")


def calib_type_of(snap: SnapKey, header: Mapping[str, Any] | None = None) -> str | None:
    """The calibration type of a raw (``bias``, ``dark``, ``flat``...), or None for science.

    The header (FITS or sidecar) decides when it names an image type; otherwise a word of the file
    name does (``bias.fits``, ``raw_dark_0001.fits``).
    """
    if header:
        for name in _HEADER_TYPE_FIELDS:
            value = header.get(name)
            if isinstance(value, str) and value:
                kind = value.strip().lower()
                return kind if kind in CALIB_TYPES else None
    for word in re.split(r"[^a-z-]+", snap.filename.lower()):
        if word in CALIB_TYPES:
            return word
    return None


def should_start_calib(calib_type: str | None, announced: bool) -> bool:
    """A calibration exposure with no announced visit starts the raw-calibration route."""
    return calib_type is not None and not announced


def s3_sidecar_reader(client: Minio) -> Callable[[str, str], Mapping[str, Any] | None]:
    """A function ``(bucket, key) -> sidecar dict or None`` reading through ``client``.

    Anything short of a readable JSON object (missing, unreachable, garbage) reads as None:
    the image is parked until the sidecar's own event arrives.
    """
    from minio.error import MinioException

    def read(bucket: str, key: str) -> Mapping[str, Any] | None:
        try:
            response = client.get_object(bucket, key)
            try:
                body = response.read()
            finally:
                response.close()
                response.release_conn()
        except (MinioException, OSError, urllib3.exceptions.HTTPError) as exc:
            log.debug("sidecar %s/%s not readable: %s", bucket, key, exc)
            return None
        try:
            value = json.loads(body)
        except ValueError:
            log.warning("sidecar %s/%s is not JSON", bucket, key)
            return None
        return value if isinstance(value, dict) else None

    return read


#: Bytes read from the start of a raw to find its primary header (four FITS blocks).
HEADER_BYTES = 4 * 2880


def fits_header(data: bytes) -> dict[str, Any]:
    """The keyword values of the FITS primary header at the start of ``data`` (pure).

    Reads 80-character cards up to ``END`` or the end of ``data``; string values are
    unquoted, numbers converted, anything else kept as text. Not FITS: an empty dict.
    """
    if not data.startswith(b"SIMPLE  ="):
        return {}
    out: dict[str, Any] = {}
    for start in range(0, len(data) - 79, 80):
        card = data[start:start + 80].decode("ascii", errors="replace")
        name = card[:8].strip()
        if name == "END":
            break
        if card[8:10] != "= " or not name:
            continue
        text = card[10:].strip()
        if text.startswith("'"):
            out[name] = text[1:].split("'", 1)[0].rstrip()
            continue
        text = text.split("/", 1)[0].strip()
        try:
            out[name] = int(text)
        except ValueError:
            try:
                out[name] = float(text)
            except ValueError:
                out[name] = text
    return out


def s3_header_reader(client: Minio) -> Callable[[str, str], Mapping[str, Any] | None]:
    """A function ``(bucket, key) -> FITS primary header or None`` (one ranged GET)."""
    from minio.error import MinioException

    def read(bucket: str, key: str) -> Mapping[str, Any] | None:
        try:
            response = client.get_object(bucket, key, offset=0, length=HEADER_BYTES)
            try:
                data = response.read()
            finally:
                response.close()
                response.release_conn()
        except (MinioException, OSError, urllib3.exceptions.HTTPError) as exc:
            log.warning("header of %s/%s not readable: %s", bucket, key, exc)
            return None
        return fits_header(data) or None

    return read
