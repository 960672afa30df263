"""Helpers of the fault and scale-out tests: real worker processes, visits, raws, polling.

Worker processes are started in their own session (so a SIGKILL of the group takes the pool
children too, as a crashed host would) and stopped by the pids recorded here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from prompt_tasks.model.objectkeys import format_key
from prompt_tasks.model.visit import NextVisit, tai_now
from prompt_tasks.settings import Settings
from prompt_tasks.stack.env import child_env
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import fault_key
from workers import ROLES, celery_argv

_groups = itertools.count()
#: The queues of the auxiliary worker (the wait, summary and beat-job roles in one process).
AUX_QUEUES = ("wait", "summary", "default", "export")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something true; that value (AssertionError at timeout)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            value = None
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not reached within {timeout} s: {what}")


def new_group(prefix: str = "2026-11-24T04") -> str:
    """A fresh group id.

    Its milliseconds come from the process id but are never ``000``: other tests name groups
    ``...04:00:NN.000`` by hand, and a run whose pid ended in 000 could reuse their raws.
    """
    n = next(_groups)
    return f"{prefix}:{n // 60:02d}:{n % 60:02d}.{os.getpid() % 999 + 1:03d}"


def make_visit(instrument: str, nimages: int = 1, start_in: float = 0.0, duration: float = 0.0,
               group: str | None = None) -> NextVisit:
    """A next_visit starting ``start_in`` s from now."""
    return NextVisit.model_validate({
        "instrument": instrument, "groupId": group or new_group(), "startTime": tai_now() + start_in,
        "duration": duration, "nimages": nimages,
    })


def cheap_stages(client: redis.Redis, visit: NextVisit, ttl: int = 600) -> None:
    """Make prepare, ingest and run succeed at once for every detector of ``visit`` (fault ``pass``)."""
    for stage in ("prepare", "ingest", "run"):
        client.set(fault_key(visit.instrument, visit.groupId, "*", stage), "pass", ex=ttl)


def raw_key(visit: NextVisit, detector: int, snap: int = 0) -> str:
    """The DMTN-219 key of one raw of ``visit``."""
    return format_key(visit.instrument, detector, visit.groupId, snap)


def put_raw(settings: Settings, visit: NextVisit, detector: int, snap: int = 0) -> str:
    """PUT a small object as one raw of ``visit`` into the raw bucket; its key."""
    import io

    from prompt_tasks.objstore import make_client

    key = raw_key(visit, detector, snap)
    body = b"SIMPLE  =                    T" + b" " * 50
    make_client(settings).put_object(settings.raw_bucket, key, io.BytesIO(body), len(body))
    return key


def summary_of(client: redis.Redis, visit: NextVisit) -> dict[str, Any] | None:
    """The visit's summary from the ledger, or None."""
    record = ledger.read_visit(client, visit.instrument, visit.groupId)
    return record.summary if record is not None else None


class Fleet:
    """Worker subprocesses on the settings' servers, by index; logs in ``log_dir``."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: Wraps every command line (e.g. to start it in a mount namespace of its own: a "host").
        self.wrap: Callable[[list[str]], list[str]] | None = None

    def _spawn(self, name: str, argv: Sequence[str], env_overrides: dict[str, str] | None = None) -> None:
        env = child_env(self.settings)
        env.update(env_overrides or {})
        with open(self.log_dir / f"{name}.log", "ab") as out:
            command = self.wrap(list(argv)) if self.wrap is not None else list(argv)
            self.procs[name] = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True, cwd=self.log_dir)

    def detector(self, index: int, *extra: str, host: str | None = None, queues: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> str:
        """Start compute worker ``index`` (the project's role command line); its node name.

        ``host`` replaces the machine's name in the node name (a second "host"); ``queues``
        are consumed from the start besides ``catchup`` (else the controller assigns them).
        """
        argv = celery_argv(ROLES["detector"], index=index, loglevel="WARNING") + list(extra)
        node = f"detector-{index}@{host}" if host else None
        if node:
            argv[argv.index("-n") + 1] = node
        if queues:
            argv[argv.index("-Q") + 1] = ",".join(["catchup", *queues])
        self._spawn(f"detector-{index}", argv, env)
        return node or f"detector-{index}@"

    def aux(self, queues: Sequence[str] = AUX_QUEUES) -> str:
        """Start the auxiliary worker (threads) on ``queues``; its node name."""
        node = "aux@faults"
        argv = [sys.executable, "-m", "celery", "-A", "prompt_tasks", "worker", "-n", node,
                "-Q", ",".join(queues), "-P", "threads", "-c", "16", "--loglevel=WARNING"]
        self._spawn("aux", argv)
        return node

    def role(self, role: str) -> str:
        """Start the worker of ``role`` with the project's own command (``prompt-tasks worker``)."""
        script = Path(sys.executable).parent / "prompt-tasks"
        self._spawn(role, [str(script), "worker", role, "--loglevel", "WARNING"])
        return f"{role}@"

    def dispatcher(self) -> None:
        """Start the bucket-event dispatcher process."""
        script = Path(sys.executable).parent / "prompt-tasks"
        self._spawn("dispatcher", [str(script), "dispatcher", "--loglevel", "WARNING"])

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process group we started for ``name`` and reap it."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop_all(self) -> None:
        """SIGTERM every process we started (SIGKILL after 30 s)."""
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def logs(self) -> str:
        """Every log file written so far."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


@contextlib.contextmanager
def fleet_of(settings: Settings, log_dir: Path) -> Iterator[Fleet]:
    """A :class:`Fleet` whose processes are all stopped when the block ends."""
    started = Fleet(settings, log_dir)
    try:
        yield started
    finally:
        started.stop_all()


def node_alive(app: Any, prefix: str, n: int = 1, timeout: float = 1.0) -> bool:
    """True when at least ``n`` workers whose node names start with ``prefix`` answer a ping."""
    replies = app.control.ping(timeout=timeout) or []
    return sum(1 for reply in replies for node in reply if node.startswith(prefix)) >= n
