"""The S3-compatible backend (AWS S3, MinIO, Ceph, R2, moto): boto3 objects, pyarrow Parquet.

Settings come from the standard AWS places and nowhere else:

* credentials: boto3's default chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the shared files, container or instance roles);
* endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else AWS itself. A custom endpoint
  is addressed path-style (``http://host:9000/bucket/key``), which MinIO, Ceph, R2 and moto all
  accept without wildcard DNS;
* region: ``AWS_DEFAULT_REGION``, else ``AWS_REGION``, else the profile's, else ``us-east-1``.

pyarrow's ``S3FileSystem`` reads none of the endpoint variables and has its own credential chain,
so it gets the endpoint (``endpoint_override`` + ``scheme``) and boto3's resolved credentials
explicitly: both libraries then talk to the same store as the same user.

Writes are all-or-nothing. S3 makes an object visible only when a single PUT or a
CompleteMultipartUpload succeeds, and boto3's transfer manager aborts a multipart upload whose
part fails, so a failed write leaves nothing under the key (a process killed mid-multipart leaves
an invisible incomplete upload that a bucket lifecycle rule ``AbortIncompleteMultipartUpload``
cleans up). Since boto3 1.36 every PUT and part also carries a CRC checksum that S3 verifies.

Errors become one-line ``GptpipeError``s naming the URI and the S3 error code; credential values
never appear in them (messages are also scrubbed of the secret, defensively).
"""

from __future__ import annotations

import hashlib
import http
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import boto3
import botocore.exceptions as bex
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from storage.errors import GptpipeError
from storage.local import atomic_write

MiB = 1 << 20
# Objects up to MULTIPART_THRESHOLD go up in one PUT, larger ones in MULTIPART_CHUNKSIZE parts
# (S3 wants parts of at least 5 MiB but the last). Tests lower both to exercise multipart.
MULTIPART_THRESHOLD = 64 * MiB
MULTIPART_CHUNKSIZE = 16 * MiB
# Transient errors (5xx, throttling, dropped connections) are retried with exponential backoff
# and jitter ("standard" mode); attempts count the first try.
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
# preflight must fail fast even when the endpoint swallows packets or never answers: at most
# 2 attempts x 3 s + up to 1 s of backoff.
PREFLIGHT_MAX_ATTEMPTS = 2
PREFLIGHT_CONNECT_TIMEOUT_S = 2
PREFLIGHT_READ_TIMEOUT_S = 3
LIST_PAGE_SIZE = 1000  # keys per ListObjectsV2 page (S3's maximum); tests lower it
_CHUNK = MiB

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "403",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# a conditional write that lost: the object exists (412), or another write to it was in flight (409)
_CONDITION_FAILED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_NO_CREDENTIALS = (
    "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
)


# ----------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # "" for the bucket itself

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"


def _object(uri: str) -> S3Location:
    """parse() for operations on one object: the key may not be empty."""
    loc = parse(uri)
    if not loc.key:
        raise GptpipeError(f"{uri} names a bucket, not an object: use s3://bucket/key")
    return loc


