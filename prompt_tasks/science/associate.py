"""Association with the APDB: DIA sources join known DIA objects or found new ones.

The DIA objects of the detector footprint are read from the APDB (lsst-dax-apdb), each DIA
source is matched to the nearest object within a radius (one-to-one, closest first);
matched objects get updated positions and counts, unmatched sources found new objects; the
sources and new object versions are stored. A visit-detector already present in the APDB
is not stored twice: its earlier association is read back (at-least-once execution).

The APDB is named by the ``apdb_config_url`` config field, set by whoever runs the pipeline
(``-c associate:apdb_config_url=...``); tasks read no environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
import pandas as pd
from astropy.table import Table
from astropy.time import Time
from lsst.sphgeom import Region

from prompt_tasks.science.matching import match_sky, unit_vectors

__all__ = [
    "BANDS",
    "AssociateConfig",
    "AssociateConnections",
    "AssociateTask",
    "Association",
    "associate",
    "dia_source_id",
]

_VISIT_DIMENSIONS = ("instrument", "visit", "detector")
#: Bands with per-band columns in the APDB DiaObject table.
BANDS = ("u", "g", "r", "i", "z", "y")

#: Columns of the APDB DiaSource table this task fills.
_SOURCE_COLUMNS = (
    "diaSourceId",
    "diaObjectId",
    "visit",
    "detector",
    "midpointMjdTai",
    "ra",
    "dec",
    "x",
    "y",
    "psfFlux",
    "psfFluxErr",
    "snr",
    "isNegative",
    "isDipole",
    "band",
    "psfNdata",
    "trailNdata",
    "dipoleNdata",
    "bboxSize",
    "timeProcessedMjdTai",
)


def dia_source_id(
    visit: int, detector: int, index: np.ndarray | int
) -> np.ndarray | int:
    """Unique 63-bit DIA source id of the ``index``-th source of a visit-detector.

    ``(visit mod 10^11) × 2^24 + detector × 2^16 + index``: unique for visit ids below 10^11
    (a century of SimCam/Rubin-style ``day_obs × 10^5 + seq`` ids modulo that),
    detectors below 256 and 65,536 sources per detector-visit.
    """
    if not 0 <= detector < 256:
        raise ValueError(f"detector {detector} does not fit the DIA source id layout")
    return (
        (visit % 10**11) * 2**24 + detector * 2**16 + np.asarray(index, dtype=np.int64)
    )


class AssociateConnections(
    pipe_base.PipelineTaskConnections, dimensions=_VISIT_DIMENSIONS
):
    """DIA sources in; associated sources, touched objects and their history out."""

    dia_sources = cT.Input(
        name="dia_source_unstandardized",
        storageClass="ArrowAstropy",
        doc="DIA source candidates of the difference image.",
        dimensions=_VISIT_DIMENSIONS,
    )
    associated = cT.Output(
        name="dia_source",
        storageClass="ArrowAstropy",
        doc="DIA sources as stored in the APDB, with their diaObjectId.",
        dimensions=_VISIT_DIMENSIONS,
    )
    objects = cT.Output(
        name="dia_object",
        storageClass="ArrowAstropy",
        doc="New versions of the DIA objects this visit-detector touched (``isNew`` flags new ones).",
        dimensions=_VISIT_DIMENSIONS,
    )
    history = cT.Output(
        name="dia_source_history",
        storageClass="ArrowAstropy",
        doc="Earlier DIA sources (from the APDB) of the objects touched.",
        dimensions=_VISIT_DIMENSIONS,
    )


class AssociateConfig(
    pipe_base.PipelineTaskConfig, pipelineConnections=AssociateConnections
):
    """APDB location and association radius."""

    apdb_config_url = pex_config.Field[str](
        doc="URI of the APDB config file (lsst-dax-apdb); set by the executor.",
        default="",
        optional=False,
    )
    match_radius = pex_config.Field[float](
        doc="Association radius (arcsec).", default=1.0
    )
    skip_dipoles = pex_config.Field[bool](
        doc="Do not store DIA sources flagged as dipoles.", default=False
    )


@dataclass
class Association:
    """Result of :func:`associate`: the sources to store and the object versions to write."""

    sources: pd.DataFrame
    objects: pd.DataFrame
    n_matched: int
    n_new: int


def _mean_position(
    ra_old: np.ndarray,
    dec_old: np.ndarray,
    n_old: np.ndarray,
    ra_new: np.ndarray,
    dec_new: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Running mean of sky positions (on the unit sphere, safe across RA = 0)."""
    v = unit_vectors(ra_old, dec_old) * n_old[:, None] + unit_vectors(ra_new, dec_new)
    v /= np.linalg.norm(v, axis=1)[:, None]
    ra = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))
    return ra, dec


