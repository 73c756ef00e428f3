"""The local store: reads and writes by URI, safe keys, and all-or-nothing writes."""

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import storage
import storage.local
from model.data import read_tokens, write_tokens
from storage.errors import GptpipeError


def files_under(folder: Path) -> list[str]:
    """Every file under folder, hidden temporary files included, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- reads and writes


def test_put_and_get_bytes(tmp_path):
    uri = storage.join(str(tmp_path), "runs", "r1", "notes.txt")
    assert storage.put_bytes(uri, b"hello store") == uri
    assert storage.get_bytes(uri) == b"hello store"
    assert (tmp_path / "runs" / "r1" / "notes.txt").read_bytes() == b"hello store"
    assert storage.exists(uri)
    assert storage.size(uri) == len(b"hello store")
    assert storage.sha256(uri) == hashlib.sha256(b"hello store").hexdigest()


def test_put_bytes_overwrites(tmp_path):
    uri = str(tmp_path / "a.bin")
    storage.put_bytes(uri, b"first version, longer")
    storage.put_bytes(uri, b"second")
    assert storage.get_bytes(uri) == b"second"
    assert files_under(tmp_path) == ["a.bin"]


def test_put_file_and_get_file(tmp_path):
    source = tmp_path / "src.bin"
    data = os.urandom(3 * (1 << 20) + 123)  # more than one copy chunk
    source.write_bytes(data)
    uri = str(tmp_path / "store" / "deep" / "obj.bin")
    assert storage.put_file(uri, source) == uri
    assert storage.sha256(uri) == hashlib.sha256(data).hexdigest()
    assert storage.size(uri) == len(data)
    dest = storage.get_file(uri, tmp_path / "out" / "copy.bin")
    assert dest == tmp_path / "out" / "copy.bin"
    assert dest.read_bytes() == data


def test_empty_object(tmp_path):
    uri = str(tmp_path / "empty")
    storage.put_bytes(uri, b"")
    assert storage.get_bytes(uri) == b""
    assert storage.size(uri) == 0
    assert storage.sha256(uri) == hashlib.sha256(b"").hexdigest()


def test_file_uris_are_local(tmp_path):
    uri = f"file://{tmp_path}/x/y.txt"
    storage.put_bytes(uri, b"via file://")
    assert (tmp_path / "x" / "y.txt").read_bytes() == b"via file://"
    assert storage.local_path(uri) == tmp_path / "x" / "y.txt"
    assert storage.get_bytes(uri) == b"via file://"


def test_exists_is_false_for_a_missing_object(tmp_path):
    assert not storage.exists(str(tmp_path / "missing"))


@pytest.mark.parametrize("read", [storage.get_bytes, storage.sha256, storage.size])
def test_reading_a_missing_object_is_a_gptpipe_error(tmp_path, read):
    with pytest.raises(GptpipeError, match="not found"):
        read(str(tmp_path / "missing.bin"))


def test_get_file_of_a_missing_object_is_a_gptpipe_error(tmp_path):
    with pytest.raises(GptpipeError, match="not found"):
        storage.get_file(str(tmp_path / "missing.bin"), tmp_path / "dest.bin")
    assert not (tmp_path / "dest.bin").exists()


def test_reading_a_directory_is_a_gptpipe_error(tmp_path):
    with pytest.raises(GptpipeError, match="is a directory"):
        storage.get_bytes(str(tmp_path))


def test_an_unknown_scheme_is_refused(tmp_path):
    with pytest.raises(GptpipeError, match="unsupported store URI"):
        storage.get_bytes("gs://bucket/key")
    with pytest.raises(GptpipeError, match="not a local path"):
        storage.local_path("s3://bucket/key")


def test_list_uris(tmp_path):
    base = str(tmp_path / "store")
    for key in ("b/2.txt", "a.txt", "b/c/3.txt"):
        storage.put_bytes(storage.join(base, key), key.encode())
    (tmp_path / "store" / "b" / ".half.txt.x.tmp").write_bytes(b"junk")  # a stray temp file
    assert storage.list_uris(base) == [
        f"{base}/a.txt",
        f"{base}/b/2.txt",
        f"{base}/b/c/3.txt",
    ]
    assert storage.list_uris(storage.join(base, "b", "c")) == [f"{base}/b/c/3.txt"]
    assert storage.list_uris(str(tmp_path / "nothing-here")) == []


# ----------------------------------------------------------------------------- keys


def test_join():
    assert storage.join("/data/store/", "runs", "r1/train", "ckpt.pt") == (
        "/data/store/runs/r1/train/ckpt.pt"
    )
    assert storage.join("s3://bucket", "a//b/./c") == "s3://bucket/a/b/c"
    # an absolute part stays under the base
    assert storage.join("/data/store", "/etc/passwd") == "/data/store/etc/passwd"


@pytest.mark.parametrize("part", ["..", "../x", "a/../../b", "runs/..", "~", "~root/x"])
def test_join_refuses_keys_that_climb_out(part):
    with pytest.raises(GptpipeError, match="unsafe store key"):
        storage.join("/data/store", part)


# ----------------------------------------------------------------------------- failed writes


def test_put_file_from_a_missing_source_leaves_nothing(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(GptpipeError, match="could not write"):
        storage.put_file(str(store / "obj.bin"), tmp_path / "vanished.bin")
    assert files_under(store) == []


def test_a_failed_write_does_not_clobber_the_existing_object(tmp_path):
    uri = str(tmp_path / "obj.bin")
    storage.put_bytes(uri, b"good old version")
    with pytest.raises(GptpipeError):
        storage.put_file(uri, tmp_path / "vanished.bin")
    assert storage.get_bytes(uri) == b"good old version"
    assert files_under(tmp_path) == ["obj.bin"]


def test_a_failed_rename_leaves_no_temp_file_and_keeps_the_old_object(tmp_path, monkeypatch):
    uri = str(tmp_path / "obj.bin")
    storage.put_bytes(uri, b"old")
    renames = []

    def failing_replace(src, dst):
        renames.append((Path(src), Path(dst)))
        assert Path(src).read_bytes() == b"new contents"  # fully written before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.local.os, "replace", failing_replace)
    with pytest.raises(GptpipeError) as info:
        storage.put_bytes(uri, b"new contents")
    message = str(info.value)
    assert "could not write" in message and "No space left on device" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert len(renames) == 1
    temp, final = renames[0]
    assert final == tmp_path / "obj.bin"
    assert temp.parent == tmp_path and temp.name.startswith(".obj.bin.")
    assert not temp.exists()
    assert storage.get_bytes(uri) == b"old"
    assert files_under(tmp_path) == ["obj.bin"]


def test_a_writer_that_dies_midway_leaves_nothing(tmp_path, monkeypatch):
    """A non-OSError (here one raised after half the data is written) is re-raised as is."""
    store = tmp_path / "store"

    def copy_half_then_fail(src, dst, length=0):
        dst.write(src.read(50))
        raise RuntimeError("writer died")

    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 100)
    monkeypatch.setattr(storage.local.shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(RuntimeError, match="writer died"):
        storage.put_file(str(store / "obj.bin"), source)
    assert files_under(store) == []


def test_a_failed_get_file_does_not_clobber_the_destination(tmp_path):
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"keep me")
    with pytest.raises(GptpipeError):
        storage.get_file(str(tmp_path / "missing.bin"), dest)
    assert dest.read_bytes() == b"keep me"


def test_writing_under_a_file_is_a_gptpipe_error(tmp_path):
    (tmp_path / "plain-file").write_bytes(b"x")
    with pytest.raises(GptpipeError, match="could not write"):
        storage.put_bytes(str(tmp_path / "plain-file" / "obj.bin"), b"data")


# ----------------------------------------------------------------------------- a full disk

TINY_DISK_BYTES = 256 << 10


@contextmanager
def mounted_tiny_disk(folder: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs in folder, to fill up for real; skips the test unless it can be
    mounted (that needs root)."""
    mount = folder / "tiny-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TINY_DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture()
