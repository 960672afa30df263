"""DIA source detection: positive and negative point sources on the difference image.

The difference is matched-filtered with its PSF; peaks above the threshold (in units of the
measured noise of the filtered difference, so resampling and convolution noise correlations are
accounted for) become DIA sources with PSF fluxes, sky positions and a sign flag.
"""

from __future__ import annotations

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.nddata import CCDData
from astropy.table import Table, vstack

from benchmarks.science_baseline.imaging import detect_peaks, peaks_table, wcs_of

__all__ = [
    "NJY_ZERO_POINT",
    "DetectDiaSourcesConfig",
    "DetectDiaSourcesConnections",
    "DetectDiaSourcesTask",
    "detect_dia_sources",
    "electrons_to_njy",
]

_VISIT_DIMENSIONS = ("instrument", "visit", "detector")


class DetectDiaSourcesConnections(
    pipe_base.PipelineTaskConnections, dimensions=_VISIT_DIMENSIONS
):
    """Difference image in, DIA source candidates out."""

    difference = cT.Input(
        name="difference_image",
        storageClass="CCDImage",
        doc="Science minus matched template.",
        dimensions=_VISIT_DIMENSIONS,
    )
    dia_sources = cT.Output(
        name="dia_source_unstandardized",
        storageClass="ArrowAstropy",
        doc="Positive and negative detections on the difference image.",
        dimensions=_VISIT_DIMENSIONS,
    )


class DetectDiaSourcesConfig(
    pipe_base.PipelineTaskConfig, pipelineConnections=DetectDiaSourcesConnections
):
    """Detection threshold and exclusions."""

    threshold = pex_config.Field[float](
        doc="Detection threshold (sigma of the filtered image).", default=5.0
    )
    edge = pex_config.Field[int](
        doc="Ignore peaks this close to the image edge (pixels).", default=8
    )
    use_variance = pex_config.Field[bool](
        doc="Weight the noise by the variance plane (photon noise of bright stars).",
        default=True,
    )
    detect_negative = pex_config.Field[bool](
        doc="Also detect negative sources.", default=True
    )
    dipole_radius = pex_config.Field[float](
        doc="A positive and a negative peak closer than this many PSF sigmas are flagged as a dipole.",
        default=4.0,
    )


#: AB magnitude of 1 nJy.
NJY_ZERO_POINT = 31.4


def electrons_to_njy(zero_point: float) -> float:
    """nJy per electron for an image whose 1 e- has magnitude ``zero_point`` (1 if unknown)."""
    if not 0 < zero_point < 50:
        return 1.0
    return float(10 ** (-0.4 * (zero_point - NJY_ZERO_POINT)))


def detect_dia_sources(
    difference: np.ndarray,
    psf_sigma: float,
    threshold: float,
    mask: np.ndarray | None = None,
    edge: int = 8,
    negative: bool = True,
    dipole_radius: float = 4.0,
    variance: np.ndarray | None = None,
) -> Table:
    """DIA sources of a difference image (pixel and flux columns; no sky coordinates)."""
    tables = []
    signs = [False, True] if negative else [False]
    for is_negative in signs:
        peaks = detect_peaks(
            difference,
            psf_sigma,
            threshold,
            mask=mask,
            negative=is_negative,
            edge=edge,
            variance=variance,
        )
        table = peaks_table(peaks, None)
        table["isNegative"] = np.full(len(table), is_negative)
        tables.append(table)
    sources = (
        vstack(tables, metadata_conflicts="silent") if len(tables) > 1 else tables[0]
    )
    sources["isDipole"] = np.zeros(len(sources), dtype=bool)
    if negative and len(sources):
        from scipy.spatial import cKDTree

        pos = np.flatnonzero(~sources["isNegative"])
        neg = np.flatnonzero(sources["isNegative"])
        if len(pos) and len(neg):
            tree = cKDTree(np.column_stack([sources["x"][neg], sources["y"][neg]]))
            dist, nearest = tree.query(
                np.column_stack([sources["x"][pos], sources["y"][pos]])
            )
            close = dist < dipole_radius * psf_sigma
            sources["isDipole"][pos[close]] = True
            sources["isDipole"][neg[nearest[close]]] = True
    sources["id"] = np.arange(len(sources), dtype=np.int64)
    return sources


class DetectDiaSourcesTask(pipe_base.PipelineTask):
    """Detect DIA sources (both signs) on the difference image."""

    ConfigClass = DetectDiaSourcesConfig
    config: DetectDiaSourcesConfig
    _DefaultName = "detectDiaSources"

    def run(self, difference: CCDData) -> pipe_base.Struct:
        """Return ``dia_sources``: a table with x, y, ra, dec, psfFlux, psfFluxErr, snr, flags."""
        psf_sigma = float(difference.meta.get("PSFSIG", 1.7))
        mask = (
            None if difference.mask is None else np.asarray(difference.mask, dtype=bool)
        )
        variance = None
        if self.config.use_variance and difference.uncertainty is not None:
            variance = np.asarray(difference.uncertainty.array, dtype=np.float64) ** 2
        sources = detect_dia_sources(
            np.asarray(difference.data, dtype=np.float64),
            psf_sigma,
            self.config.threshold,
            mask=mask,
            edge=self.config.edge,
            negative=self.config.detect_negative,
            dipole_radius=self.config.dipole_radius,
            variance=variance,
        )
        wcs = wcs_of(difference.meta)
        if wcs is not None and len(sources):
            ra, dec = wcs.all_pix2world(sources["x"], sources["y"], 0)
            sources["ra"] = np.asarray(ra, dtype=np.float64)
            sources["dec"] = np.asarray(dec, dtype=np.float64)
        sources.meta["psf_sigma"] = psf_sigma
        to_njy = electrons_to_njy(float(difference.meta.get("MAGZERO", -99.0)))
        sources["psfFluxElectrons"] = sources["psfFlux"]
        sources["psfFlux"] = sources["psfFlux"] * to_njy
        sources["psfFluxErr"] = sources["psfFluxErr"] * to_njy
        sources.meta["flux_unit"] = "nJy" if to_njy != 1.0 else "electron"
        self.log.info(
            "Detected %d DIA sources (%d negative, %d in dipoles)",
            len(sources),
            int(np.sum(sources["isNegative"])),
            int(np.sum(sources["isDipole"])),
        )
        return pipe_base.Struct(dia_sources=sources)