def associate(
    sources: pd.DataFrame,
    objects: pd.DataFrame,
    band: str,
    mjd: float,
    radius_arcsec: float,
) -> Association:
    """Match ``sources`` to known ``objects`` and build the object versions to store.

    ``sources`` need ``diaSourceId``, ``ra``, ``dec``, ``psfFlux``; ``objects`` are DiaObject
    rows as the APDB returns them. A matched object gets a new version with the running mean
    position, one more source, and updated per-band flux statistics; an unmatched source founds
    an object whose id is its own diaSourceId.
    """
    match = (
        match_sky(
            sources["ra"].to_numpy(),
            sources["dec"].to_numpy(),
            objects["ra"].to_numpy(),
            objects["dec"].to_numpy(),
            radius_arcsec,
        )
        if len(objects)
        else match_sky(
            np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), radius_arcsec
        )
    )
    sources = sources.copy()
    object_ids = sources["diaSourceId"].to_numpy(dtype=np.int64).copy()
    if len(match):
        object_ids[match.first] = objects["diaObjectId"].to_numpy(dtype=np.int64)[
            match.second
        ]
    sources["diaObjectId"] = object_ids
    matched = np.zeros(len(sources), dtype=bool)
    matched[match.first] = True
    flux_col, ndata_col = f"{band}_psfFluxMean", f"{band}_psfFluxNdata"
    rows = []
    if len(match):
        old = objects.iloc[match.second].reset_index(drop=True)
        new_src = sources.iloc[match.first].reset_index(drop=True)
        n_old = old["nDiaSources"].fillna(0).to_numpy(dtype=np.int64)
        ra, dec = _mean_position(
            old["ra"].to_numpy(),
            old["dec"].to_numpy(),
            n_old,
            new_src["ra"].to_numpy(),
            new_src["dec"].to_numpy(),
        )
        updated = old.copy()
        updated["ra"] = ra
        updated["dec"] = dec
        updated["nDiaSources"] = (n_old + 1).astype(np.int64)
        n_band = (
            updated[ndata_col].fillna(0).to_numpy(dtype=np.float64)
            if ndata_col in updated
            else np.zeros(len(updated))
        )
        mean_old = (
            updated[flux_col].astype("float64").fillna(0).to_numpy()
            if flux_col in updated
            else np.zeros(len(updated))
        )
        updated[flux_col] = (mean_old * n_band + new_src["psfFlux"].to_numpy()) / (
            n_band + 1
        )
        updated[ndata_col] = (n_band + 1).astype(np.int64)
        updated["lastDiaSourceMjdTai"] = mjd
        updated["validityStartMjdTai"] = mjd
        updated["isNew"] = False
        rows.append(updated)
    fresh = sources[~matched]
    if len(fresh):
        born = pd.DataFrame(
            {
                "diaObjectId": fresh["diaSourceId"].to_numpy(dtype=np.int64),
                "ra": fresh["ra"].to_numpy(),
                "dec": fresh["dec"].to_numpy(),
                "nDiaSources": np.ones(len(fresh), dtype=np.int64),
                "validityStartMjdTai": mjd,
                "firstDiaSourceMjdTai": mjd,
                "lastDiaSourceMjdTai": mjd,
                flux_col: fresh["psfFlux"].to_numpy(),
                "isNew": True,
            }
        )
        for b in BANDS:
            born[f"{b}_psfFluxNdata"] = np.int64(1 if b == band else 0)
        rows.append(born)
    new_objects = (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(
            {"diaObjectId": pd.Series([], dtype=np.int64), "isNew": pd.Series([], dtype=bool)}
        )
    )
    for b in BANDS:
        column = f"{b}_psfFluxNdata"
        if column in new_objects:
            new_objects[column] = new_objects[column].fillna(0).astype(np.int64)
    return Association(
        sources=sources, objects=new_objects, n_matched=len(match), n_new=len(fresh)
    )


