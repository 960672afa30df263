"""Bring the embedded stack up, report its status, take it down.

``up`` starts the servers one by one (Redis, then the S3 gateway, then the raw bucket and its
notification), then the whole fleet at once, and waits for every component to be healthy. A
component already running is left alone, so ``up`` twice starts nothing twice; pid files of
dead processes are ignored. If any component fails, everything of the stack is stopped again
and :class:`StackError` names the component and carries the tail of its log. ``down`` stops,
in reverse order, exactly the processes recorded in the pid files.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import urllib3
from minio.error import S3Error

from prompt_tasks.settings import Settings
from prompt_tasks.stack import health
from prompt_tasks.stack.components import (
    Component,
    Health,
    Tier,
    components,
    data_dir,
    run_dir,
)
from prompt_tasks.stack.env import child_env
from prompt_tasks.stack.process import ManagedProcess
from prompt_tasks.stack.servers import (
    ensure_bucket_ready,
    format_s3,
    port_in_use,
    write_redis_config,
)

__all__ = [
    "ComponentStatus",
    "StackError",
    "down",
    "flower_auth",
    "flower_password_file",
    "stack_components",
    "status",
    "up",
]

#: ``on_event(component, message)``: progress of ``up`` and ``down``.
Reporter = Callable[[str, str], None]

SERVER_TIMEOUT_S = 30.0


class StackError(RuntimeError):
    """A component of the stack failed to start."""

    def __init__(self, component: str, reason: str, log_tail: str, log_file: Path) -> None:
        super().__init__(f"{component}: {reason}")
        self.component = component
        self.reason = reason
        self.log_tail = log_tail
        self.log_file = log_file


@dataclass(frozen=True)
class ComponentStatus:
    """What ``stack status`` shows of one component."""

    name: str
    role: str
    pid: int | None
    port: int | None
    health: str  # "healthy", "unhealthy" or "stopped"
    check: str
    log: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _quiet(component: str, message: str) -> None:
    del component, message


def flower_password_file(settings: Settings) -> Path:
    """Where a generated Flower password is kept (mode 600) when none is configured."""
    return settings.state_path / "flower-password"


def flower_auth(settings: Settings, create: bool = False) -> str | None:
    """Flower's ``user:password``: the configured password, else the generated one.

    With ``create``, a random password is generated into :func:`flower_password_file` when
    there is none yet.
    """
    if settings.flower_password is not None:
        password = settings.flower_password.get_secret_value()
        return f"{settings.flower_user}:{password}" if password else None
    path = flower_password_file(settings)
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(18) + "\n")
    return f"{settings.flower_user}:{path.read_text().strip()}"


@contextmanager
def _exclusive(settings: Settings) -> Iterator[None]:
    """Serialise ``up`` and ``down`` of one state directory (two ``up`` at once start once)."""
    rundir = run_dir(settings)
    rundir.mkdir(parents=True, exist_ok=True)
    with open(rundir / "stack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stack_components(
    settings: Settings, skip: Collection[str] = (), create_secrets: bool = False
) -> list[Component]:
    """The components of the stack of ``settings`` without those named in ``skip``."""
    auth = flower_auth(settings, create=create_secrets)
    return [c for c in components(settings, auth) if c.name not in skip and c.role not in skip]


def _process(settings: Settings, component: Component) -> ManagedProcess:
    return ManagedProcess(component.name, run_dir(settings), signature=component.signature)


def _healthy(settings: Settings, component: Component, auth: str | None) -> bool:
    """One health probe of a non-Celery component."""
    match component.health:
        case Health.REDIS_PING:
            return health.redis_ping(settings)
        case Health.S3_LIVE:
            return health.s3_live(settings)
        case Health.FLOWER_API:
            return health.flower_api(settings, auth)
        case Health.HTTP_HEALTHZ:
            return health.http_ok(f"http://{settings.host}:{component.port}/healthz")
        case _:
            return True  # PID: alive is healthy


def _fail(settings: Settings, component: Component, reason: str, log: bool = True) -> StackError:
    proc = _process(settings, component)
    return StackError(component.name, reason, proc.tail(20) if log else "", proc.log_file)


def _launch(settings: Settings, component: Component, report: Reporter) -> ManagedProcess:
    """Start ``component`` unless it runs already (its port must be free to start it)."""
    proc = _process(settings, component)
    pid = proc.pid()
    if pid is not None:
        report(component.name, f"already running (pid {pid})")
        return proc
    for port in (component.port, *component.extra_ports):
        if port is not None and port_in_use(port, settings.host):
            raise _fail(settings, component, f"port {settings.host}:{port} is already in use", log=False)
    if component.role == "redis":
        write_redis_config(settings, data_dir(settings, "redis"))
    elif component.role == "s3":
        format_s3(data_dir(settings, "s3"))
    env = child_env(settings)
    env.update(component.env)
    pid = proc.start(component.argv, env=env, cwd=settings.state_path, inherit_env=False)
    report(component.name, f"started (pid {pid})")
    return proc


def _ensure_bucket(settings: Settings, component: Component) -> None:
    try:
        ensure_bucket_ready(settings, SERVER_TIMEOUT_S)
    except (S3Error, urllib3.exceptions.HTTPError) as error:
        raise _fail(settings, component, f"bucket set-up failed: {error}") from error


def _wait_healthy(
    settings: Settings,
    started: Sequence[tuple[Component, ManagedProcess]],
    timeout: float,
    report: Reporter,
) -> None:
    """Wait until every component in ``started`` is healthy; raise if one dies or times out."""
    auth = flower_auth(settings)
    pending = {c.name: (c, p) for c, p in started}
    end = time.monotonic() + timeout
    while pending:
        for component, proc in list(pending.values()):
            if proc.pid() is None:
                raise _fail(settings, component, "exited during start-up")
        nodes = {c.node: n for n, (c, _) in pending.items() if c.health is Health.CELERY_PING}
        answered = health.celery_ping(settings, [n for n in nodes if n]) if nodes else set()
        for node in answered:
            del pending[nodes[node]]
            report(nodes[node], "healthy")
        for name, (component, _) in list(pending.items()):
            if component.health is not Health.CELERY_PING and _healthy(settings, component, auth):
                del pending[name]
                report(name, "healthy")
        if not pending:
            return
        if time.monotonic() > end:
            component = next(iter(pending.values()))[0]
            raise _fail(settings, component, f"not healthy after {timeout:.0f} s")
        time.sleep(0.2)


def up(
    settings: Settings,
    skip: Collection[str] = (),
    timeout: float = 120.0,
    report: Reporter = _quiet,
) -> list[Component]:
    """Bring the stack of ``settings`` up and wait until it is healthy.

    Returns the components of the stack. Raises :class:`StackError` after stopping every
    component again when one of them fails to start.
    """
    with _exclusive(settings):
        return _up(settings, skip, timeout, report)


def _up(settings: Settings, skip: Collection[str], timeout: float, report: Reporter) -> list[Component]:
    comps = stack_components(settings, skip, create_secrets=True)
    if settings.flower_password is None and any(c.role == "flower" for c in comps):
        report("flower", f"basic-auth password in {flower_password_file(settings)}")
    try:
        for component in (c for c in comps if c.tier is Tier.SERVER):
            proc = _launch(settings, component, report)
            _wait_healthy(settings, [(component, proc)], SERVER_TIMEOUT_S, report)
            if component.role == "s3":
                _ensure_bucket(settings, component)
                report("s3", f"bucket {settings.raw_bucket!r} and its notification ready")
        fleet = [c for c in comps if c.tier is Tier.FLEET]
        started = [(c, _launch(settings, c, report)) for c in fleet]
        _wait_healthy(settings, started, timeout, report)
    except BaseException:
        _down(settings, report, 20.0)
        raise
    return comps


def down(settings: Settings, report: Reporter = _quiet, timeout: float = 20.0) -> list[str]:
    """Stop every component of the stack recorded in its pid files, fleet first, in reverse
    start order; return the names of those stopped."""
    with _exclusive(settings):
        return _down(settings, report, timeout)


def _down(settings: Settings, report: Reporter, timeout: float) -> list[str]:
    comps = stack_components(settings)
    # A component of a stack started with more detector workers than configured now.
    known = {c.name for c in comps}
    rundir = run_dir(settings)
    extra = sorted(p.stem for p in rundir.glob("detector-*.pid") if p.stem not in known)
    stopped: list[str] = []
    fleet = [c for c in comps if c.tier is Tier.FLEET]
    fleet_procs = [_process(settings, c) for c in reversed(fleet)]
    fleet_procs += [ManagedProcess(name, rundir, signature=f"-n {name}@") for name in extra]
    signalled = [(proc, proc.signal_group(signal.SIGTERM)) for proc in fleet_procs]
    for proc, pid in signalled:
        if pid is not None:
            proc.wait_stopped(pid, timeout)
            stopped.append(proc.name)
            report(proc.name, f"stopped (pid {pid})")
    for component in reversed([c for c in comps if c.tier is Tier.SERVER]):
        proc = _process(settings, component)
        pid = proc.pid()
        if proc.stop(timeout):
            stopped.append(proc.name)
            report(proc.name, f"stopped (pid {pid})")
    return stopped


def status(settings: Settings, skip: Collection[str] = ()) -> list[ComponentStatus]:
    """Pid, port and health of every component of the stack of ``settings``."""
    comps = stack_components(settings, skip)
    auth = flower_auth(settings)
    pids = {c.name: _process(settings, c).pid() for c in comps}
    redis_up = pids.get("redis") is not None and health.redis_ping(settings)
    nodes = [c.node for c in comps if c.node and pids[c.name] is not None]
    answered = health.celery_ping(settings, nodes, timeout=1.5) if redis_up and nodes else set()
    out = []
    for component in comps:
        pid = pids[component.name]
        if pid is None:
            state = "stopped"
        elif component.health is Health.CELERY_PING:
            state = "healthy" if component.node in answered else "unhealthy"
        else:
            state = "healthy" if _healthy(settings, component, auth) else "unhealthy"
        out.append(
            ComponentStatus(
                component.name, component.role, pid, component.port, state,
                component.health.value, str(_process(settings, component).log_file),
            )
        )
    return out
