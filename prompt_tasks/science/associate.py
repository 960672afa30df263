"""Association with the APDB: DIA sources join known DIA objects or found new ones.

The DIA objects of the detector footprint are read from the APDB (lsst-dax-apdb); each source is
matched one-to-one to the nearest object within a radius (:func:`.matching.match_sky`); matched
objects get new positions and counts, unmatched sources found new objects; both are stored. A
visit-detector already in the APDB is read back, not stored twice (at-least-once execution). The
APDB is the ``apdb_config_url`` config field, set by the executor; tasks read no environment.
Written by hand: the per-object bookkeeping of the APDB schema, which is this pipeline's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
import pandas as pd
from astropy.coordinates import CartesianRepresentation, SkyCoord, UnitSphericalRepresentation
from astropy.table import Table
from astropy.time import Time
from lsst.sphgeom import Region

from prompt_tasks.science.matching import match_sky

__all__ = ["BANDS", "AssociateConfig", "AssociateConnections", "AssociateTask", "Association", "associate",
           "dia_source_id"]

_VISIT = ("instrument", "visit", "detector")
#: Bands with per-band columns in the APDB DiaObject table.
BANDS = ("u", "g", "r", "i", "z", "y")
#: Columns of the APDB DiaSource table this task fills.
_SOURCE_COLUMNS = ("diaSourceId", "diaObjectId", "visit", "detector", "midpointMjdTai", "ra", "dec", "x", "y",
                   "psfFlux", "psfFluxErr", "snr", "isNegative", "isDipole", "band", "psfNdata", "trailNdata",
                   "dipoleNdata", "bboxSize", "timeProcessedMjdTai")


def dia_source_id(visit: int, detector: int, index: np.ndarray | int) -> np.ndarray | int:
    """Unique 63-bit id of the ``index``-th DIA source of a visit-detector.

    ``(visit mod 10^11) × 2^24 + detector × 2^16 + index``: unique for ``day_obs × 10^5 + seq``
    visit ids within a century, detectors below 256 and 65,536 sources per detector-visit.
    """
    if not 0 <= detector < 256:
        raise ValueError(f"detector {detector} does not fit the DIA source id layout")
    return (visit % 10**11) * 2**24 + detector * 2**16 + np.asarray(index, dtype=np.int64)


class AssociateConnections(pipe_base.PipelineTaskConnections, dimensions=_VISIT):
    """DIA sources in; associated sources, touched objects and their history out."""

    dia_sources = cT.Input(name="dia_source_unstandardized", storageClass="ArrowAstropy", dimensions=_VISIT,
                           doc="DIA source candidates of the difference image.")
    associated = cT.Output(name="dia_source", storageClass="ArrowAstropy", dimensions=_VISIT,
                           doc="DIA sources as stored in the APDB, with their diaObjectId.")
    objects = cT.Output(name="dia_object", storageClass="ArrowAstropy", dimensions=_VISIT,
                        doc="New versions of the DIA objects this visit-detector touched (``isNew`` flags new ones).")
    history = cT.Output(name="dia_source_history", storageClass="ArrowAstropy", dimensions=_VISIT,
                        doc="Earlier DIA sources (from the APDB) of the objects touched.")


class AssociateConfig(pipe_base.PipelineTaskConfig, pipelineConnections=AssociateConnections):
    """APDB location and association radius."""

    apdb_config_url = pex_config.Field[str](doc="URI of the APDB config file (lsst-dax-apdb); set by the executor.",
                                            default="", optional=False)
    match_radius = pex_config.Field[float](doc="Association radius (arcsec).", default=1.0)
    skip_dipoles = pex_config.Field[bool](doc="Do not store DIA sources flagged as dipoles.", default=False)


@dataclass
class Association:
    """Result of :func:`associate`: the sources to store and the object versions to write."""

    sources: pd.DataFrame
    objects: pd.DataFrame
    n_matched: int
    n_new: int


def _mean_position(old: pd.DataFrame, n_old: np.ndarray, new: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Running mean of sky positions on the unit sphere (safe across RA = 0)."""
    def vectors(frame: pd.DataFrame) -> np.ndarray:
        return SkyCoord(frame["ra"].to_numpy(float), frame["dec"].to_numpy(float), unit="deg").cartesian.xyz.value

    mean = CartesianRepresentation(vectors(old) * n_old + vectors(new)).represent_as(UnitSphericalRepresentation)
    return np.asarray(mean.lon.deg) % 360.0, np.asarray(mean.lat.deg)


