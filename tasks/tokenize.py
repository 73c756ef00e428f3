"""The tokenize stage: a corpus (one file or many) -> a sharded token dataset, cached on content.

The stage runs in the flow and maps Prefect tasks over the corpus's shards, so the flow's task
runner decides where they run (threads by default, a Dask or Ray cluster when asked):

1. plan: list the input files, key the result on their content, cut the shards (one task);
2. vocabulary: char - the characters of each shard (mapped), merged; bpe - trained on a bounded
   sample of the shards (one task);
3. encode: each shard to its own Parquet token file (mapped);
4. the dataset manifest (shard URIs, sha256, token counts, order), then `manifest.json` last.

With a base tokenizer (a warm start's: the champion's), the vocabulary stays put: char keeps
every id of the base and appends the characters it lacks, sorted; a BPE base is used as it is
(byte-level BPE encodes any text). The base's sha256 is then part of the stage's key.

An http(s) source may carry ``user:password@`` (sent as HTTP basic auth); the stage records and
logs it without them, and the flows take it as a `SourceURL` so that Prefect does not store them.
"""

from __future__ import annotations

import hashlib
import json

from prefect import get_run_logger, task, unmapped
from pydantic import SecretStr

import storage
from model.corpus import (
    DEFAULT_SHARD_BYTES,
    list_inputs,
    pieces_from_dicts,
    pieces_to_dicts,
    plan_shards,
    read_shard,
    shard_prefix,
    stage_download,
)
from model.dataset import make_manifest, write_manifest, write_shard_tokens
from model.tokenizer import CharTokenizer, tokenizer_from_json, train_tokenizer
from storage.errors import GptpipeError
from storage.tracking import redact
from tasks.cache import cache_key, load_manifest, stage_dir
from tasks.common import IO_RETRIES, claim_stage, stage_run
from tasks.results import Artifact, TokenizeResult, Workspace, artifact_dicts

# BPE learns its merges from at most this much text, taken evenly from the shards' beginnings.
BPE_SAMPLE_BYTES = 64 << 20


class SourceURL(SecretStr):
    """A source URL with ``user:password@`` in it, as a flow parameter.

    Prefect stores every flow run's parameters (its API and UI show them) as FastAPI's JSON
    encoder makes them, which is ``str()`` for a SecretStr: here the URL without its credentials.
    The flow itself gets the whole URL, which it needs to download the corpus.
    """

    def __str__(self) -> str:
        return redact(self.get_secret_value())


def source_parameter(source: str) -> str | SourceURL:
    """``source`` as a flow's ``source`` parameter: a SourceURL when it may carry credentials."""
    if source.startswith(("http://", "https://")) and "@" in source:
        return SourceURL(source)
    return source


def reveal(source: str | SecretStr) -> str:
    """The whole source, credentials included (for downloading it, never for showing it)."""
    return source.get_secret_value() if isinstance(source, SecretStr) else source


@task(name="plan-shards", **IO_RETRIES)
def plan(source: str, store: str, settings: dict, shard_bytes: int, refresh: bool) -> dict:
    """The input's files and content key; the cached result, or the shards to tokenize."""
    is_url = source.startswith(("http://", "https://"))
    files_source = stage_download(source, store) if is_url else source
    files = list_inputs(files_source)
    content = [storage.content_id(f.uri) for f in files]
    source_id = hashlib.sha256(json.dumps(content).encode()).hexdigest()
    key = cache_key("tokenize", source_id=source_id, shard_bytes=shard_bytes, **settings)
    folder = stage_dir(store, "tokenize", key)
    manifest = None if refresh else load_manifest(folder)
    shards = [] if manifest else [pieces_to_dicts(p) for p in plan_shards(files, shard_bytes)]
    return {
        "key": key,
        "folder": folder,
        "source_id": source_id,
        "files": [
            {"uri": f.uri, "bytes": f.size, "content_id": c}
            for f, c in zip(files, content, strict=True)
        ],
        "manifest": manifest,
        "shards": shards,
    }


@task(name="shard-chars", **IO_RETRIES)
def shard_chars(pieces: list[dict]) -> str:
    """The distinct characters of one shard, sorted (the map half of the char vocabulary)."""
    return "".join(CharTokenizer.train(read_shard(pieces_from_dicts(pieces))).vocab)