class AssociateTask(pipe_base.PipelineTask):
    """Associate DIA sources with the APDB's DIA objects and store both."""

    ConfigClass = AssociateConfig
    config: AssociateConfig
    _DefaultName = "associate"

    def runQuantum(
        self,
        butlerQC: pipe_base.QuantumContext,
        inputRefs: pipe_base.InputQuantizedConnection,
        outputRefs: pipe_base.OutputQuantizedConnection,
    ) -> None:
        data_id = butlerQC.quantum.dataId
        region = data_id.region
        timespan = data_id.records["visit"].timespan
        if region is None or timespan is None:
            raise pipe_base.NoWorkFound(
                "The visit-detector has no region or no time span."
            )
        outputs = self.run(
            butlerQC.get(inputRefs.dia_sources),
            region=region,
            visit_time=timespan.begin,
            visit=int(data_id["visit"]),
            detector=int(data_id["detector"]),
            band=str(data_id["band"]),
        )
        butlerQC.put(outputs, outputRefs)

    def run(
        self,
        dia_sources: Table,
        *,
        region: Region,
        visit_time: Time,
        visit: int,
        detector: int,
        band: str,
    ) -> pipe_base.Struct:
        """Return ``associated``, ``objects`` and ``history`` tables; store into the APDB."""
        from lsst.dax.apdb import Apdb

        if not self.config.apdb_config_url:
            raise pipe_base.InvalidQuantumError("associate.apdb_config_url is not set")
        apdb = Apdb.from_uri(self.config.apdb_config_url)
        mjd = float(visit_time.tai.mjd)
        known = apdb.getDiaObjects(region)
        if apdb.containsVisitDetector(visit, detector):
            self.log.info(
                "Visit %d detector %d is already in the APDB: reading it back",
                visit,
                detector,
            )
            stored = apdb.getDiaSources(region, None, visit_time)
            stored = (
                stored[(stored["visit"] == visit) & (stored["detector"] == detector)]
                if stored is not None
                else pd.DataFrame()
            )
            ids = set(stored["diaObjectId"]) if len(stored) else set()
            touched = known[known["diaObjectId"].isin(ids)].copy()
            touched["isNew"] = touched["nDiaSources"].fillna(0).to_numpy() <= 1
            history = self._history(
                apdb, region, sorted(ids), visit_time, exclude_visit=visit
            )
            return self._outputs(stored, touched, history)
        sources = self._standardize(dia_sources, visit, detector, band, mjd)
        result = associate(sources, known, band, mjd, self.config.match_radius)
        history = self._history(
            apdb,
            region,
            sorted(set(result.objects["diaObjectId"]) - set(sources["diaSourceId"])),
            visit_time,
        )
        to_store = result.objects.drop(columns=["isNew"])
        apdb.store(visit_time, to_store, result.sources[list(_SOURCE_COLUMNS)])
        self.log.info(
            "Associate: %d DIA sources, %d matched to %d known objects, %d new objects",
            len(sources),
            result.n_matched,
            len(known),
            result.n_new,
        )
        return self._outputs(
            result.sources[list(_SOURCE_COLUMNS)], result.objects, history
        )

    def _standardize(
        self, table: Table, visit: int, detector: int, band: str, mjd: float
    ) -> pd.DataFrame:
        """APDB DiaSource rows (the columns of ``_SOURCE_COLUMNS``) from the detection table."""
        if self.config.skip_dipoles and len(table):
            table = table[~np.asarray(table["isDipole"], dtype=bool)]
        n = len(table)
        now = float(Time.now().tai.mjd)
        return pd.DataFrame(
            {
                "diaSourceId": np.asarray(
                    dia_source_id(visit, detector, np.arange(n)), dtype=np.int64
                ),
                "diaObjectId": np.zeros(n, dtype=np.int64),
                "visit": np.full(n, visit, dtype=np.int64),
                "detector": np.full(n, detector, dtype=np.int16),
                "midpointMjdTai": np.full(n, mjd),
                "ra": np.asarray(table["ra"], dtype=np.float64),
                "dec": np.asarray(table["dec"], dtype=np.float64),
                "x": np.asarray(table["x"], dtype=np.float32),
                "y": np.asarray(table["y"], dtype=np.float32),
                "psfFlux": np.asarray(table["psfFlux"], dtype=np.float32),
                "psfFluxErr": np.asarray(table["psfFluxErr"], dtype=np.float32),
                "snr": np.asarray(table["snr"], dtype=np.float32),
                "isNegative": np.asarray(table["isNegative"], dtype=bool),
                "isDipole": np.asarray(table["isDipole"], dtype=bool),
                "band": np.full(n, band, dtype=object),
                "psfNdata": np.zeros(n, dtype=np.int32),
                "trailNdata": np.zeros(n, dtype=np.int32),
                "dipoleNdata": np.zeros(n, dtype=np.int32),
                "bboxSize": np.full(n, 15, dtype=np.int32),
                "timeProcessedMjdTai": np.full(n, now),
            }
        )

    @staticmethod
    def _history(
        apdb: object,
        region: Region,
        object_ids: list[int],
        visit_time: Time,
        exclude_visit: int | None = None,
    ) -> pd.DataFrame:
        """Earlier DIA sources of ``object_ids`` (empty frame with the APDB columns if none)."""
        frame = apdb.getDiaSources(region, object_ids, visit_time)  # type: ignore[attr-defined]
        if frame is None:
            return pd.DataFrame({c: [] for c in _SOURCE_COLUMNS})
        if exclude_visit is not None and len(frame):
            frame = frame[frame["visit"] != exclude_visit]
        return frame

    @staticmethod
    def _outputs(
        sources: pd.DataFrame, objects: pd.DataFrame, history: pd.DataFrame
    ) -> pipe_base.Struct:
        return pipe_base.Struct(
            associated=_to_table(sources),
            objects=_to_table(objects),
            history=_to_table(history),
        )


def _to_table(frame: pd.DataFrame) -> Table:
    """An astropy table of ``frame`` with nullable columns made plain (NaN / -1 / False)."""
    table = Table()
    for name in frame.columns:
        series = frame[name]
        dtype = series.dtype
        if isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind in "iu":
            values = series.fillna(-1).to_numpy(
                dtype=np.int64
            )  # via float64 would lose ids > 2**53
        elif isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind == "b":
            values = series.astype("boolean").fillna(False).to_numpy(dtype=bool)
        elif dtype.kind == "f":
            values = series.to_numpy(
                dtype=np.float64 if dtype.itemsize == 8 else np.float32,
                na_value=math.nan,
            )
        elif (
            dtype.kind == "O" or str(dtype).startswith("str") or str(dtype) == "string"
        ):
            values = np.asarray(
                series.astype("string").fillna("").to_numpy(dtype=object), dtype=str
            )
        elif dtype.kind == "M":
            values = np.asarray(series.astype("int64").to_numpy())
        else:
            values = series.to_numpy()
        table[name] = values
    return table
