"""S3 store (AWS S3, SeaweedFS, MinIO, ...) on the `minio` client.

Credentials come only from the environment (see `settings_from_env`); they are never logged and
never part of a `repr`. Atomic writes rely on S3 semantics: a single PUT replaces an object
atomically, and an object written by multipart upload (anything larger than `part_size`) only
becomes visible when CompleteMultipartUpload succeeds, so an upload interrupted mid-way, even by
SIGKILL, leaves the key absent (or its previous version intact). minio aborts the upload when the
writer raises; after a hard kill the orphaned parts stay invisible until a bucket lifecycle rule
(AbortIncompleteMultipartUpload) removes them.

`python -m alignlab.storage.s3 s3://bucket/key` copies one object to stdout; this is the command
`alignlab.storage.url_for_webdataset` hands to webdataset.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, TypeVar
from urllib.parse import urlparse

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import MIN_PART_SIZE, check_bucket_name

from alignlab.storage.base import (DEFAULT_PART_SIZE, ObjectInfo, RetryPolicy, S3_SCHEME, call_with_retries,
                                   check_key, check_range, checked_range, split_s3_uri)
from alignlab.storage.local import CHUNK, iter_chunks, write_atomically

ACCESS_KEY_VARS = ("AWS_ACCESS_KEY_ID", "MINIO_ACCESS_KEY")
SECRET_KEY_VARS = ("AWS_SECRET_ACCESS_KEY", "MINIO_SECRET_KEY")
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
AWS_ENDPOINT = "https://s3.amazonaws.com"

NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "ResourceNotFound"}
DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                "ExpiredToken", "InvalidToken"}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "RequestTimeout", "InternalError", "ServiceUnavailable"}
TRANSIENT_NETWORK_ERRORS = (ConnectionError, TimeoutError, urllib3.exceptions.ProtocolError,
                            urllib3.exceptions.NewConnectionError, urllib3.exceptions.TimeoutError)

T = TypeVar("T")


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom to connect; the key fields are excluded from repr."""

    endpoint: str
    region: str | None
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def _first_set(names: tuple[str, ...], environ: Mapping[str, str]) -> str | None:
    return next((environ[name] for name in names if environ.get(name)), None)


def settings_from_env(environ: Mapping[str, str] | None = None) -> S3Settings:
    """Read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or MINIO_ACCESS_KEY / MINIO_SECRET_KEY),
    optional AWS_SESSION_TOKEN, endpoint from AWS_ENDPOINT_URL or S3_ENDPOINT_URL (default AWS) and
    optional region from AWS_REGION / AWS_DEFAULT_REGION."""
    environ = os.environ if environ is None else environ
    access_key = _first_set(ACCESS_KEY_VARS, environ)
    secret_key = _first_set(SECRET_KEY_VARS, environ)
    if not access_key or not secret_key:
        missing = "access key" if not access_key else "secret key"
        raise ValueError(f"S3 {missing} missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                         "MINIO_ACCESS_KEY and MINIO_SECRET_KEY) in the environment")
    endpoint = _first_set(ENDPOINT_VARS, environ) or AWS_ENDPOINT
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
        raise ValueError(f"S3 endpoint {endpoint!r} (from AWS_ENDPOINT_URL / S3_ENDPOINT_URL) must look like "
                         "http://host:port or https://host, without a path")
    region = _first_set(REGION_VARS, environ)
    if region is None and endpoint != AWS_ENDPOINT:
        # Self-hosted servers ignore the region; naming one saves minio a GetBucketLocation round trip.
        region = "us-east-1"
    return S3Settings(endpoint=endpoint.rstrip("/"), region=region, access_key=access_key,
                      secret_key=secret_key, session_token=environ.get("AWS_SESSION_TOKEN") or None)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network failures, 5xx, 429 and S3's throttling codes. 4xx never is."""
    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_CODES or exc.response.status >= 500 or exc.response.status == 429
    if isinstance(exc, ServerError):
        return exc.status_code >= 500 or exc.status_code == 429
    if isinstance(exc, InvalidResponseError):
        # A non-XML error page (e.g. a proxy's 502); minio keeps the status only in `_code`.
        status = getattr(exc, "_code", 0) or 0
        return status >= 500 or status == 429
    return isinstance(exc, TRANSIENT_NETWORK_ERRORS)


_POOLS: dict[int, urllib3.PoolManager] = {}


def _http_pool() -> urllib3.PoolManager:
    """One connection pool per process (pools must not cross fork(), e.g. into DataLoader workers).
    urllib3's own retries are off so that `RetryPolicy` is the only retry layer."""
    pid = os.getpid()
    if pid not in _POOLS:
        _POOLS[pid] = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=300), maxsize=16, retries=False,
            cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where())
    return _POOLS[pid]


