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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prompt_tasks.model.objectkeys import SnapKey

if TYPE_CHECKING:
    pass

__all__ = [
    "CALIB_TYPES",
    "HEADER_BYTES",
    "calib_type_of",
    "fits_header",
    "should_start_calib",
    "sidecar_from_bytes",
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


def sidecar_from_bytes(data: bytes | None) -> dict[str, Any] | None:
    """A JSON sidecar's object, or None for anything else (missing, garbage, not an object)."""
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        log.warning("sidecar is not JSON")
        return None
    return value if isinstance(value, dict) else None


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