def tiny_disk(tmp_path) -> Iterator[Path]:
    with mounted_tiny_disk(tmp_path) as mount:
        yield mount


def many_ids(n: int = 1_000_000) -> np.ndarray:
    """Random token ids: they do not compress, so their Parquet file is several times the disk."""
    return np.random.default_rng(0).integers(0, 60_000, n).astype(np.uint16)


def test_a_full_disk_under_a_parquet_writer_is_a_gptpipe_error_and_keeps_the_old_file(tiny_disk):
    uri = str(tiny_disk / "shard-00000.parquet")
    old = np.arange(100, dtype=np.uint16)
    write_tokens(old, uri, {"vocab_size": 65536})
    ids = many_ids()
    with pytest.raises(GptpipeError) as info, storage.open_write(uri) as f:
        write_tokens(ids, f, {"vocab_size": 65536, "n_tokens": len(ids)})
    assert str(info.value) == f"could not write {uri}: No space left on device"
    assert files_under(tiny_disk) == ["shard-00000.parquet"]  # no temporary file left
    assert np.array_equal(read_tokens(uri)[0], old)


@pytest.mark.parametrize("write", ["put_bytes", "put_file"])
def test_a_full_disk_under_put_is_a_gptpipe_error_and_keeps_the_old_file(
    write, tiny_disk, tmp_path
):
    uri = str(tiny_disk / "summary.json")
    storage.put_bytes(uri, b"old summary")
    data = os.urandom(2 * TINY_DISK_BYTES)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    with pytest.raises(GptpipeError, match="^could not write .*: No space left on device$"):
        storage.put_bytes(uri, data) if write == "put_bytes" else storage.put_file(uri, source)
    assert files_under(tiny_disk) == ["summary.json"]
    assert storage.get_bytes(uri) == b"old summary"


def test_an_error_of_the_writer_itself_passes_through_unchanged(tmp_path):
    """Only OSErrors become 'could not write': a writer's own GptpipeError keeps its message."""
    uri = str(tmp_path / "shard.parquet")
    storage.put_bytes(uri, b"old")
    bad_chunk = GptpipeError("shard 3: a character outside the vocabulary")
    with pytest.raises(GptpipeError) as info, storage.open_write(uri) as f:
        f.write(b"half a shard")
        raise bad_chunk
    assert info.value is bad_chunk
    assert files_under(tmp_path) == ["shard.parquet"]
    assert storage.get_bytes(uri) == b"old"


# ----------------------------------------------------------------------------- file modes


@pytest.fixture()
def umask():
    """Set the process umask for one test (restored after it)."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def _write_each_way(folder: Path) -> list[Path]:
    source = folder / "source.bin"
    source.write_bytes(b"source")
    storage.put_bytes(str(folder / "summary.json"), b"{}")
    storage.put_file(str(folder / "copy.bin"), source)
    with storage.open_write(str(folder / "loss_curve.png")) as f:
        f.write(b"png")
    return [folder / "summary.json", folder / "copy.bin", folder / "loss_curve.png"]


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(mask, mode, umask, tmp_path):
    """As any new file (and as torch.save's ckpt.pt): 0666 less the umask, not mkstemp's 0600."""
    umask(mask)
    for path in _write_each_way(tmp_path):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path.name
