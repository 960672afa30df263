"""A deliberately cheap task: read a raw, write three numbers about it.

The ``Trivial`` pipeline runs only this: a benchmark at 189 detectors measures the framework.
"""

from __future__ import annotations

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.nddata import CCDData

__all__ = ["TrivialConfig", "TrivialConnections", "TrivialTask"]

_EXPOSURE = ("instrument", "exposure", "detector")


class TrivialConnections(pipe_base.PipelineTaskConnections, dimensions=_EXPOSURE):
    """A raw in, a tiny summary out."""

    raw = cT.Input(name="raw", storageClass="CCDImage", doc="Raw snap.", dimensions=_EXPOSURE)
    summary = cT.Output(name="raw_summary", storageClass="StructuredDataDict", dimensions=_EXPOSURE,
                        doc="Median, minimum and maximum pixel value of the raw.")


class TrivialConfig(pipe_base.PipelineTaskConfig, pipelineConnections=TrivialConnections):
    """Sampling stride of the statistics."""

    stride = pex_config.Field[int](doc="Use every stride-th pixel of each axis.", default=8)


class TrivialTask(pipe_base.PipelineTask):
    """Summarize a raw in a few numbers."""

    ConfigClass = TrivialConfig
    config: TrivialConfig
    _DefaultName = "trivial"

    def run(self, raw: CCDData) -> pipe_base.Struct:
        """Return ``summary``."""
        sample = np.asarray(raw.data)[:: self.config.stride, :: self.config.stride]
        return pipe_base.Struct(summary={"median": float(np.median(sample)), "min": float(sample.min()),
                                         "max": float(sample.max()), "shape": list(raw.data.shape)})
