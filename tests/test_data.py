"""Data layer: corpus loading errors, Parquet token files, the lecture split and batches."""

import http.server
import io
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from model.batching import BatchSampler, seed_for
from model.data import (
    ROW_GROUP_SIZE,
    decode_corpus,
    load_text,
    read_tokens,
    sha256_bytes,
    split_tokens,
    write_tokens,
)
from model.dataset import open_dataset
from model.tokenizer import CharTokenizer
from storage.errors import GptpipeError
from tests.quiet_http import QuietHTTPServer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus_bytes() -> bytes:
    if not CORPUS.is_file():
        pytest.skip(f"Tiny Shakespeare corpus not found at {CORPUS}")
    return CORPUS.read_bytes()


@pytest.fixture(scope="module")
def corpus_ids(corpus_bytes) -> np.ndarray:
    text = decode_corpus(corpus_bytes, str(CORPUS))
    return CharTokenizer.train(text).encode(text)


def _meta(ids: np.ndarray, vocab_size: int = 65) -> dict:
    return {"kind": "char", "vocab_size": vocab_size, "n_tokens": len(ids), "source_sha256": "ab"}


# --- load_text / decode_corpus ------------------------------------------------------------------


def test_load_and_decode_corpus(corpus_bytes):
    raw = load_text(str(CORPUS))
    assert raw == corpus_bytes
    text = decode_corpus(raw, str(CORPUS))
    assert len(text) == 1_115_394
    assert sha256_bytes(raw) == sha256_bytes(corpus_bytes)
    assert len(sha256_bytes(raw)) == 64


def test_load_text_missing_path(tmp_path):
    with pytest.raises(GptpipeError, match="not found.*--input PATH"):
        load_text(str(tmp_path / "nope.txt"))


def test_load_text_directory(tmp_path):
    with pytest.raises(GptpipeError, match="is a directory"):
        load_text(str(tmp_path))


def test_load_text_unsupported_scheme():
    with pytest.raises(GptpipeError, match="--input PATH"):
        load_text("ftp://127.0.0.1/x")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_load_text_unreachable_url():
    url = f"http://127.0.0.1:{_closed_port()}/x"
    with pytest.raises(GptpipeError, match=r"cannot download .*pass --input PATH") as info:
        load_text(url)
    assert "\n" not in str(info.value)


def test_load_text_over_http(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"To be, or not to be\n")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert load_text(f"http://127.0.0.1:{port}/c.txt") == b"To be, or not to be\n"
        with pytest.raises(GptpipeError, match="HTTP 404"):
            load_text(f"http://127.0.0.1:{port}/missing.txt")
    finally:
        server.shutdown()
        server.server_close()


def test_decode_corpus_empty():
    with pytest.raises(GptpipeError, match="in.txt is empty"):
        decode_corpus(b"", "in.txt")


def test_decode_corpus_binary():
    with pytest.raises(GptpipeError, match=r"in.bin looks binary \(NUL byte at offset 3\)"):
        decode_corpus(b"abc\x00def", "in.bin")


def test_decode_corpus_not_utf8():
    raw = "héllo".encode("latin-1")
    with pytest.raises(GptpipeError, match=r"in.txt is not UTF-8 .*0xe9 at offset 1"):
        decode_corpus(raw, "in.txt")


# --- token files --------------------------------------------------------------------------------


def test_parquet_round_trip_whole_corpus(tmp_path, corpus_ids):
    path = tmp_path / "tokens.parquet"
    meta = _meta(corpus_ids)
    write_tokens(corpus_ids, path, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.parquet"]  # no temp file left

    schema = pq.read_schema(path)
    assert schema.names == ["ids"]
    assert str(schema.field("ids").type) == "uint16"
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-len(corpus_ids) // ROW_GROUP_SIZE)
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    assert column.compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in column.encodings

    ids, meta_back = read_tokens(path)
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, corpus_ids)
    assert meta_back == meta
    assert isinstance(meta_back["vocab_size"], int)
    assert isinstance(meta_back["source_sha256"], str)


def test_parquet_metadata_is_one_json_blob(tmp_path):
    ids = np.arange(10)
    write_tokens(ids, tmp_path / "t.parquet", _meta(ids, 10))
    schema_meta = pq.read_schema(tmp_path / "t.parquet").metadata
    assert json.loads(schema_meta[b"gptpipe.metadata"]) == _meta(ids, 10)
    assert schema_meta[b"gptpipe.format"] == b"gptpipe-tokens-1"


