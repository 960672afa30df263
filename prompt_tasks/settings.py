"""The one settings object of prompt-tasks.

Every setting comes from an environment variable named ``PROMPT_TASKS_<FIELD>`` (upper case),
with the default documented on the field. Settings are built once, at the edge of a process
(the CLI entry point, Celery's worker start-up, a test fixture) and passed down; importing any
module of the package reads no environment.

The defaults describe the embedded stack: everything on loopback, on ports chosen not to
clash with services that commonly run on a machine (Redis 6379, PostgreSQL 5432, RabbitMQ
5672, MinIO 9000, Flower 5555).

The embedded stack's Redis password and S3 keys are generated into the state directory on
its first ``stack up`` (:data:`STACK_SECRET_FILES`, mode 600); a secret not set explicitly is
read from there when the file exists, so every process of that state directory (the roles,
``celery -A prompt_tasks``, the CLI) finds them. An explicit setting always wins.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["STACK_SECRET_FILES", "Settings", "mask_url"]

#: Secret setting → file in the state directory holding the embedded stack's generated value.
STACK_SECRET_FILES: dict[str, str] = {
    "redis_password": "redis-password",
    "s3_access_key": "s3-access-key",
    "s3_secret_key": "s3-secret-key",
}


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs and ``config``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Settings(BaseSettings):
    """Typed settings, read from ``PROMPT_TASKS_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="PROMPT_TASKS_", extra="ignore", frozen=True)

    # --- the embedded stack -------------------------------------------------------------
    state_dir: Path = Field(Path(".state"), description="Pid files, logs and data of the embedded stack.")
    host: str = Field("127.0.0.1", description="Address every embedded server binds to.")
    redis_port: int = Field(16379, description="Port of the embedded Redis.")
    redis_password: SecretStr | None = Field(None, description="Password of Redis (requirepass); embedded: generated into <state_dir>/redis-password on first `stack up`.")
    redis_aof: bool = Field(True, description="Append-only persistence of the embedded Redis.")
    s3_port: int = Field(19000, description="Port of the embedded S3 server (JuiceFS gateway).")
    flower_port: int = Field(15555, description="Port of Flower.")
    flower_user: str = Field("admin", description="Flower basic-auth user.")
    flower_password: SecretStr | None = Field(None, description="Flower basic-auth password; none disables auth.")
    intake_port: int = Field(18080, description="Port of the next_visit HTTP intake.")
    intake_token: SecretStr | None = Field(None, description="Bearer token required by the intake, if set.")
    intake_max_body: int = Field(65536, description="Largest next_visit body the intake accepts (bytes).")
    metrics_port: int = Field(19100, description="Port of the Prometheus metrics endpoint.")
    detector_workers: int = Field(2, description="Compute worker processes the embedded stack starts.")

    task_events: bool = Field(False, description=(
        "Workers send Celery task events (and the stages' task-stage progress events) from the start. "
        "Off, they cost nothing until a monitor asks: Flower turns Celery's on every 5 s while it runs."))
    log_json: bool = Field(True, description="Structured JSON log lines (false: plain text).")
    log_level: str = Field("INFO", description="Log level of every process.")

    # --- broker and backend -------------------------------------------------------------
    broker_url: str | None = Field(None, description="Celery broker; default: the embedded Redis, db 0.")
    result_backend: str | None = Field(None, description="Celery result backend; default: embedded Redis, db 1.")
    visibility_timeout: int = Field(
        3600, description="Redis visibility timeout (s): above the longest stage's time limit (wait: 3060 s)."
    )
    restore_interval_s: int = Field(
        10, description="Seconds between kombu's sweeps returning a dead worker's unacked messages (Redis)."
    )
    max_deliveries: int = Field(3, description="Deliveries of one stage task before its detector-visit fails.")
    max_memory_per_child_kb: int = Field(
        0, description="Replace a pool process after a task leaves it above this resident size (KiB; 0: never)."
    )

    # --- object store -------------------------------------------------------------------
    s3_endpoint: str | None = Field(None, description="S3 endpoint URL; default: the embedded server.")
    s3_access_key: SecretStr = Field(SecretStr("prompt-tasks"), description="S3 access key; embedded: generated into <state_dir>/s3-access-key on first `stack up`.")
    s3_secret_key: SecretStr = Field(SecretStr("prompt-tasks-secret"), description="S3 secret key; embedded: generated into <state_dir>/s3-secret-key on first `stack up`.")
    raw_bucket: str = Field("raws", description="Bucket the camera writes raws into.")
    event_redis_url: str | None = Field(None, description="Redis holding the bucket-event list; default: embedded, db 0.")
    event_list: str = Field("bucketevents", description="Redis list MinIO pushes bucket events to.")
    event_arn: str = Field("arn:minio:sqs::1:redis", description="Notification target ARN of the bucket.")

    # --- Butler ---------------------------------------------------------------------------
    central_repo: str | None = Field(
        None, description="Central Butler repo URI (a path, or s3://bucket/dir/ for a fleet); default: <state_dir>/central."
    )
    central_bucket: str = Field("central", description="Bucket of the central repo's datastore on the S3 server.")
    central_datastore: str | None = Field(
        None,
        description="Datastore root of a central repo being created; default: s3://<central_bucket>/<repo>-<hash>/ "
        "for a repo on disk, the repo's own directory for one on S3; 'inside' keeps it in the repo directory.",
    )
    local_repo_root: Path | None = Field(None, description="Root of the per-detector local repos; default: <state_dir>/local.")
    apdb_url: str | None = Field(None, description="APDB database URL; default: SQLite under <state_dir>.")
    apdb_config: str | None = Field(
        None, description="APDB config file (a path or s3:// URI, the same for every host); default: <state_dir>/apdb-config.yaml."
    )
    pipelines_config: Path | None = Field(None, description="Pipeline selection YAML; default: each instrument's own.")
    local_cache_bytes: int = Field(2 * 1024**3, description="Preloaded datasets kept per local repo (bytes, LRU).")
    pipeline_nice: int = Field(
        10, ge=0, le=19,
        description="Nice value of the thread running a pipeline's quanta: on a busy host the next visit's "
        "prepare and ingest, and the servers, go first; 0: the same priority, in the task's thread.",
    )
    preload_pad_deg: float = Field(30 / 3600, description="Margin around a detector's predicted footprint (deg).")
    export_dataset_types: list[str] | None = Field(
        None, description="Outputs written to the central repo; default: all but logs, metadata, configs."
    )
    export_raws: bool = Field(True, description=(
        "Also register the raws in the central repo, where they are: the raw bucket's objects "
        "(not copied; the raw bucket must keep them as long as the central repo names them)."))
    export_batch: int = Field(50, description="Most detector-visits exported in one central transaction.")
    export_max_age_s: float = Field(5.0, description="Export a partial batch once its oldest request is this old (s).")
    payload: str = Field(
        "butler", description="Stage payload: 'butler' (preload, ingest, pipeline) or 'noop' (framework only)."
    )

    # --- visits ---------------------------------------------------------------------------
    active_detectors: str = Field(
        "",
        description="Active science detectors per instrument, e.g. 'MyCam=0-3,5;LSSTCam=0-188'; "
        "an instrument not named uses its plugin's list.",
    )
    ledger_ttl_s: int = Field(7 * 24 * 3600, description="How long visit ledgers are kept in Redis (s).")
    deadline_margin_s: float = Field(120.0, description="Visit deadline after its expected end (s).")
    wait_margin_s: float = Field(120.0, description="wait_for_snap timeout after the visit's expected end (s).")
    quiet_period_s: float = Field(10.0, description="nimages=0: end a wait after this long with no new snap (s).")
    wait_poll_s: float = Field(5.0, gt=0, description=(
        "Longest single block of a snap wait on its wake key (s). Arrivals, the visit's end and "
        "an abort wake a waiter at once; the slice only bounds how late a redelivered twin that "
        "lost its wake token sees its snaps. Each slice costs a few Redis round trips. At most 13 s "
        "are used (the events Redis client's read timeout, 15 s, less a margin)."))
    arrival_ttl_s: int = Field(2 * 24 * 3600, description="How long unclaimed arrivals stay indexed (s).")

    # --- operations -----------------------------------------------------------------------
    catchup_window: str = Field("08:00-18:00", description="Daytime window (UTC, HH:MM-HH:MM) of the catch-up beat job.")
    catchup_interval_s: float = Field(900.0, description="Period of the catch-up beat job (s).")
    catchup_batch: int = Field(50, description="Most detector-visits one catch-up run re-enqueues.")
    catchup_max_attempts: int = Field(3, description="Catch-up attempts of one detector-visit before it is left alone.")
    housekeeping_interval_s: float = Field(600.0, description="Period of the local-repo housekeeping broadcast (s).")
    cache_max_age_s: float = Field(7 * 24 * 3600.0, description="Preloaded datasets unused this long are dropped (s).")
    repo_idle_s: float = Field(3600.0, description="A local repo of a detector not owned here is deleted after this idle time (s).")
    fleet_metrics_interval_s: float = Field(30.0, description="Period of the queue-depth and worker-liveness job (s).")

    @model_validator(mode="after")
    def _stack_secrets(self) -> Settings:
        """Secrets not set explicitly come from the stack's generated files, when present."""
        for name, filename in STACK_SECRET_FILES.items():
            if name in self.model_fields_set:
                continue
            path = self.state_path / filename
            try:
                value = path.read_text().strip()
            except OSError:  # none generated (yet), or not ours to read
                continue
            if value:
                self.__dict__[name] = SecretStr(value)  # frozen: set once, while validating
        return self

    # --- derived values ---------------------------------------------------------------------
    def redis_url(self, db: int = 0) -> str:
        """URL of the embedded Redis, database ``db``."""
        auth = f":{quote(self.redis_password.get_secret_value(), safe='')}@" if self.redis_password else ""
        return f"redis://{auth}{self.host}:{self.redis_port}/{db}"

    @property
    def broker(self) -> str:
        """The effective Celery broker URL."""
        return self.broker_url or self.redis_url(0)

    @property
    def backend(self) -> str:
        """The effective Celery result backend URL."""
        return self.result_backend or self.redis_url(1)

    @property
    def events_redis(self) -> str:
        """URL of the Redis where bucket events and the arrivals index live."""
        return self.event_redis_url or self.redis_url(0)

    @property
    def s3_url(self) -> str:
        """The effective S3 endpoint URL."""
        return self.s3_endpoint or f"http://{self.host}:{self.s3_port}"

    @property
    def central_datastore_uri(self) -> str | None:
        """Where a new central repo keeps its files (None: inside the repo's own directory).

        Compute workers write outputs there and every host reads it, so by default it is on
        the S3 server, in a directory of its own per repository.
        """
        if self.central_datastore == "inside" or self.central_repo_uri.startswith("s3://"):
            return None
        if self.central_datastore:
            return self.central_datastore
        digest = hashlib.sha256(self.central_repo_uri.encode()).hexdigest()[:8]
        return f"s3://{self.central_bucket}/{Path(self.central_repo_uri).name}-{digest}/"

    @property
    def state_path(self) -> Path:
        """``state_dir`` as an absolute path."""
        return self.state_dir.expanduser().resolve()

    @property
    def central_repo_uri(self) -> str:
        """The effective central Butler repository URI."""
        return self.central_repo or str(self.state_path / "central")

    @property
    def local_repo_path(self) -> Path:
        """The effective root of the local repositories."""
        return (self.local_repo_root or self.state_path / "local").expanduser().resolve()

    @property
    def apdb_uri(self) -> str:
        """The effective APDB database URL."""
        return self.apdb_url or f"sqlite:///{self.state_path / 'apdb.sqlite3'}"

    def public(self) -> dict[str, Any]:
        """Every setting, with secrets and passwords in URLs masked, JSON-ready."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, str) and "://" in value:
                value = mask_url(value)
            out[name] = value
        for name in ("broker", "backend", "events_redis", "s3_url", "central_repo_uri", "apdb_uri"):
            out[f"effective.{name}"] = mask_url(str(getattr(self, name)))
        out["effective.local_repo_path"] = str(self.local_repo_path)
        return out

    def to_json(self) -> str:
        """:meth:`public` as JSON."""
        return json.dumps(self.public(), indent=2, sort_keys=True)
