"""The S3 backend against a real S3 HTTP server (moto, on loopback): no mocks of boto3 or pyarrow.

Also the new parts of the interface (open_read, open_write, arrow_filesystem, preflight) on a
local folder, since both backends must behave alike.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
import urllib.request
from contextlib import contextmanager

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import storage
import storage.s3
from model.data import load_text, read_tokens, write_tokens
from storage.errors import GptpipeError
from tests.fixtures_s3 import FaultyProxy
from tests.test_storage import TINY_DISK_BYTES, many_ids, mounted_tiny_disk

MiB = 1 << 20


def raw_client(env):
    """A plain boto3 client to look at the bucket behind storage's back."""
    return boto3.client("s3", endpoint_url=env.endpoint)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def error_of(call, *args) -> str:
    with pytest.raises(GptpipeError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def small_table(n: int = 10_000) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({"ids": rng.integers(0, 50_000, n, dtype=np.uint16), "pos": np.arange(n)})


# ----------------------------------------------------------------------------- round trips


def test_bytes_round_trip(s3_env):
    uri = storage.join(s3_env.uri, "runs", "r1", "notes.txt")
    assert uri == f"s3://{s3_env.bucket}/runs/r1/notes.txt"  # join keeps the s3:// scheme
    assert storage.put_bytes(uri, b"hello store") == uri
    assert storage.get_bytes(uri) == b"hello store"
    assert storage.exists(uri)
    assert storage.size(uri) == len(b"hello store")
    assert storage.sha256(uri) == hashlib.sha256(b"hello store").hexdigest()
    storage.put_bytes(uri, b"second")  # overwrite
    assert storage.get_bytes(uri) == b"second"
    empty = storage.join(s3_env.uri, "empty")
    storage.put_bytes(empty, b"")
    assert storage.get_bytes(empty) == b""
    assert storage.size(empty) == 0
    assert storage.sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_file_round_trip(s3_env, tmp_path):
    data = os.urandom(3 * MiB + 123)  # several sha256 chunks
    source = tmp_path / "src.bin"
    source.write_bytes(data)
    uri = storage.join(s3_env.uri, "deep", "obj.bin")
    assert storage.put_file(uri, source) == uri
    assert storage.size(uri) == len(data)
    assert storage.sha256(uri) == hashlib.sha256(data).hexdigest()
    dest = storage.get_file(uri, tmp_path / "out" / "copy.bin")
    assert dest == tmp_path / "out" / "copy.bin"
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.bin"]  # no temp file left


def test_put_file_from_a_missing_source(s3_env, tmp_path):
    uri = storage.join(s3_env.uri, "obj.bin")
    assert "could not write" in error_of(storage.put_file, uri, tmp_path / "vanished.bin")
    assert not storage.exists(uri)


def test_exists(s3_env):
    storage.put_bytes(storage.join(s3_env.uri, "runs/r1/a.txt"), b"a")
    assert storage.exists(storage.join(s3_env.uri, "runs/r1/a.txt"))
    assert storage.exists(storage.join(s3_env.uri, "runs/r1"))  # a "folder", as locally
    assert storage.exists(storage.join(s3_env.uri, "runs"))
    assert storage.exists(s3_env.uri)  # the bucket
    assert not storage.exists(storage.join(s3_env.uri, "runs/r"))  # not a prefix match
    assert not storage.exists(storage.join(s3_env.uri, "missing"))
    assert not storage.exists("s3://no-such-bucket-here")


def test_list_uris(s3_env, monkeypatch):
    monkeypatch.setattr(storage.s3, "LIST_PAGE_SIZE", 2)  # several pages for a few keys
    base = storage.join(s3_env.uri, "store")
    for key in ("b/2.txt", "a.txt", "b/c/3.txt", "bb/4.txt"):
        storage.put_bytes(storage.join(base, key), key.encode())
    # a directory marker, as pyarrow's write_dataset and S3 consoles leave them
    raw_client(s3_env).put_object(Bucket=s3_env.bucket, Key="store/b/", Body=b"")
    assert storage.list_uris(base) == [
        f"{base}/a.txt",
        f"{base}/b/2.txt",
        f"{base}/b/c/3.txt",
        f"{base}/bb/4.txt",
    ]
    assert storage.list_uris(storage.join(base, "b")) == [f"{base}/b/2.txt", f"{base}/b/c/3.txt"]
    assert storage.list_uris(f"{base}/b/c/") == [f"{base}/b/c/3.txt"]
    assert storage.list_uris(storage.join(base, "nothing-here")) == []
    assert storage.list_uris(s3_env.uri) == storage.list_uris(base)


@pytest.mark.parametrize(
    "read",
    [storage.get_bytes, storage.size, storage.sha256, storage.open_read, load_text],
    ids=["get_bytes", "size", "sha256", "open_read", "load_text"],
)
def test_reading_a_missing_object_is_a_gptpipe_error(s3_env, read):
    uri = storage.join(s3_env.uri, "missing.bin")
    assert error_of(read, uri) == f"not found: {uri}"


def test_get_file_of_a_missing_object_keeps_the_destination(s3_env, tmp_path):
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"keep me")
    uri = storage.join(s3_env.uri, "missing.bin")
    assert error_of(storage.get_file, uri, dest) == f"not found: {uri}"
    assert dest.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["dest.bin"]


