"""The roles of the fleet (``prompt-tasks worker ROLE``), defined in :mod:`prompt_tasks.fleet.roles`.

This top-level package is what deployment files and operators name; the package itself
imports :mod:`prompt_tasks.fleet.roles`.
"""

from prompt_tasks.fleet.roles import CELERY_ROLES, ROLES, Role, celery_argv, detector_hostname

__all__ = ["CELERY_ROLES", "ROLES", "Role", "celery_argv", "detector_hostname"]