def parse(uri: str) -> S3Location:
    """Split ``s3://bucket/key`` (the key may be empty); refuse a URI without a bucket."""
    if not uri.startswith("s3://"):
        raise GptpipeError(f"{uri} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise GptpipeError(f"{uri} names no bucket: use s3://bucket/prefix")
    return S3Location(bucket, key.lstrip("/"))


# ----------------------------------------------------------------------------- settings, clients


def endpoint_url() -> str | None:
    """The custom S3 endpoint from the environment, or None for AWS itself."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise GptpipeError(f"S3 endpoint {url!r} is not a URL like http://host:9000")
    return url.rstrip("/")


def _env_region() -> str | None:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")


def _settings_fingerprint() -> str:
    """Everything that picks endpoint, region, credentials and client tuning, hashed.

    Clients are cached under this, so a changed variable (another test, another profile) or
    module constant gets new clients, and no secret is kept in clear as a dict key. The process
    id is part of it because boto3 clients must not be shared across a fork (DDP ranks).
    """
    names = (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_PROFILE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
    )
    tuning = (
        MAX_ATTEMPTS,
        CONNECT_TIMEOUT_S,
        READ_TIMEOUT_S,
        PREFLIGHT_MAX_ATTEMPTS,
        PREFLIGHT_CONNECT_TIMEOUT_S,
        PREFLIGHT_READ_TIMEOUT_S,
    )
    parts = [os.environ.get(n, "") for n in names] + [str(v) for v in (*tuning, os.getpid())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _client_config(attempts: int, connect_s: float, read_s: float, path_style: bool) -> Config:
    return Config(
        retries={"total_max_attempts": attempts, "mode": "standard"},
        connect_timeout=connect_s,
        read_timeout=read_s,
        s3={"addressing_style": "path"} if path_style else None,
    )


@dataclass
class _Connection:
    """A boto3 session with its clients (thread-safe once built) and pyarrow filesystems."""

    session: Any
    client: Any
    preflight_client: Any
    endpoint: str | None
    region: str
    _arrow: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """The endpoint, for error messages."""
        return self.endpoint or self.client.meta.endpoint_url

    def credentials(self):
        """boto3's current (refreshed if temporary) credentials; GptpipeError if there are none."""
        creds = self.session.get_credentials()
        if creds is None:
            raise GptpipeError(_NO_CREDENTIALS)
        return creds.get_frozen_credentials()

    def arrow_fs(self):
        """A pyarrow S3FileSystem on the same endpoint with the same (current) credentials."""
        from pyarrow import fs as pafs

        creds = self.credentials()
        # Keyed by the credentials so that refreshed temporary credentials get a new filesystem.
        key = hashlib.sha256(
            "\0".join((creds.access_key, creds.secret_key, creds.token or "")).encode()
        ).hexdigest()
        with _LOCK:
            if key not in self._arrow:
                self._arrow.clear()
                extra = {}
                if self.endpoint:
                    parsed = urlparse(self.endpoint)
                    extra = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
                self._arrow[key] = pafs.S3FileSystem(
                    access_key=creds.access_key,
                    secret_key=creds.secret_key,
                    session_token=creds.token,
                    region=self.region,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    request_timeout=READ_TIMEOUT_S,
                    retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
                    **extra,
                )
            return self._arrow[key]


_LOCK = threading.Lock()
_CONNECTIONS: dict[str, _Connection] = {}


def _connection() -> _Connection:
    """The cached connection for the current settings (building one costs ~50 ms)."""
    fingerprint = _settings_fingerprint()
    with _LOCK:
        conn = _CONNECTIONS.get(fingerprint)
        if conn is None:
            conn = _CONNECTIONS[fingerprint] = _connect()
        return conn


def _connect() -> _Connection:
    endpoint = endpoint_url()

    def client(session, region: str, attempts: int, connect_s: float, read_s: float):
        config = _client_config(attempts, connect_s, read_s, path_style=endpoint is not None)
        return session.client("s3", region_name=region, endpoint_url=endpoint, config=config)

    try:
        session = boto3.session.Session()
        region = _env_region() or session.region_name or "us-east-1"
        return _Connection(
            session=session,
            client=client(session, region, MAX_ATTEMPTS, CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            preflight_client=client(
                session,
                region,
                PREFLIGHT_MAX_ATTEMPTS,
                PREFLIGHT_CONNECT_TIMEOUT_S,
                PREFLIGHT_READ_TIMEOUT_S,
            ),
            endpoint=endpoint,
            region=region,
        )
    except bex.ProfileNotFound as exc:
        raise GptpipeError(f"AWS profile {exc.kwargs.get('profile')!r} is not configured") from None


def reset_clients() -> None:
    """Forget every cached client and filesystem (tests; after changing credentials in-process)."""
    with _LOCK:
        _CONNECTIONS.clear()


def _transfer_config() -> TransferConfig:
    # Read at call time so that tests can lower the module constants.
    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE
    )


# ----------------------------------------------------------------------------- errors


def _scrub(text: str) -> str:
    """One line of text without any secret we know of (S3 never echoes one; belt and braces)."""
    text = " ".join(str(text).split())
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text[:300]


def _code_text(exc: bex.ClientError) -> str:
    code = str(exc.response.get("Error", {}).get("Code") or "")
    if not code:
        code = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "unknown"))
    if code.isdigit():  # HEAD responses have no body, hence no code but the status
        with suppress(ValueError):
            code = f"{code} {http.HTTPStatus(int(code)).phrase}"
    return code


def _message(exc: BaseException, loc: S3Location, conn: _Connection) -> str | None:
    """The user-facing message for a boto3/botocore failure, or None if it is not one."""
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, bex.ClientError):
        exc = exc.__context__
    if isinstance(exc, RetriesExceededError):
        exc = exc.last_exception
    subject = f"bucket '{loc.bucket}'" if not loc.key else loc.uri
    if isinstance(exc, bex.ClientError):
        code = _code_text(exc)
        bare = code.split()[0]
        if bare == "NoSuchBucket" or (bare in _NOT_FOUND_CODES and not loc.key):
            return f"bucket '{loc.bucket}' does not exist at {conn.where}: create it or fix --store"
        if bare in _NOT_FOUND_CODES:
            return f"not found: {loc.uri}"
        if bare in _CREDENTIAL_CODES:
            return (
                f"S3 refused the credentials for {subject} ({code}): check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY"
            )
        if bare == "AccessDenied":
            return f"S3 denied access to {subject} (AccessDenied): the credentials lack permission"
        detail = exc.response.get("Error", {}).get("Message") or ""
        return _scrub(f"S3 error {code} on {loc.uri}: {detail}".rstrip(": "))
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectTimeoutError):
        return _scrub(f"cannot reach the S3 endpoint {conn.where}: {exc}")
    if isinstance(exc, bex.ReadTimeoutError):
        return f"the S3 endpoint {conn.where} did not answer in time for {subject}"
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return _NO_CREDENTIALS
    if isinstance(exc, bex.BotoCoreError):
        return _scrub(f"S3 request for {loc.uri} failed: {exc}")
    return None