def test_parquet_small_row_groups_and_file_objects():
    ids = np.random.default_rng(0).integers(0, 500, size=10_000)
    buf = io.BytesIO()
    write_tokens(ids, buf, _meta(ids, 500), row_group_size=1000)
    buf.seek(0)
    assert pq.ParquetFile(buf).metadata.num_row_groups == 10
    buf.seek(0)
    back, meta = read_tokens(buf)
    np.testing.assert_array_equal(back, ids)
    assert meta["vocab_size"] == 500


def test_parquet_uses_uint32_for_big_vocabularies():
    ids = np.array([0, 70_000, 99_999])
    buf = io.BytesIO()
    write_tokens(ids, buf, _meta(ids, 100_000))
    buf.seek(0)
    assert str(pq.read_schema(buf).field("ids").type) == "uint32"
    buf.seek(0)
    np.testing.assert_array_equal(read_tokens(buf)[0], ids)


def test_write_tokens_rejects_bad_metadata():
    buf = io.BytesIO()
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokens(np.arange(3), buf, {"kind": "char"})
    with pytest.raises(ValueError, match="n_tokens"):
        write_tokens(np.arange(3), buf, {"vocab_size": 3, "n_tokens": 4})
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        write_tokens(np.arange(3), buf, {"vocab_size": 2})


def test_write_tokens_in_chunks_equals_one_piece(tmp_path, corpus_ids):
    tok_ids = corpus_ids[:250_000]
    chunks = (tok_ids[i : i + 30_000] for i in range(0, len(tok_ids), 30_000))
    write_tokens(chunks, tmp_path / "chunked.parquet", _meta(tok_ids), row_group_size=65_536)
    write_tokens(tok_ids, tmp_path / "whole.parquet", _meta(tok_ids), row_group_size=65_536)
    chunked, meta = read_tokens(tmp_path / "chunked.parquet")
    np.testing.assert_array_equal(chunked, tok_ids)
    assert meta == _meta(tok_ids)
    # each chunk is written as its own row groups (a short one at each chunk's end)
    assert pq.ParquetFile(tmp_path / "chunked.parquet").metadata.num_row_groups == 9
    assert pq.ParquetFile(tmp_path / "whole.parquet").metadata.num_row_groups == 4


def test_write_tokens_in_chunks_leaves_nothing_when_a_chunk_fails(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"the previous file")

    def chunks(bad):
        yield np.arange(10)
        yield np.array([1, bad])  # out of range
        yield np.arange(10)

    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        write_tokens(chunks(10), path, {"vocab_size": 10, "n_tokens": 22})
    with pytest.raises(ValueError, match="n_tokens=21 but there are 22 ids"):
        write_tokens(chunks(3), path, {"vocab_size": 10, "n_tokens": 21})
    with pytest.raises(ValueError, match="needs n_tokens"):
        write_tokens(chunks(3), path, {"vocab_size": 10})
    assert path.read_bytes() == b"the previous file"  # untouched, and no temp file beside it
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_read_tokens_corrupt_file(tmp_path, corpus_ids):
    path = tmp_path / "t.parquet"
    write_tokens(corpus_ids[:1000], path, _meta(corpus_ids[:1000]))
    data = bytearray(path.read_bytes())
    data[-12:-8] = b"\xff\xff\xff\x7f"  # footer length points outside the file
    path.write_bytes(bytes(data))
    with pytest.raises(GptpipeError, match="is not a readable Parquet token file"):
        read_tokens(path)

    text = tmp_path / "notes.txt"
    text.write_text("just text")
    with pytest.raises(GptpipeError, match=r"notes.txt is not a readable Parquet token file: "):
        read_tokens(text)


def test_read_tokens_foreign_parquet_and_missing_file(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"ids": pa.array([1, 2], pa.uint16())}), tmp_path / "f.parquet")
    with pytest.raises(GptpipeError, match="not a readable Parquet token file"):
        read_tokens(tmp_path / "f.parquet")
    with pytest.raises(GptpipeError, match="not found"):
        read_tokens(tmp_path / "missing.parquet")


# --- split --------------------------------------------------------------------------------------


