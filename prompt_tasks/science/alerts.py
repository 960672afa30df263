"""Alert packaging: one Rubin alert per DIA source, Avro-serialized with lsst-alert-packet's schema.

Each alert carries the triggering DIA source, its DIA object, the object's earlier sources and
FITS cutouts of the difference, science and matched-template images. Records are built from
the schema itself (every field, nulls where we have no value), validated against it, and
written as one Avro object container file (the ``alert_packet`` dataset, ``bytes``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table

__all__ = [
    "AlertSchema",
    "PackageAlertsConfig",
    "PackageAlertsConnections",
    "PackageAlertsTask",
    "cutout_fits",
    "read_alerts",
    "write_alerts",
]

_VISIT_DIMENSIONS = ("instrument", "visit", "detector")
_INT_TYPES = {"int", "long"}
_FLOAT_TYPES = {"float", "double"}


class AlertSchema:
    """The Rubin alert schema (lsst-alert-packet) and a builder of records that follow it.

    Parameters
    ----------
    version : `str`
        ``"major.minor"`` of the schema; empty for the latest shipped version.
    """

    def __init__(self, version: str = "") -> None:
        from lsst.alert.packet import Schema, get_schema_uri

        if version:
            major, minor = (int(p) for p in version.split("."))
            self.schema = Schema.from_uri(get_schema_uri(major, minor))
        else:
            self.schema = Schema.from_uri()
        self.definition: dict[str, Any] = self.schema.definition
        self.records: dict[str, dict[str, Any]] = {}
        self._collect(self.definition)

    @property
    def name(self) -> str:
        """Full name of the alert record type (e.g. ``lsst.v11_1.alert``)."""
        return str(self.definition["name"])

    def _collect(self, node: Any) -> None:
        """Index every named record type of the schema by its short name."""
        if isinstance(node, list):
            for item in node:
                self._collect(item)
        elif isinstance(node, dict):
            if node.get("type") == "record":
                self.records[str(node["name"]).rsplit(".", 1)[-1]] = node
                for field in node["fields"]:
                    self._collect(field["type"])
            elif node.get("type") == "array":
                self._collect(node["items"])

    def record(self, record_name: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """A record of type ``record_name`` with every schema field, taken from ``values``.

        Missing or non-finite values become null where the schema allows it; a required field
        without a value raises `ValueError`.
        """
        out: dict[str, Any] = {}
        for field in self.records[record_name]["fields"]:
            name, ftype = field["name"], field["type"]
            nullable = isinstance(ftype, list) and "null" in ftype
            base = (
                next((t for t in ftype if t != "null"), "null")
                if isinstance(ftype, list)
                else ftype
            )
            value = _python_value(values.get(name), base)
            if value is None and not nullable:
                if "default" in field and field["default"] is not None:
                    value = field["default"]
                else:
                    raise ValueError(
                        f"{record_name}.{name} is required by the alert schema"
                    )
            out[name] = value
        return out

    def validate(self, alert: Mapping[str, Any]) -> None:
        """Raise `ValueError` unless ``alert`` follows the schema."""
        import fastavro
        from fastavro.validation import ValidationError

        try:
            fastavro.validate(alert, self.definition, raise_errors=True)
        except ValidationError as exc:
            raise ValueError(f"alert does not follow {self.name}: {exc}") from exc


def _python_value(value: Any, avro_type: Any) -> Any:
    """``value`` as the plain Python type Avro wants, or None for missing/non-finite."""
    if value is None or avro_type == "null" or isinstance(avro_type, dict):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if avro_type in _FLOAT_TYPES:
        value = float(value)
        return value if math.isfinite(value) else None
    if avro_type in _INT_TYPES:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return int(value)
    if avro_type == "boolean":
        return bool(value)
    if avro_type == "string":
        return str(value)
    if avro_type == "bytes":
        return bytes(value)
    return value


def cutout_fits(image: CCDData | None, x: float, y: float, half: int) -> bytes | None:
    """A FITS cutout (2·half+1 pixels square, WCS shifted) of ``image`` around (x, y)."""
    if image is None:
        return None
    data = np.asarray(image.data, dtype=np.float32)
    ix, iy = round(x), round(y)
    size = 2 * half + 1
    stamp = np.full((size, size), np.nan, dtype=np.float32)
    y0, x0 = iy - half, ix - half
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(data.shape[0], y0 + size), min(data.shape[1], x0 + size)
    if sy1 > sy0 and sx1 > sx0:
        stamp[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = data[sy0:sy1, sx0:sx1]
    header = fits.Header()
    for key in (
        "CTYPE1",
        "CTYPE2",
        "CRVAL1",
        "CRVAL2",
        "CD1_1",
        "CD1_2",
        "CD2_1",
        "CD2_2",
        "CUNIT1",
        "CUNIT2",
    ):
        if key in image.meta:
            header[key] = image.meta[key]
    if "CRPIX1" in image.meta:
        header["CRPIX1"] = float(image.meta["CRPIX1"]) - x0
        header["CRPIX2"] = float(image.meta["CRPIX2"]) - y0
    header["BUNIT"] = str(image.unit) if image.unit is not None else "electron"
    buffer = io.BytesIO()
    fits.PrimaryHDU(stamp, header=header).writeto(buffer)
    return buffer.getvalue()


def write_alerts(schema: AlertSchema, alerts: Iterable[Mapping[str, Any]]) -> bytes:
    """Validate ``alerts`` and serialize them as an Avro object container file."""
    alerts = list(alerts)
    for alert in alerts:
        schema.validate(alert)
    buffer = io.BytesIO()
    schema.schema.store_alerts(buffer, alerts)
    return buffer.getvalue()


def read_alerts(payload: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The writer schema and the records of an Avro container file."""
    import fastavro

    reader = fastavro.reader(io.BytesIO(payload))
    records = list(reader)
    return reader.writer_schema, records


