"""DIA source detection: positive and negative point sources on the difference image.

Sources are found by :func:`.imaging.find_point_sources` (photutils ``find_peaks`` on the
matched-filtered S/N map); positive and negative detections closer than a few PSF sigmas are
flagged as dipoles (a scipy k-d tree); fluxes are converted to nJy with the image's zero point.
"""

from __future__ import annotations

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.nddata import CCDData
from astropy.table import Table
from scipy.spatial import cKDTree

from prompt_tasks.science.imaging import find_point_sources, wcs_of

__all__ = ["NJY_ZERO_POINT", "DetectDiaSourcesConfig", "DetectDiaSourcesConnections", "DetectDiaSourcesTask",
           "detect_dia_sources", "electrons_to_njy"]

_VISIT = ("instrument", "visit", "detector")
#: AB magnitude of 1 nJy.
NJY_ZERO_POINT = 31.4


class DetectDiaSourcesConnections(pipe_base.PipelineTaskConnections, dimensions=_VISIT):
    """Difference image in, DIA source candidates out."""

    difference = cT.Input(name="difference_image", storageClass="CCDImage", dimensions=_VISIT,
                          doc="Science minus matched template.")
    dia_sources = cT.Output(name="dia_source_unstandardized", storageClass="ArrowAstropy", dimensions=_VISIT,
                            doc="Positive and negative detections on the difference image.")


class DetectDiaSourcesConfig(pipe_base.PipelineTaskConfig, pipelineConnections=DetectDiaSourcesConnections):
    """Detection threshold and exclusions."""

    threshold = pex_config.Field[float](doc="Detection threshold (sigma of the filtered image).", default=5.0)
    edge = pex_config.Field[int](doc="Ignore peaks this close to the image edge (pixels).", default=8)
    use_variance = pex_config.Field[bool](doc="Weight the noise by the variance plane.", default=True)
    detect_negative = pex_config.Field[bool](doc="Also detect negative sources.", default=True)
    dipole_radius = pex_config.Field[float](
        doc="A positive and a negative peak closer than this many PSF sigmas are a dipole.", default=4.0)


def electrons_to_njy(zero_point: float) -> float:
    """nJy per electron for an image whose 1 e- has magnitude ``zero_point`` (1 if unknown)."""
    return float(10 ** (-0.4 * (zero_point - NJY_ZERO_POINT))) if 0 < zero_point < 50 else 1.0


def detect_dia_sources(difference: np.ndarray, psf_sigma: float, threshold: float, *,
                       mask: np.ndarray | None = None, edge: int = 8, negative: bool = True,
                       dipole_radius: float = 4.0, variance: np.ndarray | None = None) -> Table:
    """DIA sources of a difference image: pixel, flux and flag columns (no sky coordinates)."""
    sources = find_point_sources(difference, psf_sigma, threshold, mask=mask, variance=variance, edge=edge,
                                 negative=negative)
    sources["isDipole"] = np.zeros(len(sources), bool)
    pos, neg = np.flatnonzero(~sources["isNegative"]), np.flatnonzero(sources["isNegative"])
    if len(pos) and len(neg):
        tree = cKDTree(np.column_stack([sources["x"][neg], sources["y"][neg]]))
        distance, nearest = tree.query(np.column_stack([sources["x"][pos], sources["y"][pos]]))
        close = distance < dipole_radius * psf_sigma
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
        """Return ``dia_sources``: x, y, ra, dec, psfFlux, psfFluxErr (nJy), snr and flags."""
        cfg, meta = self.config, difference.meta
        psf_sigma = float(meta.get("PSFSIG", 1.7))
        variance = None
        if cfg.use_variance and difference.uncertainty is not None:
            variance = np.asarray(difference.uncertainty.array, np.float64) ** 2
        sources = detect_dia_sources(
            np.asarray(difference.data, np.float64), psf_sigma, cfg.threshold,
            mask=None if difference.mask is None else np.asarray(difference.mask, bool), edge=cfg.edge,
            negative=cfg.detect_negative, dipole_radius=cfg.dipole_radius, variance=variance)
        wcs, nan = wcs_of(meta), np.full(len(sources), np.nan)
        ra, dec = wcs.all_pix2world(sources["x"], sources["y"], 0) if wcs is not None and len(sources) else (nan, nan)
        sources["ra"], sources["dec"] = np.asarray(ra, np.float64), np.asarray(dec, np.float64)
        to_njy = electrons_to_njy(float(meta.get("MAGZERO", -99.0)))
        sources["psfFluxElectrons"] = sources["psfFlux"]
        sources["psfFlux"] = sources["psfFlux"] * to_njy
        sources["psfFluxErr"] = sources["psfFluxErr"] * to_njy
        sources.meta.update(psf_sigma=psf_sigma, flux_unit="nJy" if to_njy != 1.0 else "electron")
        self.log.info("Detected %d DIA sources (%d negative, %d in dipoles)", len(sources),
                      int(np.sum(sources["isNegative"])), int(np.sum(sources["isDipole"])))
        return pipe_base.Struct(dia_sources=sources)