def test_split_like_the_lecture(corpus_ids):
    train, val = split_tokens(corpus_ids, 0.1, block_size=8)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    np.testing.assert_array_equal(np.concatenate([train, val]), corpus_ids)
    t_train, t_val = split_tokens(torch.from_numpy(corpus_ids), 0.1, block_size=8)
    assert (len(t_train), len(t_val)) == (1_003_854, 111_540)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(GptpipeError, match="val_fraction must be between 0 and 1"):
        split_tokens(np.arange(1000), fraction, 8)


def test_split_rejects_too_short_parts():
    with pytest.raises(GptpipeError, match=r"validation split has 10 tokens .*block_size=32"):
        split_tokens(np.arange(100), 0.1, 32)
    with pytest.raises(GptpipeError, match=r"train split has 9 tokens .*smaller val_fraction"):
        split_tokens(np.arange(100), 0.9, 32)  # int((1 - 0.9) * 100) == 9 in floating point
    with pytest.raises(GptpipeError, match="block_size must be a positive integer"):
        split_tokens(np.arange(100), 0.1, 0)


# --- batches ------------------------------------------------------------------------------------


def _lecture_get_batch(data, batch_size, block_size, generator):
    """The lecture's version, verbatim apart from the explicit generator."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + block_size + 1] for i in ix])
    return x, y


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CPU = torch.device("cpu")


def _sampler(data, batch_size: int, block_size: int, seed: int) -> BatchSampler:
    """One rank's sampler, as training builds it for a single process."""
    return BatchSampler({"train": data}, batch_size, block_size, seed, 0, 1, 1, CPU)


@pytest.mark.parametrize("max_bytes", [None, 1], ids=["resident", "streamed"])
def test_batches_equal_the_lecture(corpus_ids, tmp_path, max_bytes):
    """The batches training draws (a token file opened as training opens it, held in memory or
    streamed by row group) are the lecture's windows for the same generator state."""
    path = tmp_path / "train.parquet"
    write_tokens(corpus_ids, path, _meta(corpus_ids), row_group_size=65_536)
    lecture_data = torch.from_numpy(corpus_ids.astype(np.int64))
    with open_dataset(str(path), max_bytes) as dataset:
        assert dataset.streaming == (max_bytes is not None)
        sampler = _sampler(dataset, 32, 64, seed=1337)
        for step in range(3):
            x, y = sampler.train_batch(step, 0)
            lx, ly = _lecture_get_batch(lecture_data, 32, 64, _gen(seed_for(1337, step)))
            assert torch.equal(x, lx) and torch.equal(y, ly)
    assert x.shape == y.shape == (32, 64)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_batches_accept_uint16(corpus_ids):
    wide = torch.from_numpy(corpus_ids.astype(np.int64))
    narrow = torch.from_numpy(corpus_ids.astype(np.uint16))
    x, y = _sampler(narrow, 4, 16, seed=5).train_batch(0, 0)
    wx, wy = _sampler(wide, 4, 16, seed=5).train_batch(0, 0)
    assert x.dtype == torch.int64 and torch.equal(x, wx) and torch.equal(y, wy)


def test_sampler_ranks_slice_one_global_batch(corpus_ids):
    """2 ranks of batch B together see exactly the windows 1 rank of batch 2B sees."""
    data = {"train": torch.from_numpy(corpus_ids.astype(np.int64))}

    def sampler(batch_size, rank, world_size, accum=1, seed=7):
        return BatchSampler(data, batch_size, 32, seed, rank, world_size, accum, CPU)

    whole = sampler(8, 0, 1).train_batch(step=3, micro=0)[0]
    halves = [sampler(4, r, 2).train_batch(step=3, micro=0)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    micro = [sampler(4, 0, 1, accum=2).train_batch(step=3, micro=m)[0] for m in (0, 1)]
    assert torch.equal(torch.cat(micro), whole)
    assert torch.equal(sampler(8, 0, 1).train_batch(3, 0)[0], whole)  # deterministic
    assert not torch.equal(sampler(8, 0, 1).train_batch(4, 0)[0], whole)  # new step, new data
    assert not torch.equal(sampler(8, 0, 1, seed=8).train_batch(3, 0)[0], whole)


def test_batches_from_too_little_data():
    with pytest.raises(GptpipeError, match="the train split has 8 tokens, too few"):
        _sampler(torch.arange(8), 2, 8, seed=0)
    x, y = _sampler(torch.arange(9), 2, 8, seed=0).train_batch(0, 0)  # exactly one window
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[0], torch.arange(1, 9))
