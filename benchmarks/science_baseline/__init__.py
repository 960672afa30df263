"""The pixel stages of the demo ApPipe as they were before photutils and reproject.

A frozen copy of ``prompt_tasks.science`` (ISR, calibrate, subtract, detect and their helpers)
kept only so that :mod:`benchmarks.science_quality` can time the old and the new implementation
side by side in one run. Not used by the framework.
"""

__all__: list[str] = []