def test_a_missing_bucket_is_named(s3_env):
    message = error_of(storage.get_bytes, "s3://no-such-bucket-here/key")
    assert message == (
        f"bucket 'no-such-bucket-here' does not exist at {s3_env.endpoint}: "
        "create it or fix --store"
    )
    assert "does not exist" in error_of(storage.put_bytes, "s3://no-such-bucket-here/k", b"x")


def test_uri_checks(s3_env):
    assert "names no bucket" in error_of(storage.get_bytes, "s3:///key")
    assert "names a bucket, not an object" in error_of(storage.put_bytes, s3_env.uri, b"x")
    assert "unsupported store URI" in error_of(storage.get_bytes, "gs://bucket/key")
    assert "not a local path" in error_of(storage.local_path, "s3://bucket/key")


def test_load_text_reads_s3(s3_env):
    uri = storage.join(s3_env.uri, "corpus", "input.txt")
    storage.put_bytes(uri, b"To be, or not to be\n")
    assert load_text(uri) == b"To be, or not to be\n"


# ----------------------------------------------------------------------------- Parquet


def test_parquet_straight_on_s3_matches_local(s3_env, tmp_path):
    table = small_table()
    s3_uri = storage.join(s3_env.uri, "data", "t.parquet")
    local_uri = str(tmp_path / "data" / "t.parquet")
    for uri in (s3_uri, local_uri):
        with storage.open_write(uri) as f:
            pq.write_table(table, f, row_group_size=1000)
    # the same writer, the same bytes
    assert storage.get_bytes(s3_uri) == storage.get_bytes(local_uri)
    assert storage.sha256(s3_uri) == storage.sha256(local_uri)
    for uri in (s3_uri, local_uri):
        with storage.open_read(uri) as f:
            assert f.seekable()
            assert pq.read_table(f).equals(table)
        with storage.open_read(uri) as f:  # random access: one row group from the middle
            part = pq.ParquetFile(f).read_row_group(7)
            assert part.column("pos").to_pylist() == list(range(7000, 8000))
        fs, path = storage.arrow_filesystem(uri)
        assert ds.dataset(path, filesystem=fs, format="parquet").to_table().equals(table)


def test_token_files_on_s3(s3_env):
    """model.data's token files (Parquet) go to and come from S3 through the same interface."""
    ids = np.arange(5000) % 97
    uri = storage.join(s3_env.uri, "tokens", "train.parquet")
    with storage.open_write(uri) as f:
        write_tokens(ids, f, {"vocab_size": 97, "n_tokens": len(ids)}, row_group_size=1024)
    with storage.open_read(uri) as f:
        got, metadata = read_tokens(f)
    assert np.array_equal(got, ids) and metadata == {"vocab_size": 97, "n_tokens": 5000}


