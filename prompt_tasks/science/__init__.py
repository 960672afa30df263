"""The science payload: PipelineTasks for SimCam (numpy/scipy/astropy) and their runner.

One module per task: :mod:`.isr`, :mod:`.calibrate`, :mod:`.subtract`, :mod:`.detect`,
:mod:`.associate`, :mod:`.alerts`, :mod:`.metrics`, :mod:`.calib_verify`, :mod:`.trivial`;
shared pixel and catalogue helpers in :mod:`.imaging` and :mod:`.matching`; storage-class
formatters in :mod:`.formatters`; :mod:`.runner` executes a pipeline in-process;
:mod:`.recovery` scores DIA sources against the simulator's ground truth. The pipeline
YAML files live with the instrument (``prompt_tasks/instruments/simcam/pipelines``).
"""

__all__: list[str] = []
