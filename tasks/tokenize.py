from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import urlsplit

from prefect import get_run_logger, task

import storage
from model.data import decode_corpus, load_text, sha256_bytes, write_tokens
from model.tokenizer import train_tokenizer
from tasks.common import describe, retry_unless_user_error, stage_run


@task(
    name="tokenize",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_user_error,
)
def tokenize(
    source: str, run_uri: str, tokenizer: str, vocab_size: int | None, tracking: dict | None = None
) -> dict:
    """Read the corpus, learn the tokenizer, store the token ids as Parquet."""
    with stage_run(tracking, "tokenize") as run:
        raw = load_text(source)
        text = decode_corpus(raw, source)
        source_sha256 = sha256_bytes(raw)
        tok = train_tokenizer(tokenizer, text, vocab_size)
        ids = tok.encode(text)
        tokenizer_json = tok.to_json()
        tokenizer_uri = storage.put_bytes(
            storage.join(run_uri, "tokenizer.json"), tokenizer_json.encode("utf-8")
        )
        metadata = {
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "n_tokens": len(ids),
            "source_sha256": source_sha256,
        }
        tokens_uri = storage.join(run_uri, "tokens.parquet")
        with storage.open_write(tokens_uri) as f:
            write_tokens(ids, f, metadata)
        outputs = {"tokenizer": describe(tokenizer_uri), "tokens": describe(tokens_uri)}
        manifest = {**metadata, "source": source, "outputs": outputs}

        run.log_params({**metadata, "source": source})
        run.record_io({"source": {"uri": source, "sha256": source_sha256, "bytes": len(raw)}},
                      outputs)  # fmt: skip
        run.log_text(tokenizer_json, "tokenizer.json")
        run.log_dict(manifest, "dataset_manifest.json")
        name = PurePosixPath(urlsplit(source).path).name or "corpus"
        run.log_dataset(source, name, source_sha256, context="tokenize")
    get_run_logger().info(
        "tokenized %s: %d characters -> %d %s tokens (vocab %d) -> %s",
        source, len(text), len(ids), tok.kind, tok.vocab_size, tokens_uri,
    )  # fmt: skip
    return {**manifest, "mlflow_run_id": run.run_id}
