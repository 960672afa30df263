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
from astropy.nddata import CCDData, Cutout2D
from astropy.table import Table

from prompt_tasks.science.imaging import wcs_of

__all__ = ["AlertSchema", "PackageAlertsConfig", "PackageAlertsConnections", "PackageAlertsTask", "cutout_fits",
           "read_alerts", "write_alerts"]

_VISIT = ("instrument", "visit", "detector")


class AlertSchema:
    """The Rubin alert schema (lsst-alert-packet) of ``version`` (``"major.minor"``, empty for the
    latest) and a builder of records that follow it."""

    def __init__(self, version: str = "") -> None:
        from lsst.alert.packet import Schema, get_schema_uri

        self.schema = Schema.from_uri(get_schema_uri(*(int(p) for p in version.split(".")))) if version else (
            Schema.from_uri())
        self.definition: dict[str, Any] = self.schema.definition
        self.records: dict[str, dict[str, Any]] = {}
        self._collect(self.definition)

    @property
    def name(self) -> str:
        """Full name of the alert record type (e.g. ``lsst.v11_1.alert``)."""
        return str(self.definition["name"])

    def _collect(self, node: Any) -> None:
        """Index every named record type of the schema by its short name."""
        children = node if isinstance(node, list) else []
        if isinstance(node, dict) and node.get("type") == "record":
            self.records[str(node["name"]).rsplit(".", 1)[-1]] = node
            children = [field["type"] for field in node["fields"]]
        elif isinstance(node, dict) and node.get("type") == "array":
            children = [node["items"]]
        for child in children:
            self._collect(child)

    def record(self, record_name: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """A record of type ``record_name`` with every schema field, taken from ``values``.

        Missing or non-finite values become null where the schema allows it; a required field
        without a value raises `ValueError`.
        """
        out: dict[str, Any] = {}
        for field in self.records[record_name]["fields"]:
            name, ftype = field["name"], field["type"]
            nullable = isinstance(ftype, list) and "null" in ftype
            base = next((t for t in ftype if t != "null"), "null") if isinstance(ftype, list) else ftype
            value = _python_value(values.get(name), base)
            if value is None and not nullable:
                if field.get("default") is None:
                    raise ValueError(f"{record_name}.{name} is required by the alert schema")
                value = field["default"]
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


_CONVERT = {"float": float, "double": float, "int": int, "long": int, "boolean": bool, "string": str, "bytes": bytes}


def _python_value(value: Any, avro_type: Any) -> Any:
    """``value`` as the plain Python type Avro wants, or None for missing or non-finite."""
    if value is None or avro_type == "null" or isinstance(avro_type, dict):
        return None
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not math.isfinite(value) and avro_type in ("float", "double", "int", "long"):
        return None
    return _CONVERT[avro_type](value) if avro_type in _CONVERT else value


def cutout_fits(image: CCDData | None, x: float, y: float, half: int) -> bytes | None:
    """A FITS cutout (2·half+1 pixels square, NaN off the image, WCS shifted) of ``image`` around (x, y)."""
    if image is None:
        return None
    wcs = wcs_of(image.meta)
    cut = Cutout2D(np.asarray(image.data, np.float32), (round(x), round(y)), 2 * half + 1, wcs=wcs,
                   mode="partial", fill_value=np.nan)
    header = cut.wcs.to_header() if wcs is not None else fits.Header()
    header["BUNIT"] = str(image.unit) if image.unit is not None else "electron"
    buffer = io.BytesIO()
    fits.PrimaryHDU(cut.data, header=header).writeto(buffer)
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
    return reader.writer_schema, list(reader)


class PackageAlertsConnections(pipe_base.PipelineTaskConnections, dimensions=_VISIT):
    """Associated sources, objects, history and images in; the Avro alert packet out."""

    dia_sources = cT.Input(name="dia_source", storageClass="ArrowAstropy", doc="Associated DIA sources.",
                           dimensions=_VISIT)
    dia_objects = cT.Input(name="dia_object", storageClass="ArrowAstropy", doc="DIA objects touched.",
                           dimensions=_VISIT)
    history = cT.Input(name="dia_source_history", storageClass="ArrowAstropy",
                       doc="Earlier DIA sources of those objects.", dimensions=_VISIT)
    difference = cT.Input(name="difference_image", storageClass="CCDImage", doc="Difference image.", dimensions=_VISIT)
    science = cT.Input(name="visit_image", storageClass="CCDImage", doc="Science image.", dimensions=_VISIT)
    template = cT.Input(name="template_matched", storageClass="CCDImage", doc="Matched template.", dimensions=_VISIT)
    alerts = cT.Output(name="alert_packet", storageClass="AlertPacket", dimensions=_VISIT,
                       doc="Alerts of the visit-detector: an Avro container file (Rubin alert schema).")


class PackageAlertsConfig(pipe_base.PipelineTaskConfig, pipelineConnections=PackageAlertsConnections):
    """Schema version and cutout size."""

    schema_version = pex_config.Field[str](doc="Alert schema 'major.minor'; empty for the latest.", default="")
    cutout_half_size = pex_config.Field[int](doc="Cutouts are 2*this+1 pixels square.", default=15)
    include_dipoles = pex_config.Field[bool](doc="Send alerts for dipole-flagged sources.", default=True)


class PackageAlertsTask(pipe_base.PipelineTask):
    """Build, validate and serialize one alert per associated DIA source."""

    ConfigClass = PackageAlertsConfig
    config: PackageAlertsConfig
    _DefaultName = "packageAlerts"

    def run(self, dia_sources: Table, dia_objects: Table, history: Table, difference: CCDData,
            science: CCDData, template: CCDData) -> pipe_base.Struct:
        """Return ``alerts``: the bytes of an Avro container file, one record per DIA source."""
        schema = AlertSchema(self.config.schema_version)
        objects = {int(row["diaObjectId"]): _row_dict(row) for row in dia_objects}
        previous: dict[int, list[dict[str, Any]]] = {}
        for row in history:
            previous.setdefault(int(row["diaObjectId"]), []).append(schema.record("diaSource", _row_dict(row)))
        half, alerts = self.config.cutout_half_size, []
        for row in dia_sources:
            if not self.config.include_dipoles and "isDipole" in row.colnames and bool(row["isDipole"]):
                continue
            source = schema.record("diaSource", _row_dict(row))
            object_id = int(row["diaObjectId"])
            obj = objects.get(object_id)
            x, y = float(row["x"]), float(row["y"])
            alerts.append({
                "diaSourceId": source["diaSourceId"], "observation_reason": None, "target_name": None,
                "diaSource": source, "prvDiaSources": previous.get(object_id) or None, "prvDiaForcedSources": None,
                "diaObject": None if obj is None else schema.record("diaObject", obj),
                "ssSource": None, "mpc_orbits": None,
                "cutoutDifference": cutout_fits(difference, x, y, half),
                "cutoutScience": cutout_fits(science, x, y, half),
                "cutoutTemplate": cutout_fits(template, x, y, half),
            })
        payload = write_alerts(schema, alerts)
        self.log.info("Packaged %d alerts (%s, %d bytes)", len(alerts), schema.name, len(payload))
        return pipe_base.Struct(alerts=payload)


def _row_dict(row: Any) -> dict[str, Any]:
    """A table row as a name → value mapping."""
    return {name: row[name] for name in row.colnames}