def associate(sources: pd.DataFrame, objects: pd.DataFrame, band: str, mjd: float, radius_arcsec: float) -> Association:
    """Match ``sources`` (``diaSourceId``, ``ra``, ``dec``, ``psfFlux``) to known DiaObject rows.

    A matched object gets a new version with the running mean position, one more source and
    updated ``band`` flux statistics; an unmatched source founds an object with its own id.
    """
    known = objects if len(objects) else pd.DataFrame({"ra": [], "dec": []})
    match = match_sky(sources["ra"].to_numpy(), sources["dec"].to_numpy(), known["ra"].to_numpy(),
                      known["dec"].to_numpy(), radius_arcsec)
    sources, object_ids = sources.copy(), sources["diaSourceId"].to_numpy(dtype=np.int64).copy()
    object_ids[match.first] = known.get("diaObjectId", pd.Series([], dtype=np.int64)).to_numpy(np.int64)[match.second]
    sources["diaObjectId"] = object_ids
    matched = np.isin(np.arange(len(sources)), match.first)
    flux_col, ndata_col = f"{band}_psfFluxMean", f"{band}_psfFluxNdata"
    rows = []
    if len(match):
        updated = objects.iloc[match.second].reset_index(drop=True).copy()
        new = sources.iloc[match.first].reset_index(drop=True)
        n_old = updated["nDiaSources"].fillna(0).to_numpy(dtype=np.int64)
        updated["ra"], updated["dec"] = _mean_position(updated, n_old, new)
        updated["nDiaSources"] = n_old + 1
        zeros = pd.Series(np.zeros(len(updated)))
        n_band = updated.get(ndata_col, zeros).fillna(0).to_numpy(dtype=np.float64)
        mean_old = updated.get(flux_col, zeros).astype("float64").fillna(0).to_numpy()
        updated[flux_col] = (mean_old * n_band + new["psfFlux"].to_numpy()) / (n_band + 1)
        updated[ndata_col] = (n_band + 1).astype(np.int64)
        updated["lastDiaSourceMjdTai"] = updated["validityStartMjdTai"] = mjd
        updated["isNew"] = False
        rows.append(updated)
    fresh = sources[~matched]
    if len(fresh):
        rows.append(pd.DataFrame({
            "diaObjectId": fresh["diaSourceId"].to_numpy(dtype=np.int64), "ra": fresh["ra"].to_numpy(),
            "dec": fresh["dec"].to_numpy(), "nDiaSources": np.ones(len(fresh), dtype=np.int64),
            "validityStartMjdTai": mjd, "firstDiaSourceMjdTai": mjd, "lastDiaSourceMjdTai": mjd,
            flux_col: fresh["psfFlux"].to_numpy(), "isNew": True,
            **{f"{b}_psfFluxNdata": np.int64(b == band) for b in BANDS},
        }))
    empty = pd.DataFrame({"diaObjectId": pd.Series([], dtype=np.int64), "isNew": pd.Series([], dtype=bool)})
    new_objects = pd.concat(rows, ignore_index=True) if rows else empty
    for column in (f"{b}_psfFluxNdata" for b in BANDS):
        if column in new_objects:
            new_objects[column] = new_objects[column].fillna(0).astype(np.int64)
    return Association(sources=sources, objects=new_objects, n_matched=len(match), n_new=len(fresh))