def test_torch_checkpoint_on_s3(s3_env):
    import torch

    uri = storage.join(s3_env.uri, "runs", "r1", "ckpt.pt")
    state = {"w": torch.arange(12.0).reshape(3, 4), "step": 7}
    with storage.open_write(uri) as f:
        torch.save(state, f)
    with storage.open_read(uri) as f:
        loaded = torch.load(f, weights_only=True)
    assert loaded["step"] == 7 and torch.equal(loaded["w"], state["w"])


# ----------------------------------------------------------------------------- all or nothing


def pending_uploads(env) -> list:
    return raw_client(env).list_multipart_uploads(Bucket=env.bucket).get("Uploads", [])


@pytest.mark.parametrize("size", [1000, 7 * MiB], ids=["small", "multipart-sized"])
def test_an_exception_inside_open_write_leaves_nothing(s3_env, monkeypatch, tmp_path, size):
    monkeypatch.setattr(storage.s3, "MULTIPART_THRESHOLD", 6 * MiB)
    monkeypatch.setattr(storage.s3, "MULTIPART_CHUNKSIZE", 5 * MiB)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the spool file goes
    uri = storage.join(s3_env.uri, "out", "t.parquet")
    with pytest.raises(RuntimeError, match="writer died"), storage.open_write(uri) as f:
        f.write(os.urandom(size))
        raise RuntimeError("writer died")
    assert not storage.exists(uri)
    assert storage.list_uris(s3_env.uri) == []
    assert pending_uploads(s3_env) == []
    assert list(tmp_path.iterdir()) == []  # the spool file is gone too
    # an existing object survives a failed overwrite
    storage.put_bytes(uri, b"good old version")
    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"half")
        raise RuntimeError("writer died")
    assert storage.get_bytes(uri) == b"good old version"


@pytest.fixture()
def tiny_disk(tmp_path):
    with mounted_tiny_disk(tmp_path) as mount:
        yield mount


def test_a_full_spool_disk_is_a_gptpipe_error_and_keeps_the_old_object(
    s3_env, monkeypatch, tiny_disk
):
    """open_write spools to TMPDIR: when that disk fills up under a Parquet writer, the write is
    a one-line error naming the object and the spool folder, and nothing is uploaded."""
    monkeypatch.setattr(tempfile, "tempdir", str(tiny_disk))
    uri = storage.join(s3_env.uri, "datasets", "shard-00000.parquet")
    storage.put_bytes(uri, b"good old version")
    ids = many_ids()
    with pytest.raises(GptpipeError) as info, storage.open_write(uri) as f:
        write_tokens(ids, f, {"vocab_size": 65536, "n_tokens": len(ids)})
    message = str(info.value)
    assert message.startswith(f"could not write {uri}: No space left on device"), message
    assert str(tiny_disk) in message and "\n" not in message
    assert storage.get_bytes(uri) == b"good old version"
    assert pending_uploads(s3_env) == []
    assert list(tiny_disk.iterdir()) == []  # the spool file is gone


def test_get_file_onto_a_full_disk_keeps_the_destination(s3_env, tiny_disk):
    uri = storage.join(s3_env.uri, "big.bin")
    storage.put_bytes(uri, os.urandom(2 * TINY_DISK_BYTES))
    dest = tiny_disk / "dest.bin"
    dest.write_bytes(b"keep me")
    assert error_of(storage.get_file, uri, dest) == (
        f"could not write {dest}: No space left on device"
    )
    assert dest.read_bytes() == b"keep me"
    assert [p.name for p in tiny_disk.iterdir()] == ["dest.bin"]


