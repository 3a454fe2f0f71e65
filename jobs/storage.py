"""Object storage behind one interface: S3 (any S3-compatible endpoint) or a local folder.

Both backends tell a missing object (KeyError) from a storage that cannot be reached or failed
on its side (StorageUnavailable): the first is an answer, the second is worth trying again.
"""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

from jobs.settings import Settings

# botocore's defaults (60 s to connect, 60 s per read, 5 attempts) hold a request for minutes
# against a dead endpoint; an API request must fail over to a 503 in seconds. Reads wait longer
# than connects: a busy S3 may be slow to send its first byte, but it accepts at once.
S3_CLIENT_CONFIG = Config(
    connect_timeout=2,
    read_timeout=10,
    retries={"mode": "standard", "total_max_attempts": 3},
)
# Errors S3 answers for itself that a later attempt may not get (SlowDown is a 503, and
# RequestTimeout a 400 about the connection, not the request).
# A missing bucket is the storage misconfigured or restarted empty, not a missing object: an
# outage, to be waited out, never a job's or a file's loss.
_TRANSIENT_S3_CODES = {
    "RequestTimeout",
    "SlowDown",
    "Throttling",
    "ServiceUnavailable",
    "NoSuchBucket",
}
_MISSING_S3_CODES = {"NoSuchKey", "NotFound", "404"}


class StorageUnavailable(ConnectionError):
    """The storage cannot be reached, or failed on its side. An OSError, so that code which
    gives work back on I/O errors gives it back on this too."""


class Storage(Protocol):
    """Every method raises StorageUnavailable when the storage is down; `get_bytes` and `open`
    raise KeyError for an object that is not there."""

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_stream(self, key: str, stream: BinaryIO) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object, for reading it in pieces; KeyError if absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...


# Connection refused, reset or timed out, and a body cut short.
_UNREACHABLE = (StorageUnavailable, HTTPClientError, BotoConnectionError, IncompleteReadError)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc`, raised by a storage call or a read of an object's stream, means the
    storage is down or failing on its side rather than a missing object or a bug."""
    if isinstance(exc, _UNREACHABLE):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or error.get("Code") in _TRANSIENT_S3_CODES
    return False


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        # A root that vanished after start-up is a volume unmounted or lost, not an empty
        # store: every key would read as missing, and writes would land beside the volume.
        if not self.root.is_dir():
            raise StorageUnavailable(f"the storage folder {self.root} is gone")
        return path

    @contextmanager
    def _os_errors(self, key: str | None = None) -> Iterator[None]:
        """The folder's OS errors as the interface names them: a missing object (when reading
        `key`) is KeyError, and any other (I/O error, disk full, permissions) means the
        storage cannot serve for now."""
        try:
            yield
        except StorageUnavailable:
            raise
        except FileNotFoundError as exc:
            if key is not None and self.root.is_dir():
                raise KeyError(key) from exc
            raise StorageUnavailable(f"the storage folder failed: {exc}") from exc
        except OSError as exc:
            raise StorageUnavailable(f"the storage folder failed: {exc}") from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._os_errors():
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        with self._os_errors():
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("wb") as out:
                shutil.copyfileobj(stream, out, 1024 * 1024)
            tmp.replace(path)

    def get_bytes(self, key: str) -> bytes:
        with self._os_errors(key):
            return self._path(key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        with self._os_errors(key):
            return self._path(key).open("rb")

    def exists(self, key: str) -> bool:
        with self._os_errors():
            return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with self._os_errors():
            self._path(key).unlink(missing_ok=True)


def _s3_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def _s3_errors() -> Iterator[None]:
    try:
        yield
    except (ClientError, *_UNREACHABLE) as exc:
        if is_unavailable(exc):
            raise StorageUnavailable(f"object storage failed: {exc}") from exc
        raise


class S3Storage:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, region: str) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=S3_CLIENT_CONFIG
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def ensure_bucket(self) -> None:
        with _s3_errors():
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                # Only a bucket that is not there is made; an outage is not a missing bucket.
                if _s3_code(exc) not in _MISSING_S3_CODES:
                    raise
                self.client.create_bucket(Bucket=self.bucket)

    def put_bytes(self, key: str, data: bytes) -> None:
        with _s3_errors():
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        # Multipart upload in parts: the stream is never held in memory whole.
        with _s3_errors():
            self.client.upload_fileobj(stream, self.bucket, self._key(key))

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as body, _s3_errors():
            return bytes(body.read())

    def open(self, key: str) -> BinaryIO:
        with _s3_errors():
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _s3_code(exc) in ("NoSuchKey", "404"):
                    raise KeyError(key) from exc
                raise
        return response["Body"]  # type: ignore[no-any-return]

    def exists(self, key: str) -> bool:
        with _s3_errors():
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                # A storage that is down must not read as one without the object.
                if _s3_code(exc) not in _MISSING_S3_CODES:
                    raise
                return False
        return True

    def delete(self, key: str) -> None:
        with _s3_errors():
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def result_key(job_id: str) -> str:
    """Where a job's result is kept when it is too large for its row (or holds a NUL): one
    object per job, deleted with the job."""
    return f"results/{job_id}.txt"


def sample_result_key(job_id: str, index: int) -> str:
    """Where sample `index` (1 or more) of a job that asked for n samples is kept when it is
    too large for the job's `choices` (or holds a NUL); sample 0 is the job's own result."""
    return f"results/{job_id}.{index}.txt"


def storage_from_settings(settings: Settings) -> Storage:
    """`s3://bucket/prefix` or `file://path` (relative paths are relative to the cwd)."""
    url = urlparse(settings.storage_url)
    if url.scheme == "s3":
        storage = S3Storage(url.netloc, url.path, settings.s3_endpoint_url, settings.s3_region)
        storage.ensure_bucket()
        return storage
    if url.scheme == "file":
        return LocalStorage(Path(url.netloc + url.path))
    raise ValueError(
        f"MBATCH_STORAGE_URL must be s3://... or file://..., got {settings.storage_url}"
    )
