"""prompt-tasks: Prompt Processing for a Rubin-style observatory, as a Celery task pipeline.

The Celery application lives in :mod:`prompt_tasks.celery` (``celery -A prompt_tasks``);
importing this package is cheap and reads no environment.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