def test_multipart_upload(s3_env, monkeypatch, tmp_path):
    monkeypatch.setattr(storage.s3, "MULTIPART_THRESHOLD", 6 * MiB)
    monkeypatch.setattr(storage.s3, "MULTIPART_CHUNKSIZE", 5 * MiB)
    data = os.urandom(13 * MiB)  # 5 + 5 + 3 MiB
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    client = raw_client(s3_env)
    writes = {
        "put_file": lambda uri: storage.put_file(uri, source),
        "put_bytes": lambda uri: storage.put_bytes(uri, data),
        "open_write": lambda uri: _write_with_open_write(uri, data),
    }
    for name, write in writes.items():
        uri = storage.join(s3_env.uri, f"{name}.bin")
        write(uri)
        etag = client.head_object(Bucket=s3_env.bucket, Key=f"{name}.bin")["ETag"]
        assert etag.strip('"').endswith("-3"), (name, etag)  # three parts
        assert storage.sha256(uri) == hashlib.sha256(data).hexdigest()
    small = storage.join(s3_env.uri, "small.bin")
    storage.put_bytes(small, b"x" * MiB)
    assert "-" not in client.head_object(Bucket=s3_env.bucket, Key="small.bin")["ETag"]


def _write_with_open_write(uri: str, data: bytes) -> None:
    with storage.open_write(uri) as f:
        for start in range(0, len(data), MiB):
            f.write(data[start : start + MiB])


# ----------------------------------------------------------------------------- preflight


def test_preflight_accepts_a_usable_bucket(s3_env):
    storage.preflight(s3_env.uri)
    storage.preflight(storage.join(s3_env.uri, "some", "prefix"))


def test_preflight_missing_bucket(s3_env):
    message = error_of(storage.preflight, "s3://no-such-bucket-here/runs")
    assert message == (
        f"bucket 'no-such-bucket-here' does not exist at {s3_env.endpoint}: "
        "create it or fix --store"
    )


@contextmanager
def moto_checks_credentials(endpoint: str):
    """Switch on moto's request authentication (off by default), then off again.

    moto's server can verify SigV4 signatures against the IAM users it knows: POST a count N to
    /moto-api/reset-auth and every request after the first N is authenticated (unknown key ->
    InvalidAccessKeyId, wrong secret -> SignatureDoesNotMatch, HEAD -> a bare 403).
    """

    def reset_auth(count: str) -> None:
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    reset_auth("0")
    try:
        yield
    finally:
        reset_auth("inf")


@pytest.fixture()
def iam_user(s3_env):
    """A moto IAM user allowed everything on S3; returns its (access key id, secret)."""
    iam = boto3.client("iam", endpoint_url=s3_env.endpoint)
    name = f"user-{s3_env.bucket}"
    iam.create_user(UserName=name)
    iam.put_user_policy(
        UserName=name,
        PolicyName="s3-all",
        PolicyDocument='{"Version": "2012-10-17", "Statement": '
        '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}',
    )
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_refused_credentials(s3_env, iam_user, monkeypatch):
    key_id, real_secret = iam_user
    uri = storage.join(s3_env.uri, "obj.txt")
    storage.put_bytes(uri, b"data")
    hint = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    with moto_checks_credentials(s3_env.endpoint):
        # an access key moto has never heard of (the fixture's), with the fixture's secret
        message = error_of(storage.preflight, uri)
        assert message == (
            f"S3 refused the credentials for bucket '{s3_env.bucket}' (403 Forbidden): {hint}"
        )
        assert error_of(storage.get_bytes, uri) == (
            f"S3 refused the credentials for {uri} (InvalidAccessKeyId): {hint}"
        )
        # a real access key with a wrong secret (the fixture's distinctive one)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        messages = [
            error_of(storage.preflight, uri),
            error_of(storage.get_bytes, uri),
            error_of(storage.put_bytes, uri, b"new"),
            error_of(storage.list_uris, s3_env.uri),
            error_of(storage.open_read, uri),
        ]
        assert (
            messages[1] == f"S3 refused the credentials for {uri} (SignatureDoesNotMatch): {hint}"
        )
        assert all("refused the credentials" in m for m in messages), messages
        assert not any(s3_env.secret in m for m in messages)
        # the right secret works, on the same endpoint, with no reset_clients() needed
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", real_secret)
        storage.preflight(uri)
        assert storage.get_bytes(uri) == b"data"
        with storage.open_read(uri) as f:
            assert f.read() == b"data"


