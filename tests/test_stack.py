"""The embedded stack: ``prompt-tasks stack up | status | down`` against the real processes.

The slow tests run the CLI as a subprocess (as a user would) on a private state directory
and free ports, then check the processes themselves through ``/proc``.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest

from prompt_tasks.cli import main
from prompt_tasks.settings import Settings
from prompt_tasks.stack.components import Health, Tier, components
from prompt_tasks.stack.env import child_env, settings_env
from prompt_tasks.stack.launcher import flower_auth, flower_password_file, status
from prompt_tasks.stack.servers import free_port, port_in_use
from tests.servers import test_settings as make_settings
from workers import CELERY_ROLES, ROLES

PROMPT_TASKS = str(Path(sys.executable).parent / "prompt-tasks")


# --- pure parts ---------------------------------------------------------------------------


def test_components_cover_every_role_in_start_order(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, detector_workers=3)
    comps = components(settings, "admin:pw")
    names = [c.name for c in comps]
    assert names[:2] == ["redis", "s3"]
    assert all(c.tier is Tier.SERVER for c in comps[:2])
    assert all(c.tier is Tier.FLEET for c in comps[2:])
    assert {c.role for c in comps} == set(ROLES) | {"redis", "s3"}
    assert [c.node for c in comps if c.role == "detector"] == ["detector-1", "detector-2", "detector-3"]
    assert len(set(names)) == len(names)
    assert names[-1] == "intake"  # the intake sends work: everything else is up before it
    assert sum(c.role == "beat" for c in comps) == 1
    by_name = {c.name: c for c in comps}
    assert by_name["flower"].env == {"FLOWER_BASIC_AUTH": "admin:pw"}
    assert by_name["intake"].health is Health.HTTP_HEALTHZ
    for comp in comps:
        assert "pw" not in " ".join(comp.argv)  # secrets never on a command line
        if comp.role in CELERY_ROLES:
            assert comp.health is Health.CELERY_PING


def test_no_password_in_any_argv(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, redis_password="red-secret", s3_secret_key="s3-secret")
    for comp in components(settings, "admin:flower-secret"):
        line = " ".join(comp.argv)
        assert "secret" not in line, comp.name


def test_settings_round_trip_through_env(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, redis_password="pw", detector_workers=5, redis_aof=True)
    env = settings_env(settings)
    assert all(name.startswith("PROMPT_TASKS_") for name in env)
    assert env["PROMPT_TASKS_STATE_DIR"] == str(settings.state_path)
    assert Settings(**{k.removeprefix("PROMPT_TASKS_").lower(): v for k, v in env.items()}) == settings


def test_child_env_drops_inherited_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    env = child_env(settings, {"PATH": "/bin", "PROMPT_TASKS_BROKER_URL": "redis://elsewhere/0"})
    assert env["PATH"] == "/bin"
    assert "PROMPT_TASKS_BROKER_URL" not in env
    assert env["PROMPT_TASKS_REDIS_PORT"] == str(settings.redis_port)


# --- the real stack -----------------------------------------------------------------------


def _unregistered_commands() -> list[str]:
    """Roles run as ``prompt-tasks <role>`` whose command is not registered (yet)."""
    return [name for name, role in ROLES.items() if role.kind == "process"
            and main.get_command(click.Context(main), name) is None]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _group_members(pgid: int) -> set[int]:
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            members.add(int(stat.parent.name))
    return members


class Stack:
    """The CLI of one private stack."""

    def __init__(self, settings: Settings, skip: list[str]) -> None:
        self.settings = settings
        self.skip = skip
        self.env = child_env(settings) | {"COLUMNS": "200"}

    def run(self, *args: str, skip: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        extra = [f"--skip={name}" for name in self.skip] if skip else []
        return subprocess.run(
            [PROMPT_TASKS, *args, *extra], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    def status(self) -> list[dict[str, object]]:
        out = self.run("stack", "status", "--json")
        return list(json.loads(out.stdout))

    def pids(self) -> dict[str, int]:
        return {str(r["name"]): int(str(r["pid"])) for r in self.status() if r["pid"] is not None}

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.run("stack", "down", skip=False)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    settings = make_settings(tmp_path / "state", detector_workers=1, flower_password="flower-pw")
    cli = Stack(settings, _unregistered_commands())
    yield cli
    cli.down()


@pytest.mark.slow
def test_up_status_ping_up_again_down(stack: Stack) -> None:
    # two `up` at once: one starts the stack, the other finds it running
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: stack.run("stack", "up"), range(2))
    for up in (first, second):
        assert up.returncode == 0, up.stdout + up.stderr
    assert ("started (pid" in first.stdout) != ("started (pid" in second.stdout)
    up = first if "started (pid" in first.stdout else second
    rows = stack.status()
    assert {r["name"]: r["health"] for r in rows} == {r["name"]: "healthy" for r in rows}
    assert "flower-pw" not in up.stdout + up.stderr
    pids = stack.pids()
    assert set(pids) >= {"redis", "s3", "detector-1", "wait", "summary", "beat", "flower"}

    # every worker role answers `celery inspect ping`
    ping = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "prompt_tasks", "inspect", "ping", "--json", "--timeout=5"],
        env=stack.env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    nodes = {name.split("@")[0] for name in json.loads(ping.stdout.strip().splitlines()[-1])}
    assert nodes == {"detector-1", *(role for role in CELERY_ROLES if role != "detector")}

    # the main job on the running stack: a PUT, its event indexed by the dispatcher, health
    demo = stack.run("demo", "--skip=night")  # the simulated night: tests/test_visit_e2e.py
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "already up" in demo.stdout and "The stack is healthy" in demo.stdout
    if "dispatcher" not in stack.skip:
        assert "indexed by the dispatcher in the arrivals index" in demo.stdout

    # up twice starts nothing new
    again = stack.run("stack", "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "started (pid" not in again.stdout
    assert stack.pids() == pids

    members = set().union(*(_group_members(pid) for pid in pids.values()))
    assert members > set(pids.values())  # e.g. the prefork pool children
    down = stack.down()
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [pid for pid in members if _alive(pid)]
    assert not list((stack.settings.state_path / "run").glob("*.pid"))
    assert all(r["health"] == "stopped" for r in stack.status())


@pytest.mark.slow
def test_stale_pid_files_recover(stack: Stack) -> None:
    run = stack.settings.state_path / "run"
    run.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stranger = subprocess.Popen(["sleep", "120"])  # an unrelated live process reusing a pid
    try:
        (run / "redis.pid").write_text(f"{dead.pid}\n")
        (run / "s3.pid").write_text(f"{stranger.pid}\n")  # command line is not the gateway's
        (run / "dispatcher.pid").write_text(f"{stranger.pid} 1\n")  # another start time
        (run / "beat.pid").write_text("not a pid\n")
        stack.skip += ["detector", "wait", "summary", "flower"]
        up = stack.run("stack", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        pids = stack.pids()
        assert set(pids) == {"redis", "s3", "beat", "dispatcher", "intake"} - set(stack.skip)
        assert pids["redis"] != dead.pid and stranger.pid not in pids.values()
        assert stack.down().returncode == 0
        assert stranger.poll() is None  # never signal what we did not start
        assert not [pid for pid in pids.values() if _alive(pid)]
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.slow
def test_failing_component_stops_the_rest(stack: Stack) -> None:
    with socket.socket() as squatter:
        squatter.bind((stack.settings.host, stack.settings.flower_port))
        squatter.listen()
        up = stack.run("stack", "up")
    assert up.returncode != 0
    assert "component flower" in up.stdout and "already in use" in up.stdout, up.stdout
    started = [int(pid) for pid in re.findall(r"started \(pid (\d+)\)", up.stdout)]
    assert len(started) >= 3  # redis, s3 and fleet members had started
    assert not [pid for pid in started if _alive(pid)]
    assert not list((stack.settings.state_path / "run").glob("*.pid"))


@pytest.mark.slow
def test_redis_port_taken_fails_before_anything_starts(stack: Stack) -> None:
    with socket.socket() as squatter:
        squatter.bind((stack.settings.host, stack.settings.redis_port))
        squatter.listen()
        up = stack.run("stack", "up")
    assert up.returncode != 0
    assert "component redis" in up.stdout
    assert "started (pid" not in up.stdout


def test_down_of_a_stack_never_started(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    out = subprocess.run(
        [PROMPT_TASKS, "stack", "down"], env=child_env(settings), capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert out.returncode == 0
    assert "0 processes stopped" in out.stdout


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [name for name in settings_env_names() if f"`{name}`" not in readme]
    assert not missing, f"run `make readme`: README lacks {missing}"


def settings_env_names() -> list[str]:
    return [f"PROMPT_TASKS_{name.upper()}" for name in Settings.model_fields]


def test_flower_password_generated_once_private_and_configurable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert flower_auth(settings) is None  # nothing generated by a mere look
    auth = flower_auth(settings, create=True)
    assert auth is not None and auth.startswith("admin:") and len(auth) > len("admin:") + 16
    assert flower_auth(settings, create=True) == auth
    assert flower_password_file(settings).stat().st_mode & 0o777 == 0o600
    configured = make_settings(tmp_path, flower_password="pw", flower_user="ops")
    assert flower_auth(configured) == "ops:pw"


def test_port_in_use() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert port_in_use(sock.getsockname()[1])
    assert not port_in_use(free_port())


def test_status_of_a_stack_never_started(tmp_path: Path) -> None:
    rows = status(make_settings(tmp_path))
    assert rows and all(row.health == "stopped" and row.pid is None for row in rows)