@contextmanager
def _errors(loc: S3Location, conn: _Connection) -> Iterator[None]:
    """Turn boto3/botocore exceptions raised in the block into GptpipeError."""
    try:
        yield
    except (bex.BotoCoreError, bex.ClientError, S3UploadFailedError, RetriesExceededError) as exc:
        message = _message(exc, loc, conn)
        if message is None:
            raise
        raise GptpipeError(message) from None


def _arrow_error(exc: OSError, loc: S3Location, conn: _Connection) -> GptpipeError:
    """pyarrow reports S3 failures as OSError with the AWS SDK's error name in the text."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        return GptpipeError(f"not found: {loc.uri}")
    if "ACCESS_DENIED" in text:
        return GptpipeError(
            f"S3 refused the credentials for {loc.uri} (AccessDenied): check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY"
        )
    if "NETWORK_CONNECTION" in text:
        return GptpipeError(_scrub(f"cannot reach the S3 endpoint {conn.where}: {text}"))
    return GptpipeError(_scrub(f"cannot read {loc.uri}: {text}"))


def _spool_error(uri: str, exc: OSError) -> GptpipeError:
    """open_write's error for a failure of its local spool file, saying where that lives."""
    return GptpipeError(
        f"could not write {uri}: {exc.strerror or exc} (while spooling it in "
        f"{tempfile.gettempdir()}; set TMPDIR to a folder with room)"
    )


# ----------------------------------------------------------------------------- the backend