def test_preflight_unreachable_endpoint_fails_fast(s3_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    message = error_of(storage.preflight, s3_env.uri)
    assert time.monotonic() - start < 10
    assert message.startswith(f"cannot reach the S3 endpoint {endpoint}: ")
    assert s3_env.secret not in message
    # the ordinary operations say the same (after their own, longer, retries)
    assert error_of(storage.get_bytes, storage.join(s3_env.uri, "k")).startswith(
        f"cannot reach the S3 endpoint {endpoint}"
    )


def test_preflight_silent_endpoint_fails_fast(s3_env, monkeypatch):
    """An endpoint that accepts connections but never answers (a wrong port, a hung proxy)."""
    defaults = storage.s3
    worst = defaults.PREFLIGHT_MAX_ATTEMPTS * max(
        defaults.PREFLIGHT_CONNECT_TIMEOUT_S, defaults.PREFLIGHT_READ_TIMEOUT_S
    )
    assert worst + defaults.PREFLIGHT_MAX_ATTEMPTS - 1 <= 10  # timeouts + at most 1 s backoff
    monkeypatch.setattr(storage.s3, "PREFLIGHT_READ_TIMEOUT_S", 1)  # keep the test quick
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        start = time.monotonic()
        message = error_of(storage.preflight, s3_env.uri)
        assert time.monotonic() - start < 2 * 1 + 1 + 1
    assert (
        message == f"the S3 endpoint {endpoint} did not answer in time for bucket '{s3_env.bucket}'"
    )


def test_preflight_without_credentials(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = error_of(storage.preflight, s3_env.uri)
    assert message.startswith("no S3 credentials found")
    assert error_of(storage.get_bytes, storage.join(s3_env.uri, "k")).startswith(
        "no S3 credentials found"
    )


def test_bad_settings_are_gptpipe_errors(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "localhost:9000")  # no scheme
    assert "is not a URL like http://host:9000" in error_of(storage.preflight, s3_env.uri)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    assert error_of(storage.preflight, s3_env.uri) == (
        "AWS profile 'no-such-profile' is not configured"
    )


def test_the_s3_specific_endpoint_wins(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    storage.preflight(s3_env.uri)
    uri = storage.join(s3_env.uri, "t.parquet")
    with storage.open_write(uri) as f:
        pq.write_table(small_table(10), f)
    with storage.open_read(uri) as f:  # pyarrow follows it too
        assert pq.read_table(f).num_rows == 10


def test_the_secret_is_in_no_error_message(s3_env, monkeypatch):
    uri = storage.join(s3_env.uri, "missing")
    messages = [
        error_of(storage.get_bytes, uri),
        error_of(storage.sha256, uri),
        error_of(storage.open_read, uri),
        error_of(storage.preflight, "s3://no-such-bucket-here"),
        error_of(storage.get_bytes, "s3://no-such-bucket-here/k"),
    ]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    messages.append(error_of(storage.preflight, uri))
    assert all(s3_env.secret not in m for m in messages), messages


def test_clients_are_cached_per_settings(s3_env, monkeypatch):
    first = storage.s3._connection()
    assert storage.s3._connection() is first
    assert storage.s3._connection().arrow_fs() is first.arrow_fs()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert storage.s3._connection() is not first
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    assert storage.s3._connection() is first
    storage.s3.reset_clients()
    assert storage.s3._connection() is not first


# ----------------------------------------------------------------------------- transient faults


@pytest.fixture()
def proxy(s3_env, monkeypatch):
    """A fault-injecting proxy in front of moto, set as the S3 endpoint."""
    with FaultyProxy(s3_env.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


@pytest.mark.parametrize("kind", ["503", "drop"])
def test_transient_faults_are_retried(s3_env, proxy, kind):
    uri = storage.join(s3_env.uri, "retried.bin")
    proxy.inject(kind, times=2)
    storage.put_bytes(uri, b"payload")
    proxy.inject(kind, times=2)
    assert storage.get_bytes(uri) == b"payload"
    proxy.inject(kind, times=2)
    assert storage.sha256(uri) == hashlib.sha256(b"payload").hexdigest()
    proxy.inject(kind, times=1)
    storage.preflight(s3_env.uri)
    assert len(proxy.failed) == 7


def test_transient_faults_are_retried_by_pyarrow(s3_env, proxy):
    table = small_table(1000)
    uri = storage.join(s3_env.uri, "t.parquet")
    with storage.open_write(uri) as f:
        pq.write_table(table, f)
    proxy.inject("503", times=2)
    with storage.open_read(uri) as f:
        assert pq.read_table(f).equals(table)
    assert len(proxy.failed) == 2


def test_a_persistent_fault_is_a_gptpipe_error(s3_env, proxy, monkeypatch):
    monkeypatch.setattr(storage.s3, "MAX_ATTEMPTS", 2)
    uri = storage.join(s3_env.uri, "never.bin")
    proxy.inject("503", times=float("inf"))
    message = error_of(storage.put_bytes, uri, b"payload")
    assert message == f"S3 error SlowDown on {uri}: Please reduce your request rate."
    assert proxy.failed == [f"PUT /{s3_env.bucket}/never.bin"] * 2  # MAX_ATTEMPTS tries


def test_a_failed_part_aborts_the_multipart_upload(s3_env, proxy, monkeypatch, tmp_path):
    """A part that keeps failing: no object, the old version intact, no pending upload."""
    monkeypatch.setattr(storage.s3, "MULTIPART_THRESHOLD", 6 * MiB)
    monkeypatch.setattr(storage.s3, "MULTIPART_CHUNKSIZE", 5 * MiB)
    monkeypatch.setattr(storage.s3, "MAX_ATTEMPTS", 2)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(13 * MiB))
    uri = storage.join(s3_env.uri, "big.bin")
    storage.put_bytes(uri, b"good old version")

    def second_part(request: str) -> bool:
        return request.startswith("PUT ") and "partNumber=2" in request

    proxy.inject("503", times=float("inf"), match=second_part)
    message = error_of(storage.put_file, uri, source)
    assert "SlowDown" in message and uri in message
    assert len(proxy.failed) == 2
    assert any("uploadId=" in r and r.startswith("DELETE ") for r in proxy.forwarded)  # aborted
    assert storage.get_bytes(uri) == b"good old version"
    assert pending_uploads(s3_env) == []
    assert storage.list_uris(s3_env.uri) == [uri]


# ----------------------------------------------------------------------------- local folder


def test_local_open_read_and_write(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    with storage.open_write(uri) as f:
        f.write(b"hello")
        assert not os.path.exists(uri)  # not under the final name until the block ends
    with storage.open_read(uri) as f:
        assert f.read() == b"hello"
    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"half")
        raise RuntimeError("writer died")
    assert storage.get_bytes(uri) == b"hello"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]
    assert error_of(storage.open_read, str(tmp_path / "missing")).startswith("not found")
    fs, path = storage.arrow_filesystem(uri)
    assert fs.get_file_info(path).size == 5


def test_local_preflight(tmp_path):
    storage.preflight(str(tmp_path / "new" / "store"))
    assert (tmp_path / "new" / "store").is_dir()
    assert list((tmp_path / "new" / "store").iterdir()) == []  # the probe is removed
    (tmp_path / "plain-file").write_bytes(b"x")
    message = error_of(storage.preflight, str(tmp_path / "plain-file" / "store"))
    assert message.startswith("cannot write to the store folder")
