"""The science payload: the demo pipelines' PipelineTasks and their runner.

One module per task (:mod:`.isr`, :mod:`.calibrate`, :mod:`.subtract`, :mod:`.detect`,
:mod:`.associate`, :mod:`.alerts`, :mod:`.metrics`, :mod:`.calib_verify`, :mod:`.trivial`), built
on photutils, reproject and astropy; shared helpers in :mod:`.imaging` and :mod:`.matching`;
:mod:`.runner` runs a pipeline in-process. The pipeline YAML files live with the instrument.
"""

__all__: list[str] = []
