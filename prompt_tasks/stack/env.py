"""Settings as ``PROMPT_TASKS_*`` environment variables, for the processes the stack starts.

A child process builds its own :class:`~prompt_tasks.settings.Settings` from its environment,
so handing it the parent's settings means writing each field back as the variable it is read
from. Secrets go through the environment (never the command line, where ``ps`` shows them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr

from prompt_tasks.settings import Settings

__all__ = ["ENV_PREFIX", "child_env", "env_name", "settings_env", "settings_markdown"]

ENV_PREFIX = "PROMPT_TASKS_"


def env_name(field: str) -> str:
    """The environment variable a settings ``field`` is read from."""
    return f"{ENV_PREFIX}{field.upper()}"


def _as_env(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict | set):
        return json.dumps(sorted(value) if isinstance(value, set) else value)  # pydantic-settings reads JSON
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """Every field of ``settings`` that has a value, as ``PROMPT_TASKS_*`` variables.

    The state directory is written as an absolute path, so a child started in another
    working directory finds the same stack.
    """
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if name == "state_dir":
            value = settings.state_path
        elif isinstance(value, Path):
            value = value.expanduser().resolve()
        env[env_name(name)] = _as_env(value)
    return env


def child_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment of a child: ``base`` (default: ours) without any inherited
    ``PROMPT_TASKS_*`` variable, plus ``settings`` as variables."""
    source = os.environ if base is None else base
    env = {key: value for key, value in source.items() if not key.startswith(ENV_PREFIX)}
    env.update(settings_env(settings))
    return env


def settings_markdown() -> str:
    """Every setting as a Markdown table row: variable, default, description (for the README)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.default
        if isinstance(default, SecretStr):
            shown = "(set; change it)"
        elif default is None:
            shown = "(none)"
        elif isinstance(default, bool):
            shown = f"`{_as_env(default)}`"
        else:
            shown = f"`{default}`"
        description = (info.description or "").replace("|", "\\|").replace("<", "&lt;")
        rows.append(f"| `{env_name(name)}` | {shown} | {description} |")
    return "\n".join(rows) + "\n"
