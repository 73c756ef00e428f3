from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import urlsplit

from prefect import get_run_logger, task

import storage
from model.data import decode_corpus, load_text, sha256_bytes, write_tokens
from model.tokenizer import train_tokenizer
from tasks.cache import cache_key, load_manifest, save_manifest, stage_dir
from tasks.common import IO_RETRIES, describe, stage_run


@task(name="tokenize", **IO_RETRIES)
def tokenize(
    source: str,
    store: str,
    tokenizer: str,
    vocab_size: int | None,
    tracking: dict | None = None,
    refresh: bool = False,
) -> dict:
    """Read the corpus, learn the tokenizer, store the token ids as Parquet (cached on content)."""
    logger = get_run_logger()
    with stage_run(tracking, "tokenize") as run:
        raw = load_text(source)
        source_sha256 = sha256_bytes(raw)
        key = cache_key("tokenize", source_sha256=source_sha256, tokenizer=tokenizer,
                        vocab_size=vocab_size)  # fmt: skip
        folder = stage_dir(store, "tokenize", key)
        manifest = None if refresh else load_manifest(folder)
        cached = manifest is not None
        if manifest is None:
            manifest = _tokenize(raw, source, source_sha256, tokenizer, vocab_size, folder)
            save_manifest(folder, manifest)
        tokenizer_uri = manifest["outputs"]["tokenizer"]["uri"]

        run.log_params({**manifest["metadata"], "source": source, "cached": cached,
                        "cache_key": key})  # fmt: skip
        run.record_io({"source": {"uri": source, "sha256": source_sha256, "bytes": len(raw)}},
                      manifest["outputs"])  # fmt: skip
        run.log_text(storage.get_bytes(tokenizer_uri).decode("utf-8"), "tokenizer.json")
        run.log_dict(manifest, "dataset_manifest.json")
        name = PurePosixPath(urlsplit(source).path).name or "corpus"
        run.log_dataset(source, name, source_sha256, context="tokenize")
    meta = manifest["metadata"]
    if cached:
        logger.info("tokenize: re-using %s (cached: same source and settings)", folder)
    else:
        logger.info("tokenized %s: %d %s tokens (vocab %d) -> %s", source, meta["n_tokens"],
                    meta["tokenizer"], meta["vocab_size"], folder)  # fmt: skip
    return {**manifest, "cached": cached, "mlflow_run_id": run.run_id}


def _tokenize(raw, source, source_sha256, kind, vocab_size, folder) -> dict:
    text = decode_corpus(raw, source)
    tok = train_tokenizer(kind, text, vocab_size)
    ids = tok.encode(text)
    tokenizer_uri = storage.put_bytes(
        storage.join(folder, "tokenizer.json"), tok.to_json().encode("utf-8")
    )
    metadata = {
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "n_tokens": len(ids),
        "source_sha256": source_sha256,
    }
    tokens_uri = storage.join(folder, "tokens.parquet")
    with storage.open_write(tokens_uri) as f:
        write_tokens(ids, f, metadata)
    outputs = {"tokenizer": describe(tokenizer_uri), "tokens": describe(tokens_uri)}
    return {"metadata": metadata, "source": source, "outputs": outputs}