class PackageAlertsConnections(
    pipe_base.PipelineTaskConnections, dimensions=_VISIT_DIMENSIONS
):
    """Associated sources, objects, history and images in; the Avro alert packet out."""

    dia_sources = cT.Input(
        name="dia_source",
        storageClass="ArrowAstropy",
        doc="Associated DIA sources.",
        dimensions=_VISIT_DIMENSIONS,
    )
    dia_objects = cT.Input(
        name="dia_object",
        storageClass="ArrowAstropy",
        doc="DIA objects touched.",
        dimensions=_VISIT_DIMENSIONS,
    )
    history = cT.Input(
        name="dia_source_history",
        storageClass="ArrowAstropy",
        doc="Earlier DIA sources of those objects.",
        dimensions=_VISIT_DIMENSIONS,
    )
    difference = cT.Input(
        name="difference_image",
        storageClass="CCDImage",
        doc="Difference image.",
        dimensions=_VISIT_DIMENSIONS,
    )
    science = cT.Input(
        name="visit_image",
        storageClass="CCDImage",
        doc="Science image.",
        dimensions=_VISIT_DIMENSIONS,
    )
    template = cT.Input(
        name="template_matched",
        storageClass="CCDImage",
        doc="Matched template.",
        dimensions=_VISIT_DIMENSIONS,
    )
    alerts = cT.Output(
        name="alert_packet",
        storageClass="AlertPacket",
        doc="Alerts of the visit-detector: an Avro container file (Rubin alert schema).",
        dimensions=_VISIT_DIMENSIONS,
    )


class PackageAlertsConfig(
    pipe_base.PipelineTaskConfig, pipelineConnections=PackageAlertsConnections
):
    """Schema version and cutout size."""

    schema_version = pex_config.Field[str](
        doc="Alert schema 'major.minor'; empty for the latest.", default=""
    )
    cutout_half_size = pex_config.Field[int](
        doc="Cutouts are 2*this+1 pixels square.", default=15
    )
    include_dipoles = pex_config.Field[bool](
        doc="Send alerts for dipole-flagged sources.", default=True
    )


class PackageAlertsTask(pipe_base.PipelineTask):
    """Build, validate and serialize one alert per associated DIA source."""

    ConfigClass = PackageAlertsConfig
    config: PackageAlertsConfig
    _DefaultName = "packageAlerts"

    def run(
        self,
        dia_sources: Table,
        dia_objects: Table,
        history: Table,
        difference: CCDData,
        science: CCDData,
        template: CCDData,
    ) -> pipe_base.Struct:
        """Return ``alerts``: the bytes of an Avro container file, one record per DIA source."""
        schema = AlertSchema(self.config.schema_version)
        objects = {int(row["diaObjectId"]): _row_dict(row) for row in dia_objects}
        previous: dict[int, list[dict[str, Any]]] = {}
        for row in history:
            previous.setdefault(int(row["diaObjectId"]), []).append(
                schema.record("diaSource", _row_dict(row))
            )
        half = self.config.cutout_half_size
        alerts = []
        for row in dia_sources:
            if (
                not self.config.include_dipoles
                and "isDipole" in row.colnames
                and bool(row["isDipole"])
            ):
                continue
            source = schema.record("diaSource", _row_dict(row))
            object_id = int(row["diaObjectId"])
            obj = objects.get(object_id)
            x, y = float(row["x"]), float(row["y"])
            alerts.append(
                {
                    "diaSourceId": source["diaSourceId"],
                    "observation_reason": None,
                    "target_name": None,
                    "diaSource": source,
                    "prvDiaSources": previous.get(object_id) or None,
                    "prvDiaForcedSources": None,
                    "diaObject": schema.record("diaObject", obj)
                    if obj is not None
                    else None,
                    "ssSource": None,
                    "mpc_orbits": None,
                    "cutoutDifference": cutout_fits(difference, x, y, half),
                    "cutoutScience": cutout_fits(science, x, y, half),
                    "cutoutTemplate": cutout_fits(template, x, y, half),
                }
            )
        payload = write_alerts(schema, alerts)
        self.log.info(
            "Packaged %d alerts (%s, %d bytes)", len(alerts), schema.name, len(payload)
        )
        return pipe_base.Struct(alerts=payload)


def _row_dict(row: Any) -> dict[str, Any]:
    """A table row as a name → value mapping."""
    return {name: row[name] for name in row.colnames}