class S3Backend:
    """Same methods as LocalBackend; ``where`` is the s3:// URI itself."""

    def put_bytes(self, uri: str, data: bytes) -> None:
        loc, conn = _object(uri), _connection()
        with _errors(loc, conn):
            if len(data) < MULTIPART_THRESHOLD:
                conn.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
            else:
                conn.client.upload_fileobj(
                    io.BytesIO(data), loc.bucket, loc.key, Config=_transfer_config()
                )

    def create_new(self, uri: str, data: bytes) -> bool:
        """PUT ``data`` only if the key has no object (``If-None-Match: *``, S3's conditional
        write): True if this call created it. Of two writers exactly one gets True.

        A retried PUT whose first try did succeed answers 412 too: the object is then read
        back, and it is this call's if it holds exactly ``data`` (callers put a nonce in it).
        """
        loc, conn = _object(uri), _connection()
        with _errors(loc, conn):
            try:
                conn.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")
                return True
            except bex.ClientError as exc:
                if _code_text(exc).split()[0] not in _CONDITION_FAILED:
                    raise
        try:
            return self.get_bytes(uri) == data
        except GptpipeError:
            return False  # deleted meanwhile: it was someone else's

    def delete(self, uri: str) -> None:
        """Remove the object (no error if it is not there)."""
        loc, conn = _object(uri), _connection()
        with _errors(loc, conn):
            conn.client.delete_object(Bucket=loc.bucket, Key=loc.key)

    def put_file(self, uri: str, source: Path) -> None:
        loc, conn = _object(uri), _connection()
        try:
            with open(source, "rb"):  # a clear error for a missing or unreadable source
                pass
        except OSError as exc:
            raise GptpipeError(
                f"could not write {uri}: cannot read {source}: {exc.strerror or exc}"
            ) from None
        with _errors(loc, conn):
            conn.client.upload_file(str(source), loc.bucket, loc.key, Config=_transfer_config())

    def get_bytes(self, uri: str) -> bytes:
        loc, conn = _object(uri), _connection()
        with _errors(loc, conn):
            return conn.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()

    def get_file(self, uri: str, dest: Path) -> None:
        """Download to a temporary file beside dest, renamed into place once complete."""
        loc, conn = _object(uri), _connection()

        def download(f: BinaryIO) -> None:
            # S3's errors become GptpipeErrors here, inside the write: a read timeout is an
            # OSError too, and would otherwise be reported as a failure to write ``dest``.
            with _errors(loc, conn):
                conn.client.download_fileobj(loc.bucket, loc.key, f, Config=_transfer_config())

        with atomic_write(dest) as f:
            download(f)

    def exists(self, uri: str) -> bool:
        """An object, a bucket (bare s3://bucket) or a "folder" (a prefix with objects under it)
        exists, as a local file, store folder or subfolder does."""
        loc, conn = parse(uri), _connection()
        with _errors(loc, conn):
            if not loc.key:
                try:
                    conn.client.head_bucket(Bucket=loc.bucket)
                    return True
                except bex.ClientError as exc:
                    if _code_text(exc).split()[0] in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                        return False
                    raise
            try:
                conn.client.head_object(Bucket=loc.bucket, Key=loc.key)
                return True
            except bex.ClientError as exc:
                if _code_text(exc).split()[0] not in _NOT_FOUND_CODES:
                    raise
            folder = loc.key.rstrip("/") + "/"
            listed = conn.client.list_objects_v2(Bucket=loc.bucket, Prefix=folder, MaxKeys=1)
            return listed.get("KeyCount", 0) > 0

    def list(self, uri: str) -> list[str]:
        """Full URIs of the objects under the prefix taken as a folder (as locally: listing
        ``runs/r1`` does not return ``runs/r10/...``), sorted; directory markers are skipped."""
        loc, conn = parse(uri), _connection()
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        out = []
        with _errors(loc, conn):
            pages = conn.client.get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE}
            )
            for page in pages:
                out.extend(
                    f"s3://{loc.bucket}/{obj['Key']}"
                    for obj in page.get("Contents", [])
                    if not obj["Key"].endswith("/")
                )
        return sorted(out)

    def sha256(self, uri: str) -> str:
        """Streamed through hashlib in 1 MiB chunks: the object is never held whole."""
        loc, conn = _object(uri), _connection()
        digest = hashlib.sha256()
        with _errors(loc, conn):
            body = conn.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
            with body:
                for chunk in body.iter_chunks(_CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()

    def content_id(self, uri: str) -> str:
        loc, conn = _object(uri), _connection()
        with _errors(loc, conn):
            head = conn.client.head_object(Bucket=loc.bucket, Key=loc.key)
        return f"etag:{head['ETag'].strip(chr(34))}:{head['ContentLength']}"

    def size(self, uri: str) -> int:
        loc, conn = _object(uri), _connection()
        with _errors(loc, conn):
            return conn.client.head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"]

    def open_read(self, uri: str) -> BinaryIO:
        """A pyarrow random-access file: seeks and reads become ranged GETs, so Parquet readers
        fetch only the footer and the row groups they need."""
        loc, conn = _object(uri), _connection()
        with _errors(loc, conn):
            fs = conn.arrow_fs()
        try:
            return fs.open_input_file(f"{loc.bucket}/{loc.key}")
        except OSError as exc:
            raise _arrow_error(exc, loc, conn) from None

    @contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        """Spool to a local temporary file, upload it only when the block completes.

        Why not pyarrow's S3 output stream: closing it completes the (multipart) upload, and it
        is closed even when the writer fails (its destructor closes it), so an exception midway
        would publish a truncated object; it has no abort. A local spool file costs disk space
        and an upload after the last write, but the object appears whole or not at all: nothing
        is sent before the block ends without an exception, and the upload itself is one PUT or
        a multipart upload that boto3 aborts on failure. The spool goes to the temp folder
        (``TMPDIR``) and is removed in every case.

        An OSError while spooling (that folder's disk is full) becomes a one-line GptpipeError;
        any other exception from the block passes through unchanged.
        """
        loc, conn = _object(uri), _connection()
        try:
            spool_dir = tempfile.mkdtemp(prefix="gptpipe-s3-")
        except OSError as exc:
            raise _spool_error(uri, exc) from None
        try:
            spool = Path(spool_dir) / "object"
            try:
                with open(spool, "w+b") as f:
                    yield f
            except OSError as exc:
                raise _spool_error(uri, exc) from None
            with _errors(loc, conn):
                conn.client.upload_file(str(spool), loc.bucket, loc.key, Config=_transfer_config())
        finally:
            shutil.rmtree(spool_dir, ignore_errors=True)

    def arrow_filesystem(self, uri: str) -> tuple[Any, str]:
        loc, conn = parse(uri), _connection()
        with _errors(loc, conn):
            return conn.arrow_fs(), f"{loc.bucket}/{loc.key}".rstrip("/")

    def preflight(self, uri: str) -> None:
        """Check, in seconds, that the bucket exists and accepts the credentials (HEAD bucket)."""
        loc, conn = parse(uri), _connection()
        bucket_only = S3Location(loc.bucket, "")  # messages name the bucket
        with _errors(bucket_only, conn):
            if conn.session.get_credentials() is None:
                raise GptpipeError(_NO_CREDENTIALS)
            conn.preflight_client.head_bucket(Bucket=loc.bucket)
