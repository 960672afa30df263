"""Small stumbles of a first hour of use: help texts, one log flag, hints that run as written."""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

from prompt_tasks.cli import main


def test_demo_help_says_it_plays_a_night() -> None:
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0
    assert "night" in result.output and "--skip night" in result.output


def test_one_log_flag_name_for_every_long_running_command() -> None:
    for command in ("intake", "dispatcher"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0
        assert "--text-logs" in result.output, command
        assert "--plain-logs" not in result.output, command  # the old name: a hidden alias


def test_old_intake_log_flag_still_parses() -> None:
    from prompt_tasks.cli.intake import intake

    names = {opt for param in intake.params for opt in param.opts}
    assert {"--text-logs", "--plain-logs"} <= names


def test_demo_hint_names_a_butler_that_exists() -> None:
    from prompt_tasks.demo.night import butler_hint
    from prompt_tasks.settings import Settings

    hint = butler_hint(Settings())
    command = hint.split()[1]
    assert Path(command).is_absolute() and Path(command).parent == Path(sys.executable).parent
    assert Path(command).exists()