@task(name="train-bpe", **IO_RETRIES)
def train_bpe(shards: list[list[dict]], vocab_size: int, sample_bytes: int) -> str:
    """A BPE tokenizer learned on a bounded sample: each shard's beginning, cut at a safe cut."""
    per_shard = max(sample_bytes // len(shards), 1)
    sample = "".join(shard_prefix(pieces_from_dicts(p), per_shard) for p in shards)
    return train_tokenizer("bpe", sample, vocab_size).to_json()


@task(name="encode-shard", **IO_RETRIES)
def encode_shard(index: int, pieces: list[dict], tokenizer_uri: str, folder: str) -> dict:
    """One shard's text -> its Parquet token file; returns the shard's manifest entry."""
    tok = tokenizer_from_json(storage.get_bytes(tokenizer_uri).decode("utf-8"))
    text = read_shard(pieces_from_dicts(pieces))
    uri = storage.join(folder, f"shard-{index:05d}.parquet")
    with storage.open_write(uri) as f:
        n_tokens = write_shard_tokens(tok, text, f, {"shard": index}, what=f"shard {index}")
    entry = Artifact.of(uri).to_dict()
    return {**entry, "n_tokens": n_tokens, "source_chars": len(text), "pieces": pieces}


def tokenize(
    source: str | SecretStr,
    workspace: Workspace,
    *,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    bpe_sample_bytes: int = BPE_SAMPLE_BYTES,
    base_tokenizer: Artifact | str | None = None,
) -> TokenizeResult:
    """Run the stage from a flow (see the module docstring): the dataset and its tokenizer.

    base_tokenizer: a tokenizer JSON (its Artifact, or its URI) whose ids the new tokenizer
    keeps (see the module docstring); None: a fresh vocabulary. Its kind must be `tokenizer`.
    """
    logger = get_run_logger()
    base = _base_tokenizer(base_tokenizer, tokenizer)
    # `shown` is what the stage records and logs; only the plan task, which downloads an http(s)
    # source, gets the URL with its credentials (Prefect does not store task parameters)
    url = reveal(source)
    shown = redact(url)
    with stage_run(workspace.tracking, "tokenize") as run:
        settings = _key_settings(tokenizer, vocab_size, bpe_sample_bytes, base)
        refresh = workspace.refreshes("tokenize")
        planned = plan(url, workspace.store, settings, shard_bytes, refresh)
        folder, manifest = planned["folder"], planned["manifest"]
        cached = manifest is not None
        if not cached:
            with claim_stage(workspace, "tokenize", planned["key"], logger.info) as found:
                manifest, cached = found.manifest, found.manifest is not None  # waited for it
                if not cached:
                    manifest = _tokenize_shards(
                        planned, tokenizer, vocab_size, bpe_sample_bytes, base
                    )
                    manifest["source"] = shown
                    found.save(manifest)
        _record(run, planned, manifest, shown=shown, cached=cached)
    meta = manifest["metadata"]
    n_files = len(planned["files"])
    if cached:
        logger.info("tokenize: re-using %s (cached: same source and settings)", folder)
    else:
        logger.info(
            "tokenized %s: %d %s tokens (vocab %d) in %d shard(s) from %d file(s) -> %s",
            shown,
            meta["n_tokens"],
            meta["tokenizer"],
            meta["vocab_size"],
            meta["n_shards"],
            n_files,
            folder,
        )
    if base is not None:
        added = meta["vocab_size"] - meta["base_vocab_size"]
        logger.info(
            "tokenize: kept the %d ids of the base tokenizer %s%s",
            meta["base_vocab_size"],
            base.uri,
            f", appended {added} new character(s)" if added else "",
        )
    return TokenizeResult.from_manifest(manifest, cached=cached, mlflow_run_id=run.run_id)


def _key_settings(
    kind: str, vocab_size: int | None, bpe_sample_bytes: int, base: Artifact | None
) -> dict:
    """The tokenizer settings the stage's key holds (with the input's content and shard size)."""
    settings = {"tokenizer": kind, "vocab_size": vocab_size}
    if kind == "bpe":
        settings["bpe_sample_bytes"] = bpe_sample_bytes
    if base is not None:  # only then: the keys of fresh vocabularies stay as they were
        settings["base_tokenizer"] = base.sha256
    return settings


def _record(run, planned: dict, manifest: dict, *, shown: str, cached: bool) -> None:
    """The stage's MLflow run: its params, the source (``shown``: without credentials) and the
    dataset it became, the tokenizer and the dataset manifest."""
    run.log_params(
        {
            **manifest["metadata"],
            "source": shown,
            "cached": cached,
            "cache_key": planned["key"],
            "n_files": len(planned["files"]),
        }
    )
    source_ref = {
        "uri": shown,
        "content_sha256": planned["source_id"],
        "bytes": sum(f["bytes"] for f in planned["files"]),
    }
    run.record_io({"source": source_ref}, manifest["outputs"])
    tokenizer_json = storage.get_bytes(manifest["outputs"]["tokenizer"]["uri"]).decode()
    run.log_text(tokenizer_json, "tokenizer.json")
    run.log_dict(manifest, "dataset_manifest.json")
    run.log_dataset(shown, _dataset_name(shown), planned["source_id"], context="tokenize")


def _dataset_name(source: str) -> str:
    from pathlib import PurePosixPath
    from urllib.parse import urlsplit

    return PurePosixPath(urlsplit(source.rstrip("/*")).path).name or "corpus"


def _base_tokenizer(base: Artifact | str | None, kind: str) -> Artifact | None:
    """The base tokenizer's Artifact (a URI is hashed now), checked to be of ``kind``."""
    if base is None:
        return None
    if isinstance(base, str):
        if not storage.exists(base):
            raise GptpipeError(f"base tokenizer {base}: no such file")
        base = Artifact.of(base)
    tok = tokenizer_from_json(storage.get_bytes(base.uri).decode("utf-8"))
    if tok.kind != kind:
        raise GptpipeError(
            f"the base tokenizer {base.uri} is {tok.kind} and this run's tokenizer is {kind}: "
            f"set tokenizer={tok.kind} to keep its vocabulary, or use a fresh vocabulary"
        )
    return base


def _tokenize_shards(
    planned: dict,
    kind: str,
    vocab_size: int | None,
    sample_bytes: int,
    base: Artifact | None = None,
) -> dict:
    folder, shards = planned["folder"], planned["shards"]
    base_tok = tokenizer_from_json(storage.get_bytes(base.uri).decode()) if base else None
    if kind == "char":
        charsets = shard_chars.map(shards).result()  # map ...
        chars = set().union(*charsets)  # ... reduce
        if isinstance(base_tok, CharTokenizer):
            tokenizer_json = base_tok.extended(chars).to_json()  # the base's ids, then new ones
        else:
            tokenizer_json = CharTokenizer(sorted(chars)).to_json()
    elif base_tok is not None:
        tokenizer_json = base_tok.to_json()  # byte-level: it encodes any text as it is
    else:
        tokenizer_json = train_bpe(shards, vocab_size, sample_bytes)
    tokenizer_uri = storage.put_bytes(
        storage.join(folder, "tokenizer.json"), tokenizer_json.encode("utf-8")
    )
    tok = tokenizer_from_json(tokenizer_json)
    entries = encode_shard.map(
        range(len(shards)), shards, unmapped(tokenizer_uri), unmapped(folder)
    ).result()
    metadata = {
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "n_tokens": sum(e["n_tokens"] for e in entries),
        "n_shards": len(entries),
        "source_id": planned["source_id"],
    }
    if base is not None:
        metadata["base_tokenizer_sha256"] = base.sha256
        metadata["base_vocab_size"] = base_tok.vocab_size
    dataset = make_manifest(
        entries, tokenizer=tok.kind, vocab_size=tok.vocab_size, files=planned["files"]
    )
    dataset_uri = write_manifest(storage.join(folder, "dataset.json"), dataset)
    outputs = artifact_dicts(
        {"tokenizer": Artifact.of(tokenizer_uri), "tokens": Artifact.of(dataset_uri)}
    )
    return {"metadata": metadata, "outputs": outputs}
