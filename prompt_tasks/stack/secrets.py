"""The embedded stack's own secrets: a random Redis password and S3 keys, made on first ``up``.

Each is written once into the state directory (:data:`~prompt_tasks.settings.STACK_SECRET_FILES`,
mode 600, never printed) unless it is set explicitly; :class:`~prompt_tasks.settings.Settings`
reads them back in every process of that state directory. Flower's password is generated the
same way by :func:`prompt_tasks.stack.launcher.flower_auth`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from prompt_tasks.settings import STACK_SECRET_FILES, Settings

__all__ = ["ensure_secrets", "write_secret"]


def write_secret(path: Path, value: str) -> bool:
    """Write ``value`` to a new file ``path`` with mode 600; False when it exists already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return True


def ensure_secrets(settings: Settings) -> Settings:
    """``settings`` with the stack's Redis password and S3 keys, generating those missing.

    A secret set explicitly (an environment variable, an argument) is used as it is.
    """
    update: dict[str, SecretStr] = {}
    for name, filename in STACK_SECRET_FILES.items():
        if name in settings.model_fields_set:
            continue
        path = settings.state_path / filename
        write_secret(path, secrets.token_urlsafe(24))
        update[name] = SecretStr(path.read_text().strip())
    return settings.model_copy(update=update) if update else settings