class AssociateTask(pipe_base.PipelineTask):
    """Associate DIA sources with the APDB's DIA objects and store both."""

    ConfigClass = AssociateConfig
    config: AssociateConfig
    _DefaultName = "associate"

    def runQuantum(self, butlerQC: pipe_base.QuantumContext, inputRefs: pipe_base.InputQuantizedConnection,
                   outputRefs: pipe_base.OutputQuantizedConnection) -> None:
        data_id = butlerQC.quantum.dataId
        timespan = data_id.records["visit"].timespan
        if data_id.region is None or timespan is None:
            raise pipe_base.NoWorkFound("The visit-detector has no region or no time span.")
        outputs = self.run(butlerQC.get(inputRefs.dia_sources), region=data_id.region, visit_time=timespan.begin,
                           visit=int(data_id["visit"]), detector=int(data_id["detector"]), band=str(data_id["band"]))
        butlerQC.put(outputs, outputRefs)

    def run(self, dia_sources: Table, *, region: Region, visit_time: Time, visit: int, detector: int,
            band: str) -> pipe_base.Struct:
        """Return ``associated``, ``objects`` and ``history`` tables; store into the APDB."""
        from lsst.dax.apdb import Apdb

        if not self.config.apdb_config_url:
            raise pipe_base.InvalidQuantumError("associate.apdb_config_url is not set")
        apdb = Apdb.from_uri(self.config.apdb_config_url)
        mjd = float(visit_time.tai.mjd)
        known = apdb.getDiaObjects(region)
        if apdb.containsVisitDetector(visit, detector):
            self.log.info("Visit %d detector %d is already in the APDB: reading it back", visit, detector)
            stored = apdb.getDiaSources(region, None, visit_time)
            stored = pd.DataFrame() if stored is None else stored[
                (stored["visit"] == visit) & (stored["detector"] == detector)]
            ids = set(stored["diaObjectId"]) if len(stored) else set()
            touched = known[known["diaObjectId"].isin(ids)].copy()
            touched["isNew"] = touched["nDiaSources"].fillna(0).to_numpy() <= 1
            history = _history(apdb, region, sorted(ids), visit_time, exclude_visit=visit)
            return _outputs(stored, touched, history)
        sources = self._standardize(dia_sources, visit, detector, band, mjd)
        result = associate(sources, known, band, mjd, self.config.match_radius)
        earlier = sorted(set(result.objects["diaObjectId"]) - set(sources["diaSourceId"]))
        history = _history(apdb, region, earlier, visit_time)
        if len(result.sources):  # no DIA sources: nothing to store (the APDB refuses empty objects)
            apdb.store(visit_time, result.objects.drop(columns=["isNew"]), result.sources[list(_SOURCE_COLUMNS)])
        self.log.info("Associate: %d sources, %d matched, %d new", len(sources), result.n_matched, result.n_new)
        return _outputs(result.sources[list(_SOURCE_COLUMNS)], result.objects, history)

    def _standardize(self, table: Table, visit: int, detector: int, band: str, mjd: float) -> pd.DataFrame:
        """APDB DiaSource rows (the columns of ``_SOURCE_COLUMNS``) from the detection table."""
        if self.config.skip_dipoles and len(table):
            table = table[~np.asarray(table["isDipole"], bool)]
        n = len(table)

        def column(name: str, dtype: Any) -> np.ndarray:
            return np.asarray(table[name], dtype=dtype)

        return pd.DataFrame({
            "diaSourceId": np.asarray(dia_source_id(visit, detector, np.arange(n)), np.int64),
            "diaObjectId": np.zeros(n, np.int64), "visit": np.full(n, visit, np.int64),
            "detector": np.full(n, detector, np.int16), "midpointMjdTai": np.full(n, mjd),
            "ra": column("ra", np.float64), "dec": column("dec", np.float64),
            "x": column("x", np.float32), "y": column("y", np.float32),
            "psfFlux": column("psfFlux", np.float32), "psfFluxErr": column("psfFluxErr", np.float32),
            "snr": column("snr", np.float32), "isNegative": column("isNegative", bool),
            "isDipole": column("isDipole", bool), "band": np.full(n, band, dtype=object),
            "psfNdata": np.zeros(n, np.int32), "trailNdata": np.zeros(n, np.int32),
            "dipoleNdata": np.zeros(n, np.int32), "bboxSize": np.full(n, 15, np.int32),
            "timeProcessedMjdTai": np.full(n, float(Time.now().tai.mjd)),
        })


def _history(apdb: Any, region: Region, object_ids: list[int], visit_time: Time,
             exclude_visit: int | None = None) -> pd.DataFrame:
    """Earlier DIA sources of ``object_ids`` (an empty frame with the APDB columns if none)."""
    frame = apdb.getDiaSources(region, object_ids, visit_time)
    if frame is None:
        return pd.DataFrame({c: [] for c in _SOURCE_COLUMNS})
    return frame[frame["visit"] != exclude_visit] if exclude_visit is not None and len(frame) else frame


def _outputs(sources: pd.DataFrame, objects: pd.DataFrame, history: pd.DataFrame) -> pipe_base.Struct:
    return pipe_base.Struct(associated=_to_table(sources), objects=_to_table(objects), history=_to_table(history))


def _to_table(frame: pd.DataFrame) -> Table:
    """An astropy table of ``frame`` with nullable columns made plain (NaN / -1 / False / "")."""
    table = Table()
    for name, series in frame.items():
        dtype = series.dtype
        if isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind in "iub":
            boolean = dtype.kind == "b"  # integers not via float64: ids > 2**53
            table[name] = series.fillna(False if boolean else -1).to_numpy(dtype=bool if boolean else np.int64)
        elif dtype.kind == "f":
            table[name] = series.to_numpy(dtype=np.float64 if dtype.itemsize == 8 else np.float32, na_value=math.nan)
        elif dtype.kind == "O" or str(dtype) in ("string", "str") or str(dtype).startswith("str"):
            table[name] = np.asarray(series.astype("string").fillna("").to_numpy(dtype=object), dtype=str)
        else:
            table[name] = series.astype("int64").to_numpy() if dtype.kind == "M" else series.to_numpy()
    return table
