"""Issue 7: many-file inputs, shards, the sharded dataset, the streaming loader, sharded splits,
and the tokenize stage mapped over real Dask and Ray clusters."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import model.dataset
from bench.common import train_cli
from model.corpus import Piece, SourceFile, list_inputs, plan_shards, read_shard, shard_prefix
from model.data import read_tokens, split_tokens, windows_at, write_tokens
from model.dataset import (
    SHARD_ROW_GROUP_SIZE,
    TokenDataset,
    make_manifest,
    open_dataset,
    read_manifest,
    write_manifest,
    write_shard_tokens,
)
from model.tokenizer import tokenizer_from_json, train_tokenizer
from storage.errors import GptpipeError
from tests.conftest import run_cli
from tests.quiet_http import QuietHTTPServer

SAFE = re.compile(rb"[\x21-\x7e]\n[\x21-\x7e]")


@pytest.fixture(scope="module")
def shakespeare(corpus_path) -> str:
    return corpus_path.read_text(encoding="utf-8")[:300_000]


@pytest.fixture()
def many_files(shakespeare, tmp_path) -> tuple[Path, str]:
    """40 files whose ends make every kind of boundary (blank lines, no final newline, leading
    spaces), some nested, plus a hidden and an empty file that are not part of the corpus."""
    folder = tmp_path / "texts"
    (folder / "b-nested").mkdir(parents=True)
    text = shakespeare[:120_000]
    # files end at safe line breaks, but for three: no final newline, leading spaces, mid-line
    safe = [m.start() + 2 for m in SAFE.finditer(text.encode())]  # all-ASCII text
    cuts = [0, *sorted({next(c for c in safe if c >= k) for k in range(1_000, 115_000, 2_957)})]
    cuts = [*cuts[:40], len(text)]
    cuts[20] -= 5
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    pieces[3] = pieces[3].rstrip("\n")  # a file without a final newline
    pieces[7] = "   " + pieces[7]  # a file starting with spaces
    names = [f"{'b-nested/' if 10 <= i < 15 else ''}{i:03d}.txt" for i in range(len(pieces))]
    for name, piece in zip(names, pieces, strict=True):
        (folder / name).write_text(piece, encoding="utf-8")
    (folder / ".hidden.txt").write_text("not corpus", encoding="utf-8")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    ordered = [folder / n for n in sorted(str(Path(n)) for n in names)]
    return folder, "".join(p.read_text(encoding="utf-8") for p in sorted(ordered))


def _files(paths) -> list[SourceFile]:
    return [SourceFile(str(p), Path(p).stat().st_size) for p in paths]


# ------------------------------------------------------------------------------ inputs, shards


def test_a_directory_is_its_files_in_sorted_order(many_files):
    folder, expected = many_files
    files = list_inputs(str(folder))
    names = [Path(f.uri).relative_to(folder).as_posix() for f in files]
    assert names == sorted(names) and ".hidden.txt" not in names and "empty.txt" not in names
    assert any(n.startswith("b-nested/") for n in names)
    shards = plan_shards(files, 4_096)
    assert "".join(read_shard(s) for s in shards) == expected


def test_a_glob_takes_the_matching_files(many_files):
    folder, _ = many_files
    files = list_inputs(str(folder / "00*.txt"))
    assert [Path(f.uri).name for f in files] == [f"{i:03d}.txt" for i in range(10)]
    with pytest.raises(GptpipeError, match="matches no files"):
        list_inputs(str(folder / "*.nothing"))


def test_a_large_file_is_cut_at_safe_lines_near_the_target(shakespeare, tmp_path):
    path = tmp_path / "big.txt"
    path.write_text(shakespeare, encoding="utf-8")
    raw = path.read_bytes()
    shards = plan_shards(_files([path]), 16_384)
    assert len(shards) > 10
    for shard in shards[:-1]:
        (piece,) = shard
        size = piece.end - piece.start
        assert 16_384 <= size < 16_384 + 2_000  # cut at the first safe line after the target
        assert SAFE.fullmatch(raw[piece.end - 2 : piece.end + 1])  # "x\nY": after the newline
    assert "".join(read_shard(s) for s in shards) == shakespeare


def test_unsafe_file_boundaries_keep_the_files_in_one_shard(tmp_path):
    texts = {
        "a.txt": "no final newline",
        "b.txt": "next\n",
        "c.txt": "  leading spaces\n",
        "d.txt": "Safe start\n",
        "e.txt": "last\n",
    }
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    shards = plan_shards(_files(sorted(tmp_path.iterdir())), 1 << 20)
    names = [[Path(p.uri).name for p in shard] for shard in shards]
    # a|b: no newline at a's end; b|c: c starts with spaces; c|d and d|e are safe cuts
    assert names == [["a.txt", "b.txt", "c.txt"], ["d.txt"], ["e.txt"]]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_shard_by_shard_ids_equal_whole_text_ids(kind, many_files, shakespeare, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(shakespeare[:150_000], encoding="utf-8")
    for files, text in (
        (list_inputs(str(many_files[0])), many_files[1]),
        (_files([big]), shakespeare[:150_000]),
    ):
        tok = train_tokenizer(kind, text, 400)
        shards = plan_shards(files, 8_192)
        assert len(shards) >= 8
        by_shard = np.concatenate([tok.encode(read_shard(s)) for s in shards])
        assert np.array_equal(by_shard, tok.encode(text))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_shard_token_file_holds_the_texts_ids(kind, shakespeare, tmp_path, monkeypatch):
    # char shards are encoded in chunks (made small here, so there are several)
    monkeypatch.setattr(model.dataset, "ENCODE_CHUNK_CHARS", 3 * SHARD_ROW_GROUP_SIZE)
    text = shakespeare[:500_000]
    tok = train_tokenizer(kind, text, 400)
    n_tokens = write_shard_tokens(tok, text, tmp_path / "s.parquet", {"shard": 7}, what="shard 7")
    ids, meta = read_tokens(tmp_path / "s.parquet")
    assert np.array_equal(ids, tok.encode(text)) and n_tokens == len(ids)
    assert meta == {
        "tokenizer": kind,
        "vocab_size": tok.vocab_size,
        "n_tokens": n_tokens,
        "shard": 7,
    }
    if kind == "char":
        bad = text[: 4 * SHARD_ROW_GROUP_SIZE] + "€"  # an unknown character in the second chunk
        with pytest.raises(GptpipeError, match=r"^shard 7 has characters .*: '€'"):
            write_shard_tokens(tok, bad, tmp_path / "s.parquet", {}, what="shard 7")
        assert np.array_equal(read_tokens(tmp_path / "s.parquet")[0], ids)  # the file stands


def test_bad_bytes_are_named_by_file_and_offset(tmp_path):
    (tmp_path / "a.txt").write_text("First line\nSecond line\n" * 100, encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"Fine text\n" * 50 + b"bad \xff byte\n")
    shards = plan_shards(list_inputs(str(tmp_path)), 256)
    with pytest.raises(GptpipeError) as err:
        [read_shard(s) for s in shards]
    assert f"{tmp_path / 'b.txt'} is not UTF-8 text: invalid byte 0xff at offset 504" in str(
        err.value
    )


def test_an_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(GptpipeError, match="has no files"):
        list_inputs(str(tmp_path))


# ------------------------------------------------------------------------------ dataset, loader


def _dataset(tmp_path: Path, ids: np.ndarray, cuts: list[int]) -> str:
    shards = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        uri = str(tmp_path / f"shard-{i:05d}.parquet")
        write_tokens(
            ids[a:b],
            uri,
            {"vocab_size": 65, "n_tokens": b - a},
            row_group_size=SHARD_ROW_GROUP_SIZE,
        )
        shards.append({"uri": uri, "n_tokens": b - a})
    return write_manifest(
        str(tmp_path / "dataset.json"), make_manifest(shards, tokenizer="char", vocab_size=65)
    )


@pytest.fixture()
def sharded(tmp_path) -> tuple[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, 65, 700_000).astype(np.uint16)
    return _dataset(tmp_path, ids, [0, 5, 250_000, 250_001, 480_000, 700_000]), ids


def test_the_streaming_loader_reads_only_the_row_groups_it_samples(sharded):
    uri, ids = sharded
    budget = 4 * SHARD_ROW_GROUP_SIZE * 2  # room for 4 row groups of uint16
    data = TokenDataset(read_manifest(uri), max_bytes=budget)
    total_groups = len(data.group_starts) - 1
    assert data.streaming and data.row_groups_read == 0 and total_groups >= 12
    whole = torch.from_numpy(ids.astype(np.int64))
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        ix = torch.randint(len(data) - 64, (2,), generator=gen)
        x, y = data.windows(ix, 64)
        wx, wy = windows_at(whole, ix, 64)
        assert torch.equal(x, wx) and torch.equal(y, wy)
    assert data.row_groups_read <= 3 * 2 * 2 < total_groups  # at most 2 groups per window
    assert data._cached_bytes <= budget


def test_windows_cross_shard_and_row_group_boundaries(sharded):
    uri, ids = sharded
    data = TokenDataset(read_manifest(uri), max_bytes=0)  # stream everything
    whole = torch.from_numpy(ids.astype(np.int64))
    # starts just before: a 1-token shard, a shard end, a row group end
    ix = torch.tensor([0, 3, 249_990, 250_000 - 1, SHARD_ROW_GROUP_SIZE - 3, 479_999 - 10])
    x, y = data.windows(ix, 32)
    wx, wy = windows_at(whole, ix, 32)
    assert torch.equal(x, wx) and torch.equal(y, wy)


def test_a_dataset_that_fits_is_read_once_into_memory(sharded):
    uri, ids = sharded
    data = TokenDataset(read_manifest(uri))
    assert not data.streaming and data.row_groups_read == len(data.group_starts) - 1
    assert np.array_equal(data.ids(), ids)
    assert np.array_equal(open_dataset(uri, max_bytes=0).ids(), ids)  # streamed: the same


def test_a_changed_shard_is_caught(sharded):
    uri, ids = sharded
    manifest = read_manifest(uri)
    write_tokens(ids[:10], manifest["shards"][1]["uri"], {"vocab_size": 65})
    with pytest.raises(GptpipeError, match="has 10 tokens but its dataset manifest says"):
        TokenDataset(manifest)


def open_fds(folder: str | Path) -> int:
    """This process's open files in folder (the dataset's shards).

    Only those: counting every descriptor failed in the full suite, where sockets and pipes of
    earlier tests' servers close at any moment.
    """
    folder = str(Path(folder).resolve()) + os.sep
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(target.startswith(folder) for target in targets)


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")


@pytest.fixture()
def twenty_shards(tmp_path) -> tuple[str, np.ndarray]:
    ids = np.random.default_rng(1).integers(0, 65, 200_000).astype(np.uint16)
    return _dataset(tmp_path, ids, list(range(0, 200_001, 10_000))), ids


@needs_proc
def test_a_resident_dataset_closes_its_shard_files_once_loaded(twenty_shards):
    uri, ids = twenty_shards
    folder = Path(uri).parent
    data = TokenDataset(read_manifest(uri))
    assert not data.streaming and len(data.manifest["shards"]) == 20
    assert open_fds(folder) == 0
    assert np.array_equal(data.ids(), ids)


@needs_proc
def test_a_streaming_dataset_closes_its_shard_files_on_close(twenty_shards):
    uri, ids = twenty_shards
    whole = torch.from_numpy(ids.astype(np.int64))
    ix = torch.tensor([0, 9_990, 123_456])
    folder = Path(uri).parent
    with TokenDataset(read_manifest(uri), max_bytes=0) as data:
        assert data.streaming
        assert torch.equal(data.windows(ix, 32)[0], windows_at(whole, ix, 32)[0])
        assert open_fds(folder) == 20  # kept open while streaming: no footer read per batch
    assert open_fds(folder) == 0
    # still usable: it opens what it needs again, until closed again
    assert torch.equal(data.windows(ix, 32)[1], windows_at(whole, ix, 32)[1])
    assert open_fds(folder) > 0
    data.close()
    assert open_fds(folder) == 0


@needs_proc
def test_a_dataset_that_fails_to_open_leaves_no_file_open(twenty_shards):
    uri, ids = twenty_shards
    manifest = read_manifest(uri)
    write_tokens(ids[:10], manifest["shards"][-1]["uri"], {"vocab_size": 65})
    with pytest.raises(GptpipeError, match="has 10 tokens but its dataset manifest says") as info:
        TokenDataset(manifest, max_bytes=0)
    # closed by the dataset itself, not by the garbage collector: the traceback kept here holds
    # the half-built dataset, as a caller logging the error would
    assert info.traceback and open_fds(Path(uri).parent) == 0


@pytest.mark.slow
def test_streamed_training_equals_in_memory_training(char_dataset, tmp_path):
    """The same run, once with the data in memory and once streamed row group by row group."""
    import os
    import subprocess

    losses = []
    for name, budget in (("memory", None), ("streamed", "1000")):
        env = {k: v for k, v in os.environ.items() if k != "GPTPIPE_MAX_RESIDENT_BYTES"}
        if budget:
            env["GPTPIPE_MAX_RESIDENT_BYTES"] = budget
        out = tmp_path / name
        done = subprocess.run(
            [
                *train_cli(char_dataset, str(out)),
                "--preset",
                "seed",
                "--set",
                "max_iters=12",
                "--set",
                "eval_interval=6",
                "--set",
                "eval_iters=2",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        losses.append(json.loads((out / "summary.json").read_text())["history"])
    assert losses[0] == losses[1] and len(losses[0]) >= 3


# ------------------------------------------------------------------------------ split


def test_the_fraction_split_across_shards_equals_the_whole_split(sharded, tmp_path):
    from tasks.split import _split

    uri, ids = sharded
    out = _split(uri, str(tmp_path / "split"), 0.1, 32, 0)
    train_ref, val_ref = split_tokens(ids, 0.1, 32)
    train_uri, val_uri = out["outputs"]["train"]["uri"], out["outputs"]["val"]["uri"]
    assert np.array_equal(open_dataset(train_uri).ids(), train_ref)
    assert np.array_equal(open_dataset(val_uri).ids(), val_ref)
    assert out["metadata"]["n_train_tokens"] == len(train_ref) == 630_000
    # only the shard the cut falls in is rewritten; the others are referenced where they are
    written = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert written == ["train-tail.parquet", "train.json", "val-head.parquet", "val.json"]
    train_shards = [s["uri"] for s in read_manifest(train_uri)["shards"]]
    assert train_shards[:3] == [s["uri"] for s in read_manifest(uri)["shards"][:3]]


def test_val_shards_takes_whole_trailing_shards(sharded, tmp_path):
    from tasks.split import _split

    uri, ids = sharded
    out = _split(uri, str(tmp_path / "split"), 0.1, 32, 2)
    assert np.array_equal(open_dataset(out["outputs"]["val"]["uri"]).ids(), ids[250_001:])
    assert np.array_equal(open_dataset(out["outputs"]["train"]["uri"]).ids(), ids[:250_001])
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["train.json", "val.json"]
    with pytest.raises(GptpipeError, match="the dataset has 5 shard"):
        _split(uri, str(tmp_path / "split2"), 0.1, 32, 5)


# ------------------------------------------------------------------------------ the stage, engines


def _tokenize_cli(args, env, cwd, store):
    result = run_cli(["tokenize", *args, "--store", str(store)], env, cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dataset = next(Path(store).glob("datasets/tokenize-*/dataset.json"))
    return result, dataset


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_tokenize_on_a_cluster_equals_one_process(runner, many_files, cli_env, tmp_path):
    pytest.importorskip(f"prefect_{runner}", reason=f"needs the {runner} extra")
    folder, text = many_files
    args = ["--input", str(folder), "--shard-size", "8K"]
    _, one = _tokenize_cli(args, cli_env, tmp_path, tmp_path / "one")
    result, two = _tokenize_cli(
        [*args, "--task-runner", runner, "--workers", "2"], cli_env, tmp_path, tmp_path / "two"
    )
    output = result.stdout + result.stderr
    assert "Dask cluster" in output if runner == "dask" else "Ray" in output
    manifest = read_manifest(str(two))
    assert len(manifest["shards"]) >= 8 and f"in {len(manifest['shards'])} shard(s)" in output
    ids = open_dataset(str(two)).ids()
    assert np.array_equal(ids, open_dataset(str(one)).ids())
    tok = tokenizer_from_json((two.parent / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok.vocab == sorted(set(text))  # the map-reduce vocabulary is the whole text's
    assert np.array_equal(ids, tok.encode(text))
    # each shard file records its own token count, in order
    counts = [s["n_tokens"] for s in manifest["shards"]]
    assert sum(counts) == len(ids) == manifest["n_tokens"]


@pytest.mark.slow
def test_bpe_through_the_stage_equals_whole_text_encoding(many_files, cli_env, tmp_path):
    folder, text = many_files
    _, dataset = _tokenize_cli(
        [
            "--input",
            str(folder),
            "--shard-size",
            "8K",
            "--set",
            "tokenizer=bpe",
            "--set",
            "vocab_size=400",
        ],
        cli_env,
        tmp_path,
        tmp_path / "store",
    )
    tok = tokenizer_from_json((dataset.parent / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok.kind == "bpe" and tok == train_tokenizer("bpe", text, 400)  # sample = all of it
    assert np.array_equal(open_dataset(str(dataset)).ids(), tok.encode(text))


def test_bpe_learns_from_a_bounded_sample(tmp_path, shakespeare):
    path = tmp_path / "big.txt"
    path.write_text(shakespeare, encoding="utf-8")
    shards = plan_shards(_files([path]), 50_000)
    prefix = shard_prefix(shards[1], 10_000)
    start = shards[1][0].start
    assert 9_000 < len(prefix) <= 10_000
    assert shakespeare.encode()[start : start + len(prefix.encode())].decode() == prefix
    assert SAFE.fullmatch(shakespeare.encode()[start + len(prefix) - 2 : start + len(prefix) + 1])
    assert shard_prefix([Piece(str(path), 0, 100)], 1_000) == shakespeare[:100]


@pytest.mark.slow
def test_s3_prefix_input_and_store_with_dask_and_streaming(s3_env, many_files, cli_env, tmp_path):
    """Many objects under an s3:// prefix, the store on S3, tokenized on Dask, the val set as the
    last whole shard, and training streaming its row groups from S3."""
    import boto3

    folder, text = many_files
    client = boto3.client("s3", endpoint_url=s3_env.endpoint)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"texts/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=s3_env.bucket, Key=key, Body=path.read_bytes())
    env = {
        **cli_env,
        **{k: v for k, v in __import__("os").environ.items() if k.startswith("AWS_")},
        "GPTPIPE_MAX_RESIDENT_BYTES": "50000",
    }
    store = f"s3://{s3_env.bucket}/store"
    result = run_cli(
        [
            "run",
            "--input",
            f"s3://{s3_env.bucket}/texts/",
            "--store",
            store,
            "--shard-size",
            "16K",
            "--val-shards",
            "1",
            "--task-runner",
            "dask",
            "--workers",
            "2",
            "--preset",
            "seed",
            "--set",
            "max_iters=10",
            "--set",
            "eval_interval=5",
            "--set",
            "eval_iters=2",
            "--sample-tokens",
            "20",
        ],
        env,
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "streaming the row groups each batch samples" in result.stdout + result.stderr
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_env.bucket)["Contents"]]
    dataset = next(k for k in keys if k.endswith("dataset.json") and "/tokenize-" in k)
    ids = open_dataset(f"s3://{s3_env.bucket}/{dataset}").ids()
    tok_key = dataset.replace("dataset.json", "tokenizer.json")
    tok = tokenizer_from_json(
        client.get_object(Bucket=s3_env.bucket, Key=tok_key)["Body"].read().decode()
    )
    assert np.array_equal(ids, tok.encode(text))
    val = next(k for k in keys if k.endswith("/val.json"))
    val_manifest = read_manifest(f"s3://{s3_env.bucket}/{val}")
    assert len(val_manifest["shards"]) == 1  # --val-shards 1: the last whole shard
    assert "/tokenize-" in val_manifest["shards"][0]["uri"]  # referenced, not copied


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "2"], "--dask-address and --workers need --task-runner dask"),
        (["--task-runner", "dask", "--workers", "0"], "--workers must be at least 1"),
        (
            ["--dask-address", "tcp://127.0.0.1:1", "--task-runner", "ray"],
            "--dask-address goes with --task-runner dask",
        ),
        (["--shard-size", "lots"], "not a size"),
    ],
)
def test_engine_settings_errors(args, message, small_corpus, tmp_path):
    import os

    result = run_cli(
        ["tokenize", "--input", str(small_corpus), "--store", str(tmp_path / "s"), *args],
        dict(os.environ),
        tmp_path,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "s" / "datasets").exists()


@pytest.mark.slow
def test_val_shards_beyond_the_dataset_is_a_clear_error(small_corpus, cli_env, tmp_path):
    result = run_cli(
        [
            "run",
            "--input",
            str(small_corpus),
            "--store",
            str(tmp_path / "s"),
            "--val-shards",
            "3",
            "--preset",
            "seed",
        ],
        cli_env,
        tmp_path,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "--val-shards 3: the dataset has 1 shard(s)" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_an_http_input_is_staged_into_the_store(small_corpus, cli_env, tmp_path):
    """Workers range-read shards, so a URL's content is copied into the store first."""
    import functools
    import hashlib
    import http.server
    import threading

    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(small_corpus.parent)
    )
    server = QuietHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{small_corpus.name}"
        _, dataset = _tokenize_cli(
            ["--input", url, "--shard-size", "16K"], cli_env, tmp_path, tmp_path / "store"
        )
    finally:
        server.shutdown()
    raw = small_corpus.read_bytes()
    staged = tmp_path / "store" / "sources" / f"{hashlib.sha256(raw).hexdigest()}.txt"
    assert staged.read_bytes() == raw
    text = raw.decode("utf-8")
    tok = tokenizer_from_json((dataset.parent / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(read_manifest(str(dataset))["shards"]) >= 3
    assert np.array_equal(open_dataset(str(dataset)).ids(), tok.encode(text))


def _worker_env(cli_env: dict[str, str]) -> dict[str, str]:
    """A cluster's processes: the Prefect server of the tests, Ray without its token auth."""
    return {**cli_env, "RAY_AUTH_MODE": "disabled"}


@pytest.mark.slow
def test_tokenize_on_a_running_dask_scheduler(many_files, cli_env, tmp_path):
    """`--dask-address`: a scheduler and two worker processes started apart from gptpipe."""
    pytest.importorskip("prefect_dask", reason="needs the dask extra")
    import subprocess
    import sys

    from distributed import Client

    from tests.conftest import free_port, served

    folder, text = many_files
    dask = str(Path(sys.executable).with_name("dask"))
    port, dashboard = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = _worker_env(cli_env)
    scheduler = [
        dask,
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-address",
        f"127.0.0.1:{dashboard}",
    ]
    workers = [
        dask,
        "worker",
        address,
        "--nworkers",
        "2",
        "--nthreads",
        "1",
        "--memory-limit",
        "0",
        "--no-dashboard",
    ]
    with served(
        scheduler, f"http://127.0.0.1:{dashboard}/health", 60, tmp_path / "sched.log", env=env
    ):
        with open(tmp_path / "workers.log", "wb") as log:
            worker = subprocess.Popen(
                workers, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            with Client(address, timeout=30) as client:
                client.wait_for_workers(2, timeout=60)
            result, dataset = _tokenize_cli(
                ["--input", str(folder), "--shard-size", "8K", "--dask-address", address],
                env,
                tmp_path,
                tmp_path / "store",
            )
        finally:
            worker.terminate()
            worker.wait(30)
    assert f"Connecting to an existing Dask cluster at {address}" in result.stdout + result.stderr
    tok = tokenizer_from_json((dataset.parent / "tokenizer.json").read_text(encoding="utf-8"))
    assert np.array_equal(open_dataset(str(dataset)).ids(), tok.encode(text))


@pytest.mark.slow
def test_tokenize_on_a_running_ray_cluster(many_files, cli_env, tmp_path):
    """`--ray-address`: a Ray head started apart from gptpipe (`ray start --head`)."""
    pytest.importorskip("prefect_ray", reason="needs the ray extra")
    import subprocess
    import sys

    from tests.conftest import free_port

    folder, text = many_files
    ray = str(Path(sys.executable).with_name("ray"))
    env = _worker_env(cli_env)
    port = free_port()
    start = subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        result, dataset = _tokenize_cli(
            ["--input", str(folder), "--shard-size", "8K", "--ray-address", f"127.0.0.1:{port}"],
            env,
            tmp_path,
            tmp_path / "store",
        )
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert "Connected to Ray cluster" in result.stdout + result.stderr
    tok = tokenizer_from_json((dataset.parent / "tokenizer.json").read_text(encoding="utf-8"))
    assert np.array_equal(open_dataset(str(dataset)).ids(), tok.encode(text))


def test_an_unreachable_cluster_is_a_clear_error(small_corpus, tmp_path):
    import os

    from tests.conftest import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    result = run_cli(
        [
            "tokenize",
            "--input",
            str(small_corpus),
            "--store",
            str(tmp_path / "s"),
            "--dask-address",
            address,
        ],
        dict(os.environ),
        tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot reach the Dask cluster at {address}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_without_a_prefect_server_the_workers_share_the_temporary_one(small_corpus, tmp_path):
    """No PREFECT_API_URL: one temporary server, started early and handed to the Dask workers
    (they would each start their own otherwise), and stopped at the end."""
    import os
    import urllib.request

    pytest.importorskip("prefect_dask", reason="needs the dask extra")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="0")
    result = run_cli(
        [
            "tokenize",
            "--input",
            str(small_corpus),
            "--store",
            str(tmp_path / "s"),
            "--shard-size",
            "16K",
            "--task-runner",
            "dask",
            "--workers",
            "2",
        ],
        env,
        tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    used = re.findall(r"Using a temporary server on (http://127\.0\.0\.1:\d+)", output)
    assert len(used) == 1 and "Starting temporary server" not in output, output[-3000:]
    assert "in 4 shard(s)" in output
    with pytest.raises(OSError):  # stopped with the command
        urllib.request.urlopen(f"{used[0]}/api/health", timeout=5)


def test_bpe_trained_on_a_bounded_sample_still_encodes_every_shard(shakespeare, tmp_path):
    """Above the bound, BPE learns from each shard's beginning; every shard still round-trips."""
    from model.corpus import pieces_to_dicts
    from tasks.tokenize import train_bpe

    path = tmp_path / "big.txt"
    path.write_text(shakespeare, encoding="utf-8")
    shards = plan_shards(_files([path]), 30_000)
    sample = "".join(shard_prefix(s, 40_000 // len(shards)) for s in shards)
    assert len(sample) <= 40_000 < len(shakespeare)
    tok = tokenizer_from_json(train_bpe.fn([pieces_to_dicts(s) for s in shards], 300, 40_000))
    assert tok == train_tokenizer("bpe", sample, 300)  # learned from the sample, not the whole
    assert tok != train_tokenizer("bpe", shakespeare, 300)
    by_shard = np.concatenate([tok.encode(read_shard(s)) for s in shards])
    assert np.array_equal(by_shard, tok.encode(shakespeare))
    assert tok.decode(by_shard) == shakespeare


# --- one rule for "an address implies a task runner", for the CLI and the nightly flow


@pytest.mark.parametrize(
    "name, dask, ray, expected",
    [
        ("default", None, None, ("default", None)),
        ("ray", None, None, ("ray", None)),
        ("default", "tcp://h:8786", None, ("dask", "tcp://h:8786")),
        ("dask", "tcp://h:8786", None, ("dask", "tcp://h:8786")),
        ("default", None, "h:6379", ("ray", "h:6379")),
        ("ray", None, "h:6379", ("ray", "h:6379")),
    ],
)
def test_an_address_implies_its_task_runner(name, dask, ray, expected):
    from flows.engines import resolve_task_runner

    assert resolve_task_runner(name, dask, ray) == expected


# (the addresses answer nothing: these settings must fail before any cluster is asked)
ADDRESS_ERRORS = [
    ("default", "tcp://h:1", "h:1", "give --dask-address or --ray-address, not both"),
    ("ray", "tcp://127.0.0.1:1", None, "--dask-address goes with --task-runner dask, not ray"),
    ("dask", None, "127.0.0.1:1", "--ray-address goes with --task-runner ray, not dask"),
]


@pytest.mark.parametrize("name, dask, ray, message", ADDRESS_ERRORS)
def test_resolve_task_runner_errors(name, dask, ray, message):
    from flows.engines import resolve_task_runner

    with pytest.raises(GptpipeError) as info:
        resolve_task_runner(name, dask, ray)
    assert str(info.value) == message


def _closed_ray_address() -> str:
    from tests.conftest import free_port

    return f"127.0.0.1:{free_port()}"


def _cli_with(name, dask, ray, small_corpus, env, cwd):
    """`gptpipe tokenize` with these task runner settings; (exit status, stderr)."""
    args = ["--task-runner", name]
    args += ["--dask-address", dask] if dask else []
    args += ["--ray-address", ray] if ray else []
    result = run_cli(
        ["tokenize", "--input", str(small_corpus), "--store", str(cwd / "s"), *args],
        env,
        cwd,
        timeout=120,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-2000:]
    return result.returncode, result.stderr


NIGHTLY = """
import sys
from flows.nightly import nightly_retrain
from storage.errors import GptpipeError
name, dask, ray, source, store = [a or None for a in sys.argv[1:]]
try:
    nightly_retrain(
        data={"source": source, "store": store},
        compute={"task_runner": name, "dask_address": dask, "ray_address": ray},
    )
except GptpipeError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _nightly_with(name, dask, ray, small_corpus, env, cwd):
    """The nightly flow, run for real, with these task runner parameters; (exit status, stderr)."""
    import subprocess
    import sys

    args = [name, dask or "", ray or "", str(small_corpus), str(cwd / "s")]
    result = subprocess.run(
        [sys.executable, "-c", NIGHTLY, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stderr


CALLERS = {"cli": _cli_with, "nightly": _nightly_with}
CALLER_PARAMS = ["cli", pytest.param("nightly", marks=pytest.mark.slow)]


@pytest.mark.parametrize("caller", CALLER_PARAMS)
@pytest.mark.parametrize("name, dask, ray, message", ADDRESS_ERRORS)
def test_both_callers_refuse_a_wrong_address(
    caller, name, dask, ray, message, small_corpus, cli_env, tmp_path
):
    from flows.request import DEPLOYMENT

    status, stderr = CALLERS[caller](name, dask, ray, small_corpus, cli_env, tmp_path)
    # each caller names the settings as its user writes them: flags, or deployment parameters
    said = DEPLOYMENT.say(message) if caller == "nightly" else message
    assert status == 2 and f"error: {said}" in stderr, stderr[-2000:]
    assert not (tmp_path / "s" / "datasets").exists()


@pytest.mark.parametrize("caller", CALLER_PARAMS)
def test_both_callers_take_a_ray_address_alone_for_ray(caller, small_corpus, cli_env, tmp_path):
    """A Ray address with the default runner means Ray: the one at that address is asked for."""
    pytest.importorskip("prefect_ray", reason="needs the ray extra")
    address = _closed_ray_address()
    status, stderr = CALLERS[caller]("default", None, address, small_corpus, cli_env, tmp_path)
    assert status == 2, stderr[-2000:]
    assert f"error: cannot reach the Ray cluster at {address}" in stderr, stderr[-2000:]
