"""Fixtures of the simulated camera: a small world and a small central repository.

Registered in ``tests/conftest.py`` through ``pytest_plugins``. The world is kept tiny (two
128-pixel detectors, two bands, a survey area of a few arcminutes) so a central repository
builds in a few seconds, once per session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.settings import Settings

__all__ = ["SmallCentral", "build_small_central", "small_config"]


def small_config(**overrides: Any) -> SimConfig:
    """A world small enough for tests (2 detectors of 128², bands g and r, 300-px patches)."""
    values: dict[str, Any] = {"n_detectors": 2, "size": 128, "bands": ("g", "r"), "field_radius": 0.004,
                              "patch_size": 300}
    values.update(overrides)
    return SimConfig(**values)


@dataclass(frozen=True)
class SmallCentral:
    """A built central repository: settings pointing at it, and its world."""

    settings: Settings
    config: SimConfig

    @property
    def uri(self) -> str:
        """The repository URI."""
        return self.settings.central_repo_uri


def build_small_central(servers: Settings, state_dir: Path, config: SimConfig | None = None,
                        **settings_values: Any) -> SmallCentral:
    """Build a small SimCam central repository (SQLite registry, datastore on the servers' S3)
    and APDB under ``state_dir``."""
    from prompt_tasks.instruments.simcam.central import init_central

    settings = servers.model_copy(update={"state_dir": state_dir, **settings_values})
    config = config or small_config()
    init_central(settings, config=config)
    return SmallCentral(settings, config)


@pytest.fixture(scope="session")
def simcam_config() -> SimConfig:
    """The small world of the session."""
    return small_config()


@pytest.fixture(scope="session")
def simcam_central(tmp_path_factory: pytest.TempPathFactory, servers: Settings,
                   simcam_config: SimConfig) -> SmallCentral:
    """A small central repository built once per session (read-only for tests)."""
    return build_small_central(servers, tmp_path_factory.mktemp("simcam-central"), simcam_config)