class S3Store:
    """Objects under `s3://<bucket>/<prefix>`; keys are relative to that prefix."""

    def __init__(self, settings: S3Settings, bucket: str, prefix: str = "", retry: RetryPolicy = RetryPolicy(),
                 part_size: int = DEFAULT_PART_SIZE):
        self.root = S3_SCHEME + bucket + (f"/{prefix.strip('/')}" if prefix.strip("/") else "")
        try:
            check_bucket_name(bucket, strict=True)
        except ValueError as exc:
            raise ValueError(f"{self.root}: invalid bucket name {bucket!r} ({exc}); S3 bucket names are "
                             "3-63 lowercase letters, digits, dots and hyphens") from None
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size={part_size} is below S3's minimum multipart part size {MIN_PART_SIZE}")
        self.settings, self.bucket, self.retry, self.part_size = settings, bucket, retry, part_size
        self.prefix = check_key(prefix.strip("/")) + "/" if prefix.strip("/") else ""
        self._client_and_pid: tuple[Minio, int] | None = None

    def __repr__(self) -> str:
        return f"S3Store(root={self.root!r}, endpoint={self.settings.endpoint!r})"

    def __reduce__(self):
        # Pickling (e.g. a dataset sent to a spawned DataLoader worker) must never carry the credentials:
        # the copy keeps endpoint, region, bucket and policies and reads the keys from its own environment.
        return (_unpickle_store, (self.settings.endpoint, self.settings.region, self.bucket, self.prefix,
                                  self.retry, self.part_size))

    @property
    def _client(self) -> Minio:
        # Rebuilt after fork so a worker process never reuses its parent's sockets.
        if self._client_and_pid is None or self._client_and_pid[1] != os.getpid():
            parsed = urlparse(self.settings.endpoint)
            client = Minio(parsed.netloc, access_key=self.settings.access_key,
                           secret_key=self.settings.secret_key, session_token=self.settings.session_token,
                           secure=parsed.scheme == "https", region=self.settings.region,
                           http_client=_http_pool())
            self._client_and_pid = (client, os.getpid())
        return self._client_and_pid[0]

    def uri(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _run(self, action: str, uri: str, operation: Callable[[], T], retry: RetryPolicy | None = None) -> T:
        retry = retry or self.retry
        try:
            return call_with_retries(operation, f"{action} {uri}", is_transient, retry)
        except Exception as exc:
            clear = self._clear_error(exc, action, uri, retry.attempts)
            if clear is None:
                raise
            raise clear from exc

    def _missing_bucket(self, uri: str) -> FileNotFoundError:
        return FileNotFoundError(f"{uri}: bucket {self.bucket!r} does not exist at {self.settings.endpoint}; "
                                 "create it or fix the bucket name")

    def _clear_error(self, exc: Exception, action: str, uri: str, attempts: int) -> Exception | None:
        """Turn a minio/network error into one naming the URI and the fix; None leaves `exc` as it is."""
        endpoint = self.settings.endpoint
        if isinstance(exc, S3Error) and exc.code == "NoSuchBucket":
            return self._missing_bucket(uri)
        if isinstance(exc, S3Error) and exc.code in NOT_FOUND_CODES:
            return FileNotFoundError(f"{uri} does not exist ({exc.code} at {endpoint})")
        if isinstance(exc, S3Error) and exc.code == "PreconditionFailed":
            return OSError(f"{uri} changed since it was indexed (its ETag no longer matches): the object was "
                           "overwritten; restart to rebuild the index, or restore the object")
        if isinstance(exc, S3Error) and exc.code == "InvalidRange":
            return OSError(f"{action} {uri}: the range starts past the end of the object (truncated, or changed "
                           "since it was indexed); re-upload it or rebuild the index")
        if isinstance(exc, S3Error) and exc.code in DENIED_CODES:
            return PermissionError(f"{action} {uri} refused by {endpoint} ({exc.code}): check AWS_ACCESS_KEY_ID / "
                                   "AWS_SECRET_ACCESS_KEY and the bucket policy")
        if isinstance(exc, S3Error):
            detail = f"S3 error {exc.code}: {exc.message}"
        elif isinstance(exc, (ServerError, InvalidResponseError)) or is_transient(exc):
            detail = f"{type(exc).__name__}: {exc}"
        else:
            return None
        tries = f" after {attempts} attempt(s)" if is_transient(exc) else ""
        return OSError(f"{action} {uri} failed{tries} against {endpoint}: {detail}")

    def read_bytes(self, key: str) -> bytes:
        def fetch() -> bytes:
            response = self._client.get_object(self.bucket, self._name(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        return self._run("read", self.uri(key), fetch)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._run("write", self.uri(key), lambda: self._client.put_object(
            self.bucket, self._name(key), io.BytesIO(data), len(data), part_size=self.part_size))

    def write_stream(self, key: str, stream: BinaryIO) -> None:
        """Upload a stream of unknown length in `part_size` parts. Not retried: a consumed stream cannot
        be replayed (upload_file and write_bytes are). If the stream or the network fails, the key is
        left as it was (see the module docstring)."""
        self._run("write", self.uri(key), lambda: self._client.put_object(
            self.bucket, self._name(key), stream, -1, part_size=self.part_size), retry=RetryPolicy(attempts=1))

    def exists(self, key: str) -> bool:
        """Whether the object exists; a missing bucket raises (a typo must not read as "not written yet")."""
        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, self._name(key))
                return True
            except S3Error as exc:
                if exc.code != "NoSuchKey":
                    raise
            # A HEAD response has no body, so a missing bucket also reads as NoSuchKey: ask about the bucket.
            if not self._client.bucket_exists(self.bucket):
                raise self._missing_bucket(self.uri(key))
            return False
        return self._run("stat", self.uri(key), stat)

    def list(self) -> list[str]:
        """Every object under the prefix, recursively, as sorted keys relative to the prefix."""
        def names() -> list[str]:
            found = self._client.list_objects(self.bucket, prefix=self.prefix, recursive=True)
            return sorted(obj.object_name[len(self.prefix):] for obj in found if not obj.is_dir)
        return self._run("list", self.root, names)

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error (S3 semantics)."""
        self._run("delete", self.uri(key), lambda: self._client.remove_object(self.bucket, self._name(key)))

    def upload_file(self, local_path: str | Path, key: str) -> None:
        if not Path(local_path).is_file():
            raise FileNotFoundError(f"cannot upload {local_path} to {self.uri(key)}: no such local file")
        self._run("upload", self.uri(key), lambda: self._client.fput_object(
            self.bucket, self._name(key), str(local_path), part_size=self.part_size))

    def download_file(self, key: str, local_path: str | Path) -> None:
        """Stream the object to `local_path` through an atomic local write (retried as a whole)."""
        def fetch() -> None:
            response = self._client.get_object(self.bucket, self._name(key))
            try:
                write_atomically(local_path, response.stream(CHUNK))
            finally:
                response.close()
                response.release_conn()
        self._run("download", self.uri(key), fetch)

    def open_read(self, key: str) -> BinaryIO:
        """A readable stream of the object; close it after use. Only opening is retried: a connection
        lost mid-stream raises to the reader."""
        return self._run("open", self.uri(key), lambda: self._client.get_object(self.bucket, self._name(key)))

    def stat(self, key: str) -> ObjectInfo:
        """Size and ETag from one HEAD; FileNotFoundError naming the URI (or the bucket) when missing."""
        def head() -> ObjectInfo:
            try:
                found = self._client.stat_object(self.bucket, self._name(key))
            except S3Error as exc:
                # A HEAD response has no body, so a missing bucket also reads as NoSuchKey: ask about the bucket.
                if exc.code == "NoSuchKey" and not self._client.bucket_exists(self.bucket):
                    raise self._missing_bucket(self.uri(key)) from None
                raise
            return ObjectInfo(size=int(found.size), etag=found.etag or None)
        return self._run("stat", self.uri(key), head)

    def read_range(self, key: str, start: int, length: int, if_match: str | None = None) -> bytes:
        """Exactly `length` bytes from offset `start`, with one ranged GET retried like every read.

        `if_match` (an ETag from `stat`) makes the GET conditional: if the object was overwritten since,
        the server refuses (412) and the error says so, instead of returning bytes of the new object at
        offsets computed for the old one. A range past the end of the object is an OSError naming it."""
        uri = self.uri(key)
        check_range(uri, start, length)
        if length == 0:  # minio reads length=0 as "to the end of the object"
            return b""
        headers = {"If-Match": f'"{if_match}"'} if if_match else None

        def fetch() -> bytes:
            response = self._client.get_object(self.bucket, self._name(key), offset=start, length=length,
                                               request_headers=headers)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        return checked_range(uri, self._run("read", uri, fetch), start, length)


def _unpickle_store(endpoint: str, region: str | None, bucket: str, prefix: str, retry: RetryPolicy,
                    part_size: int) -> S3Store:
    """The other half of `S3Store.__reduce__`: same endpoint, credentials from this process's environment."""
    settings = dataclasses.replace(settings_from_env(), endpoint=endpoint, region=region)
    return S3Store(settings, bucket, prefix.rstrip("/"), retry, part_size)


def main(argv: list[str] | None = None) -> int:
    """Copy one object to stdout: `python -m alignlab.storage.s3 s3://bucket/key`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m alignlab.storage.s3 s3://bucket/key", file=sys.stderr)
        return 2
    try:
        bucket, key = split_s3_uri(args[0])
        with S3Store(settings_from_env(), bucket).open_read(key) as stream:
            for chunk in iter_chunks(stream):
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # The reader closed early (webdataset stopping mid-shard). Exit as a SIGPIPE'd process would
        # (128 + 13), the status webdataset ignores; point stdout at /dev/null so the exit flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (OSError, ValueError) as exc:
        print(f"alignlab.storage.s3: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
