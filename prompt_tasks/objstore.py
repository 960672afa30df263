"""The raw bucket: S3 client, bucket creation and its event notification.

The notification sends every object-created event of the raw bucket to the notification
target ``settings.event_arn`` (MinIO's Redis target, which pushes to the ``bucketevents``
list). Setting it up is idempotent, so every start of the stack can call it.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import S3Error
from minio.notificationconfig import NotificationConfig, QueueConfig

from prompt_tasks.settings import Settings

__all__ = ["ensure_bucket", "health_live", "make_client", "wait_live"]

NOTIFICATION_ID = "prompt-tasks-raws"


def make_client(settings: Settings) -> Minio:
    """An S3 client for ``settings.s3_url`` with short timeouts and a few quick retries."""
    parts = urlsplit(settings.s3_url)
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=2.0, read=30.0),
        maxsize=32,
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
    )
    return Minio(
        parts.netloc,
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=parts.scheme == "https",
        http_client=http,
    )


def health_live(settings: Settings, timeout: float = 1.0) -> bool:
    """True when the S3 server answers ``/minio/health/live``."""
    try:
        resp = urllib3.request(
            "GET", f"{settings.s3_url}/minio/health/live", timeout=timeout, retries=False
        )
    except urllib3.exceptions.HTTPError:
        return False
    return resp.status == 200


def wait_live(settings: Settings, timeout: float = 30.0) -> bool:
    """Wait up to ``timeout`` s for the S3 server to be live."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if health_live(settings):
            return True
        time.sleep(0.1)
    return False


def ensure_bucket(
    client: Minio, settings: Settings, notify: bool = True, timeout: float = 15.0
) -> None:
    """Create the raw bucket if missing and (re)set its object-created notification.

    A gateway that has just started may not have registered its notification target yet
    and answers "ARN does not exist"; that is retried for up to ``timeout`` seconds.
    """
    bucket = settings.raw_bucket
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    if notify:
        config = NotificationConfig(
            queue_config_list=[
                QueueConfig(
                    ["s3:ObjectCreated:*"], config_id=NOTIFICATION_ID, queue=settings.event_arn
                )
            ]
        )
        end = time.monotonic() + timeout
        while True:
            try:
                client.set_bucket_notification(bucket, config)
                return
            except S3Error as exc:
                if "arn" not in str(exc).lower() or time.monotonic() > end:
                    raise
                time.sleep(0.2)
    else:
        client.delete_bucket_notification(bucket)
