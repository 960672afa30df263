"""The raw bucket: S3 client, bucket creation, its event notification, and reading objects.

The notification sends every object-created event of the raw bucket to the notification
target ``settings.event_arn`` (MinIO's Redis target, which pushes to the ``bucketevents``
list). Setting it up is idempotent, so every start of the stack can call it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.notificationconfig import NotificationConfig, QueueConfig

from prompt_tasks.model.headers import HEADER_BYTES, fits_header, sidecar_from_bytes
from prompt_tasks.settings import Settings

__all__ = [
    "configure_s3",
    "ensure_bucket",
    "ensure_plain_bucket",
    "exists_many",
    "get_bytes",
    "header_reader",
    "health_live",
    "make_client",
    "object_checker",
    "put_bytes",
    "read_object",
    "sidecar_reader",
    "wait_live",
]

log = logging.getLogger(__name__)

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


def _get(client: Minio, bucket: str, key: str, length: int = 0) -> bytes:
    """One GET of an object (its first ``length`` bytes, all when 0), the connection given back."""
    response = client.get_object(bucket, key, offset=0, length=length)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def read_object(client: Minio, bucket: str, key: str, length: int | None = None) -> bytes | None:
    """The bytes of an object (its first ``length`` bytes when given), or None when it cannot be read.

    Missing, unreachable or refused reads as None, logged: callers decide what None means.
    """
    try:
        return _get(client, bucket, key, length or 0)
    except (MinioException, OSError, urllib3.exceptions.HTTPError) as exc:
        missing = isinstance(exc, S3Error) and exc.code == "NoSuchKey"  # e.g. a sidecar not there yet
        log.log(logging.DEBUG if missing else logging.WARNING, "%s/%s not readable: %s", bucket, key, exc)
        return None


def _bucket_and_key(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
        raise ValueError(f"not an s3://bucket/key URI: {uri}")
    return parts.netloc, parts.path.lstrip("/")


def get_bytes(client: Minio, uri: str) -> bytes:
    """The whole object at ``s3://bucket/key`` on ``client``'s server, in one GET.

    The project's own S3 I/O (raws in, outputs out) goes through this light client: a GET or PUT
    costs a quarter to a half of the client CPU of lsst-resources' boto3 one.

    Raises
    ------
    FileNotFoundError
        No such object or bucket.
    ConnectionError
        The server could not be reached or failed.
    """
    bucket, key = _bucket_and_key(uri)
    try:
        return _get(client, bucket, key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
            raise FileNotFoundError(f"{uri}: {exc.code}") from exc
        raise ConnectionError(f"{uri}: {exc.code}: {exc.message}") from exc
    except (MinioException, urllib3.exceptions.HTTPError) as exc:
        raise ConnectionError(f"{uri}: {exc}") from exc


def put_bytes(client: Minio, uri: str, data: bytes) -> None:
    """Write ``data`` at ``s3://bucket/key`` in one PUT (overwriting); any failure raises."""
    import io

    bucket, key = _bucket_and_key(uri)
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def exists_many(client: Minio, uris: Sequence[str], list_from: int = 3) -> dict[str, bool]:
    """Whether each ``s3://bucket/key`` object exists, checked through ``client``.

    The objects of a folder holding at least ``list_from`` of them are checked with one listing
    of that folder, from the first of them to the last (a batch of exports holds a whole
    visit's outputs of one dataset type in one folder: one request instead of one HEAD per
    file, on the server and here); any other object with a HEAD.

    Raises
    ------
    ConnectionError
        Some object could not be checked (server unreachable or failing): nothing is concluded.
    """
    folders: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for uri in uris:
        bucket, key = _bucket_and_key(uri)
        folders.setdefault((bucket, key.rpartition("/")[0]), []).append((uri, key))
    check = object_checker(client)
    found: dict[str, bool] = {}
    for (bucket, folder), objects in folders.items():
        if len(objects) >= list_from:
            listed = _listed_between(client, bucket, folder, min(k for _, k in objects), max(k for _, k in objects))
            found.update((uri, key in listed) for uri, key in objects)
            continue
        for uri, key in objects:
            there = check(bucket, key)
            if there is None:
                raise ConnectionError(f"{uri}: existence could not be checked")
            found[uri] = there
    return found


def _listed_between(client: Minio, bucket: str, folder: str, first: str, last: str) -> set[str]:
    """Keys of the objects directly in ``folder`` of ``bucket`` from ``first`` to ``last``
    (both keys in that folder): the listing starts just before ``first`` and stops past ``last``.

    Raises
    ------
    ConnectionError
        The listing failed.
    """
    keys: set[str] = set()
    try:
        for obj in client.list_objects(bucket, prefix=f"{folder}/" if folder else None, recursive=False,
                                       start_after=first[:-1] or None):
            if obj.is_dir:  # a subfolder (listed after a page's files): none of ours
                continue
            if obj.object_name > last:
                break
            keys.add(obj.object_name)
    except (MinioException, OSError, urllib3.exceptions.HTTPError) as exc:
        log.warning("%s/%s/ not listed: %s", bucket, folder, exc)
        raise ConnectionError(f"s3://{bucket}/{folder}/: existence could not be checked: {exc}") from exc
    return keys


def object_checker(client: Minio) -> Callable[[str, str], bool | None]:
    """``(bucket, key) -> True | False | None``: the object exists, does not, or cannot tell."""

    def exists(bucket: str, key: str) -> bool | None:
        try:
            client.stat_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"):
                return False
            log.warning("%s/%s not checked: %s", bucket, key, exc)
            return None
        except (MinioException, OSError, urllib3.exceptions.HTTPError) as exc:
            log.warning("%s/%s not checked: %s", bucket, key, exc)
            return None
        return True

    return exists


def sidecar_reader(client: Minio) -> Callable[[str, str], Mapping[str, Any] | None]:
    """``(bucket, key) -> sidecar dict or None``: an image without one is parked until it comes."""
    return lambda bucket, key: sidecar_from_bytes(read_object(client, bucket, key))


def header_reader(client: Minio) -> Callable[[str, str], Mapping[str, Any] | None]:
    """``(bucket, key) -> FITS primary header or None``, with one ranged GET."""
    return lambda bucket, key: fits_header(read_object(client, bucket, key, HEADER_BYTES) or b"") or None


def configure_s3(settings: Settings) -> None:
    """Point lsst-resources' S3 client (``s3://`` URIs of Butler repos and raws) at our S3 server.

    lsst-resources reads these variables when it makes a client, so every process that opens
    a Butler repository calls this first (:class:`prompt_tasks.butler.localrepo.Repos` does).
    """
    os.environ["S3_ENDPOINT_URL"] = settings.s3_url
    os.environ["AWS_ACCESS_KEY_ID"] = settings.s3_access_key.get_secret_value()
    os.environ["AWS_SECRET_ACCESS_KEY"] = settings.s3_secret_key.get_secret_value()


def ensure_plain_bucket(client: Minio, bucket: str) -> None:
    """Create ``bucket`` if missing (no event notification: nothing there is a raw)."""
    if not client.bucket_exists(bucket):
        try:
            client.make_bucket(bucket)
        except S3Error as exc:  # made by another process meanwhile
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
