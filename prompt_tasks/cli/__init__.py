"""The ``prompt-tasks`` command line.

The settings are built here, once, from the environment, and handed to every command through
the click context. Each command family lives in its own module of this package and is
registered in :data:`COMMAND_MODULES`; an instrument plugin may add its own (``commands``).
Those modules are imported only when a command of theirs, or the list of commands, is asked
for: ``prompt-tasks worker``, which replaces itself with a Celery worker, starts without them.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import click

from prompt_tasks.instruments import known_instruments, load_plugin
from prompt_tasks.settings import Settings

__all__ = ["main", "pass_settings"]

#: Modules that define commands (each exposes ``COMMANDS``, a list of click commands).
COMMAND_MODULES: list[str] = [
    "prompt_tasks.cli.stack",  # stack up/status/down, demo
    "prompt_tasks.cli.intake",  # intake, next-visit, abort
    "prompt_tasks.cli.fleet",  # workers, status, report
    "prompt_tasks.cli.events",  # dispatcher
    "prompt_tasks.cli.butler",  # local repos, export
    "prompt_tasks.cli.catchup",  # catchup list/run
    "prompt_tasks.cli.report",  # report (a visit's timeline PNG)
    "prompt_tasks.cli.bench",  # bench (benchmarks/night.py)
]

pass_settings = click.make_pass_decorator(Settings)


class _Commands(click.Group):
    """The commands defined here, then those of the command modules, imported when first needed."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in _command_modules():
                for command in importlib.import_module(module).COMMANDS:
                    self.add_command(command)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and not self._loaded:
            self._load()
            command = super().get_command(ctx, cmd_name)
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Prompt Processing as a Celery task pipeline."""
    ctx.obj = Settings()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def config(settings: Settings, as_json: bool) -> None:
    """Print the effective settings, secrets masked."""
    public = settings.public()
    if as_json:
        click.echo(json.dumps(public, indent=2, sort_keys=True))
        return
    width = max(len(name) for name in public)
    for name in sorted(public):
        click.echo(f"{name:<{width}}  {public[name]}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("role")
@click.option("--index", default=1, show_default=True, help="Instance number (detector workers).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def worker(role: str, index: int, loglevel: str, extra: tuple[str, ...]) -> None:
    """Run the Celery worker of ROLE (see workers/); EXTRA goes to celery."""
    from prompt_tasks.fleet.roles import CELERY_ROLES, ROLES, celery_argv

    if role not in CELERY_ROLES:
        raise click.BadParameter(f"{role!r} is not one of {', '.join(CELERY_ROLES)}", param_hint="ROLE")
    argv = celery_argv(ROLES[role], index=index, loglevel=loglevel) + list(extra)
    sys.stdout.flush()
    os.execv(argv[0], argv)


def _command_modules() -> list[str]:
    """Our command modules, then those of every instrument plugin (a simulator's, say)."""
    extra = [plugin.commands for plugin in map(load_plugin, sorted(known_instruments())) if plugin.commands]
    return COMMAND_MODULES + sorted(set(extra) - set(COMMAND_MODULES))
