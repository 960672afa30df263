"""Per visit-detector quality metrics of the AP pipeline, as a small JSON-able dict.

What a night operator wants at a glance: image quality (PSF FWHM, sky, noise), calibration
(astrometric offset and scatter, zero point), subtraction (template coverage, difference noise
relative to the expected) and the DIA yield (sources by sign, new objects, alerts).
"""

from __future__ import annotations

import math
from typing import Any

import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.nddata import CCDData
from astropy.table import Table

from prompt_tasks.science.alerts import read_alerts

__all__ = ["ApMetricsConfig", "ApMetricsConnections", "ApMetricsTask", "ap_metrics"]

_VISIT = ("instrument", "visit", "detector")


class ApMetricsConnections(pipe_base.PipelineTaskConnections, dimensions=_VISIT):
    """Products of the AP pipeline in; one metrics dict out."""

    science = cT.Input(name="visit_image", storageClass="CCDImage", doc="Visit image.", dimensions=_VISIT)
    difference = cT.Input(name="difference_image", storageClass="CCDImage", doc="Difference image.", dimensions=_VISIT)
    dia_sources = cT.Input(name="dia_source", storageClass="ArrowAstropy", doc="Associated DIA sources.",
                           dimensions=_VISIT)
    dia_objects = cT.Input(name="dia_object", storageClass="ArrowAstropy", doc="DIA objects touched.",
                           dimensions=_VISIT)
    alerts = cT.Input(name="alert_packet", storageClass="AlertPacket", doc="Avro alerts.", dimensions=_VISIT)
    metrics = cT.Output(name="ap_metrics", storageClass="StructuredDataDict", dimensions=_VISIT,
                        doc="Quality and yield metrics of the visit-detector.")


class ApMetricsConfig(pipe_base.PipelineTaskConfig, pipelineConnections=ApMetricsConnections):
    """No options: the metrics are fixed."""


def _number(header: Any, key: str) -> float | None:
    """A numeric header value, None when absent or flagged unmeasured (-99)."""
    value = header.get(key)
    return None if value is None or not math.isfinite(float(value)) or float(value) == -99.0 else float(value)


def ap_metrics(science: CCDData, difference: CCDData, dia_sources: Table, dia_objects: Table,
               n_alerts: int) -> dict[str, Any]:
    """The metrics dict (plain JSON types) of one visit-detector."""
    sci, diff = science.meta, difference.meta
    negative, new = (np.asarray(t[c], bool) if c in t.colnames else np.zeros(len(t), bool)
                     for t, c in ((dia_sources, "isNegative"), (dia_objects, "isNew")))
    expected = None
    if science.uncertainty is not None:
        sigma = np.asarray(science.uncertainty.array, np.float64)
        good = np.ones(sigma.shape, bool) if difference.mask is None else ~np.asarray(difference.mask, bool)
        expected = float(np.median(sigma[good])) if good.any() else None
    noise = _number(diff, "DIFNOISE")
    # A science image pre-convolved for PSF matching has its noise smoothed by the template's PSF.
    smoothing = float(diff.get("PRECONV", 0.0) or 0.0)
    if expected and smoothing > 0:
        expected /= 2 * math.sqrt(math.pi) * smoothing
    return {
        "n_snaps": int(sci.get("NSNAPS", 1)), "exposure_time": _number(sci, "EXPTIME"),
        "psf_fwhm_arcsec": _number(sci, "PSFFWHM"), "sky_background": _number(sci, "BGMEAN"),
        "pixel_noise": _number(sci, "BGNOISE"), "n_calibration_stars": int(sci.get("NSTARS", 0)),
        "n_refcat_matches": int(sci.get("ASTNMAT", 0)),
        "astrometric_offset_ra_arcsec": _number(sci, "ASTOFFRA"),
        "astrometric_offset_dec_arcsec": _number(sci, "ASTOFFDE"),
        "astrometric_scatter_arcsec": _number(sci, "ASTRMS"), "zero_point": _number(sci, "MAGZERO1"),
        "template_coverage": _number(diff, "TMPLCOV"), "template_scale": _number(diff, "TMPLSCAL"),
        "psf_matching": str(diff.get("PSFMATCH", "")), "difference_noise": noise,
        "difference_noise_ratio": noise / expected if noise is not None and expected else None,
        "n_dia_sources": len(dia_sources), "n_positive": int((~negative).sum()), "n_negative": int(negative.sum()),
        "n_dia_objects_touched": len(dia_objects), "n_new_dia_objects": int(new.sum()), "n_alerts": int(n_alerts),
    }


class ApMetricsTask(pipe_base.PipelineTask):
    """Gather the AP pipeline's quality and yield metrics of one visit-detector."""

    ConfigClass = ApMetricsConfig
    config: ApMetricsConfig
    _DefaultName = "apMetrics"

    def run(self, science: CCDData, difference: CCDData, dia_sources: Table, dia_objects: Table,
            alerts: bytes) -> pipe_base.Struct:
        """Return ``metrics``."""
        metrics = ap_metrics(science, difference, dia_sources, dia_objects, len(read_alerts(alerts)[1]))
        self.log.info("Metrics: %s", metrics)
        return pipe_base.Struct(metrics=metrics)
