"""Processes started by prompt-tasks, known by pid file, stopped by that pid only.

Each process runs in its own session (so its process group, e.g. a Celery worker and its pool
children, can be signalled through the pid we recorded) and writes to its own log file. A pid
file whose process is gone, or whose pid now belongs to another program, is stale and ignored.

The pid file holds the pid and the process's start time (``/proc/<pid>/stat``, field 22): a
reused pid has another start time. That identity holds while a program rewrites its command
line (JuiceFS blanks its own for about 0.1 s at start-up); the command-line signature is only
the fallback for pid files without a start time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ManagedProcess"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


@dataclass
class ManagedProcess:
    """One named process with a pid file and a log file in ``run_dir``.

    ``signature`` is a fragment of the command line that identifies the program (or a tuple
    of alternatives, e.g. before and after the program execs another), used to tell our
    process from an unrelated one that reuses a stale pid.
    """

    name: str
    run_dir: Path
    signature: str | tuple[str, ...]

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """Pid of the running process, or None (a stale pid file is removed)."""
        try:
            fields = self.pid_file.read_text().split()
            pid = int(fields[0])
        except (OSError, ValueError, IndexError):
            return None
        ours = _start_time(pid) == fields[1] if len(fields) > 1 else self._matches(_cmdline(pid))
        if _is_zombie(pid) or not ours:
            self.pid_file.unlink(missing_ok=True)
            return None
        return pid

    def _matches(self, cmdline: str) -> bool:
        signatures = (self.signature,) if isinstance(self.signature, str) else self.signature
        return any(sig in cmdline for sig in signatures)

    def running(self) -> bool:
        return self.pid() is not None

    def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        inherit_env: bool = True,
    ) -> int:
        """Start ``argv`` unless already running; return its pid.

        ``env`` is added to this process's environment, or replaces it when ``inherit_env``
        is false.
        """
        pid = self.pid()
        if pid is not None:
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ) if inherit_env else {}
        full_env.update(env or {})
        with open(self.log_file, "ab") as log:
            log.write(f"\n--- start {time.strftime('%Y-%m-%dT%H:%M:%S')} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(
                list(argv),
                env=full_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid} {_start_time(proc.pid) or ''}".strip() + "\n")
        # The child is reaped by whoever waits on it; we only keep its pid.
        self._popen = proc
        return proc.pid

    def exited(self) -> bool:
        """True when a process we started in this Python process has already exited."""
        proc = getattr(self, "_popen", None)
        return proc is not None and proc.poll() is not None

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> bool:
        """Signal our process group, wait, then SIGKILL it; True if something was stopped."""
        pid = self.signal_group(sig)
        if pid is None:
            return False
        self.wait_stopped(pid, timeout)
        return True

    def signal_group(self, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` to our process group without waiting; the pid signalled, or None."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)
        return pid

    def wait_stopped(self, pid: int, timeout: float = 15.0) -> None:
        """Wait for ``pid`` (signalled by :meth:`signal_group`) to end, SIGKILL its group if it won't."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self._alive(pid):
            time.sleep(0.05)
        # Also kill what is left of the group (e.g. pool children of a worker whose main
        # process ended first).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and self._alive(pid):
            time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process itself (not its group), e.g. to simulate a crash."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, sig)

    def _alive(self, pid: int) -> bool:
        proc = getattr(self, "_popen", None)
        if proc is not None and proc.pid == pid:
            proc.poll()
        return not _is_zombie(pid)

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
