"""Calibration verification: does a new bias, dark or flat exposure agree with the masters?

Each calibration exposure is corrected with the certified masters valid at its time and the
residual is judged: a bias minus the master bias must be flat at zero with read-noise scatter; a
dark minus bias must show the master's dark current; a flat corrected by bias, dark and master
flat must be flat on large scales (astropy ``block_reduce`` medians). The verdict is a small dict
(``calib_verify_metrics``), so operators see a drifting detector before science suffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lsst.pex.config as pex_config
import lsst.pipe.base as pipe_base
import lsst.pipe.base.connectionTypes as cT
import numpy as np
from astropy.nddata import CCDData, block_reduce

from prompt_tasks.science.imaging import robust_stats

__all__ = ["CalibVerifyConfig", "CalibVerifyConnections", "CalibVerifyTask", "verify_bias", "verify_dark",
           "verify_flat"]

_EXPOSURE = ("instrument", "exposure", "detector")


def _master(name: str, doc: str, *extra: str) -> Any:
    return cT.PrerequisiteInput(name=name, storageClass="CCDImage", doc=doc, dimensions=("instrument", "detector", *extra),
                                isCalibration=True, multiple=True, minimum=0)


class CalibVerifyConnections(pipe_base.PipelineTaskConnections, dimensions=_EXPOSURE):
    """A calibration raw and the masters in; a verdict out."""

    raw = cT.Input(name="raw", storageClass="CCDImage", doc="Bias, dark or flat exposure.", dimensions=_EXPOSURE)
    bias = _master("bias", "Master bias.")
    dark = _master("dark", "Master dark.")
    flat = _master("flat", "Master flat of the exposure's filter.", "physical_filter")
    verdict = cT.Output(name="calib_verify_metrics", storageClass="StructuredDataDict", dimensions=_EXPOSURE,
                        doc="Residual statistics of the exposure against the masters and pass/fail.")


class CalibVerifyConfig(pipe_base.PipelineTaskConfig, pipelineConnections=CalibVerifyConnections):
    """Acceptance thresholds."""

    max_bias_offset = pex_config.Field[float](doc="Largest mean bias residual (e-).", default=3.0)
    noise_ratio_range = pex_config.ListField[float](
        doc="Accepted range of (bias residual noise / expected read noise).", default=[0.8, 1.3])
    max_dark_offset = pex_config.Field[float](doc="Largest mean dark-current residual (e-/s).", default=0.05)
    max_flat_structure = pex_config.Field[float](
        doc="Largest rms of the corrected flat's 32-pixel block medians (fraction).", default=0.01)
    default_gain = pex_config.Field[float](doc="Gain when the header has none (e-/ADU).", default=1.0)
    default_read_noise = pex_config.Field[float](doc="Read noise when the header has none (e-).", default=5.0)


def verify_bias(residual_e: np.ndarray, read_noise: float, master_noise: float,
                config: CalibVerifyConfig) -> dict[str, Any]:
    """Judge raw − master bias (electrons): zero mean, read-noise scatter."""
    mean, sigma = robust_stats(residual_e)
    expected = math.hypot(read_noise, master_noise)
    ratio = sigma / expected if expected > 0 else math.inf
    low, high = config.noise_ratio_range
    failures = []
    if abs(mean) > config.max_bias_offset:
        failures.append(f"bias offset {mean:.2f} e- exceeds {config.max_bias_offset}")
    if not low <= ratio <= high:
        failures.append(f"noise {sigma:.2f} e- is {ratio:.2f} x the expected {expected:.2f}")
    return {"mean_residual": mean, "noise": sigma, "expected_noise": expected, "noise_ratio": ratio,
            "failures": failures}


def verify_dark(residual_rate: np.ndarray, config: CalibVerifyConfig) -> dict[str, Any]:
    """Judge (raw − bias)/darktime − master dark (e-/s): zero mean."""
    mean, sigma = robust_stats(residual_rate)
    failures = [f"dark residual {mean:.4f} e-/s exceeds {config.max_dark_offset}"] if abs(
        mean) > config.max_dark_offset else []
    return {"mean_residual_rate": mean, "residual_rate_noise": sigma, "failures": failures}


def verify_flat(corrected: np.ndarray, config: CalibVerifyConfig, block: int = 32) -> dict[str, Any]:
    """Judge a flat exposure divided by the master flat: flat on scales of ``block`` pixels."""
    level, _ = robust_stats(corrected)
    ny, nx = (s - s % block for s in corrected.shape)
    medians = block_reduce(corrected[:ny, :nx], block, func=np.median) / level if level else np.zeros(1)
    structure = float(np.std(medians))
    failures = [f"large-scale structure {structure:.4f} exceeds {config.max_flat_structure}"] if (
        structure > config.max_flat_structure) else []
    return {"level": level, "structure": structure, "failures": failures}


class CalibVerifyTask(pipe_base.PipelineTask):
    """Verify a bias, dark or flat exposure against the certified master calibrations."""

    ConfigClass = CalibVerifyConfig
    config: CalibVerifyConfig
    _DefaultName = "calibVerify"

    def runQuantum(self, butlerQC: pipe_base.QuantumContext, inputRefs: pipe_base.InputQuantizedConnection,
                   outputRefs: pipe_base.OutputQuantizedConnection) -> None:
        record = butlerQC.quantum.dataId.records["exposure"]
        kind = str(getattr(record, "observation_type", "") or "")
        butlerQC.put(self.run(kind=kind, **butlerQC.get(inputRefs)), outputRefs)

    def run(self, raw: CCDData, bias: Sequence[CCDData] = (), dark: Sequence[CCDData] = (),
            flat: Sequence[CCDData] = (), kind: str = "") -> pipe_base.Struct:
        """Return ``verdict`` for ``raw`` (its type from ``kind`` or the header's IMGTYPE)."""
        kind = (kind or str(raw.meta.get("IMGTYPE", raw.meta.get("OBSTYPE", "")))).lower()
        if kind not in ("bias", "dark", "flat"):
            raise pipe_base.NoWorkFound(f"exposure type {kind!r} is not a calibration")
        for needed in {"bias", kind}:
            if not {"bias": bias, "dark": dark, "flat": flat}[needed]:
                raise pipe_base.NoWorkFound(f"no master {needed} certified for this exposure")
        gain = float(raw.meta.get("GAIN", self.config.default_gain))
        read_noise = float(raw.meta.get("RDNOISE", self.config.default_read_noise))
        adu = np.asarray(raw.data, np.float64) - np.asarray(bias[0].data, np.float64)
        dark_time = float(raw.meta.get("DARKTIME", raw.meta.get("EXPTIME", 0.0)))
        if kind == "bias":
            uncertainty = bias[0].uncertainty
            master_noise = float(np.median(uncertainty.array)) * gain if uncertainty is not None else 0.0
            result = verify_bias(adu * gain, read_noise, master_noise, self.config)
        elif kind == "dark":
            result = verify_dark((adu / max(dark_time, 1e-9) - np.asarray(dark[0].data, np.float64)) * gain, self.config)
        else:
            if dark:
                adu = adu - np.asarray(dark[0].data, np.float64) * dark_time
            flat_data = np.asarray(flat[0].data, np.float64)
            result = verify_flat(adu / np.where(flat_data > 0.05, flat_data, np.inf), self.config)
        verdict = {"type": kind, "passed": not result["failures"], **result}
        self.log.info("Calibration verification of a %s: %s", kind,
                      "passed" if verdict["passed"] else verdict["failures"])
        return pipe_base.Struct(verdict=verdict)
