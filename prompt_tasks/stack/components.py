"""The components of the embedded stack, in start order, with their command lines and checks.

This module only describes: which processes the stack runs for given settings, how each is
started (argv and extra environment), how it is recognised in ``/proc`` and how its health is
checked. :mod:`prompt_tasks.stack.launcher` does the starting and stopping. Celery workers
come from the roles of :mod:`workers`, so the stack, docker-compose and the manifests start
the same roles the same way.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from prompt_tasks.fleet.roles import ROLES, Role, detector_hostname
from prompt_tasks.settings import Settings
from prompt_tasks.stack.servers import (
    redis_argv,
    redis_signature,
    s3_argv,
    s3_env,
    s3_signature,
)

__all__ = [
    "Component",
    "Health",
    "Tier",
    "celery_node",
    "components",
    "data_dir",
    "prompt_tasks_executable",
    "run_dir",
]


class Health(StrEnum):
    """How a component's health is checked."""

    REDIS_PING = "redis-ping"
    S3_LIVE = "s3-live"
    CELERY_PING = "celery-ping"
    FLOWER_API = "flower-api"
    HTTP_HEALTHZ = "http-healthz"
    PID = "pid"


class Tier(StrEnum):
    """Start groups: servers start one by one; the fleet starts together once they are up."""

    SERVER = "server"
    FLEET = "fleet"


@dataclass(frozen=True)
class Component:
    """One process of the stack.

    Parameters
    ----------
    name
        Unique name; also the stem of its pid and log files.
    role
        The role of :data:`workers.ROLES` it runs (``redis`` and ``s3`` for the servers).
    argv
        Command line.
    signature
        Command-line fragments that identify the process (see
        :class:`~prompt_tasks.stack.process.ManagedProcess`).
    health
        Health check.
    tier
        Start group.
    port
        TCP port it listens on, if any.
    extra_ports
        Further ports it listens on (checked free before it starts).
    node
        Celery node-name prefix (``name@``) of a worker.
    env
        Environment beyond the settings' ``PROMPT_TASKS_*`` variables.
    """

    name: str
    role: str
    argv: tuple[str, ...]
    signature: tuple[str, ...]
    health: Health
    tier: Tier = Tier.FLEET
    port: int | None = None
    extra_ports: tuple[int, ...] = ()
    node: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def run_dir(settings: Settings) -> Path:
    """Where pid and log files live."""
    return settings.state_path / "run"


def data_dir(settings: Settings, name: str) -> Path:
    """Data directory of server ``name``."""
    return settings.state_path / name


def prompt_tasks_executable() -> str:
    """The ``prompt-tasks`` console script of this environment."""
    beside = Path(sys.executable).parent / "prompt-tasks"
    if beside.exists():
        return str(beside)
    return shutil.which("prompt-tasks") or "prompt-tasks"


def celery_node(role: Role, index: int = 1) -> str:
    """Node-name prefix (before ``@host``) of worker ``role`` instance ``index``."""
    return detector_hostname(index) if role.name == "detector" else role.name


def _worker(role: Role, index: int, name: str) -> Component:
    node = celery_node(role, index)
    argv = [prompt_tasks_executable(), "worker", role.name]
    if role.name == "detector":
        argv += ["--index", str(index)]
    return Component(
        name=name,
        role=role.name,
        argv=tuple(argv),
        # Before exec: "prompt-tasks worker ROLE ..."; after: "celery ... -n NODE@%h".
        signature=(" ".join(argv[1:]), f"-n {node}@"),
        health=Health.CELERY_PING,
        node=node,
    )


#: Workers first (they consume what the others send), the intake last.
_START_ORDER = ("worker", "beat", "flower", "process")


def _celery(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "celery", "-A", "prompt_tasks", *args)


def components(settings: Settings, flower_auth: str | None = None) -> list[Component]:
    """Every component of the stack of ``settings``, in start order.

    ``flower_auth`` (``user:password``) is handed to Flower through its environment.
    """
    redis_dir, s3_dir = data_dir(settings, "redis"), data_dir(settings, "s3")
    out = [
        Component(
            "redis", "redis", tuple(redis_argv(settings, redis_dir)), redis_signature(settings),
            Health.REDIS_PING, Tier.SERVER, port=settings.redis_port,
        ),
        Component(
            "s3", "s3", tuple(s3_argv(settings, s3_dir)), (s3_signature(s3_dir),),
            Health.S3_LIVE, Tier.SERVER, port=settings.s3_port, env=s3_env(settings),
        ),
    ]
    for role in sorted(ROLES.values(), key=lambda r: (_START_ORDER.index(r.kind), r.name == "intake")):
        if role.kind == "worker":
            if role.name == "detector":
                out += [
                    _worker(role, i, f"detector-{i}") for i in range(1, settings.detector_workers + 1)
                ]
            else:
                out.append(_worker(role, 1, role.name))
        elif role.kind == "beat":
            schedule = str(settings.state_path / "beat-schedule")
            out.append(
                Component(
                    role.name, role.name,
                    _celery("beat", "-s", schedule, "--loglevel=INFO"),
                    (schedule,), Health.PID,
                )
            )
        elif role.kind == "flower":
            address = f"--address={settings.host}"
            port = f"--port={settings.flower_port}"
            out.append(
                Component(
                    role.name, role.name,
                    _celery("flower", address, port, "--max_tasks=10000"),
                    (f"flower {address} {port}",), Health.FLOWER_API,
                    port=settings.flower_port,
                    env={"FLOWER_BASIC_AUTH": flower_auth} if flower_auth else {},
                )
            )
        else:  # a prompt-tasks command of the same name
            argv = (prompt_tasks_executable(), role.name)
            health, port, extra = Health.PID, None, ()
            if role.name == "intake":  # also serves the Prometheus metrics
                health, port, extra = Health.HTTP_HEALTHZ, settings.intake_port, (settings.metrics_port,)
            out.append(
                Component(
                    role.name, role.name, argv, (f"prompt-tasks {role.name}",), health,
                    port=port, extra_ports=extra,
                )
            )
    return out
