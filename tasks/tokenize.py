from __future__ import annotations

import io

from prefect import get_run_logger, task

import storage
from model.data import decode_corpus, load_text, sha256_bytes, write_tokens
from model.tokenizer import train_tokenizer
from tasks.common import describe, retry_unless_user_error, timed


@task(
    name="tokenize",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_user_error,
)
def tokenize(source: str, run_uri: str, tokenizer: str, vocab_size: int | None) -> dict:
    """Read the corpus, learn the tokenizer, store the token ids as Parquet."""
    logger = get_run_logger()
    with timed({}) as record:
        raw = load_text(source)
        text = decode_corpus(raw, source)
        source_sha256 = sha256_bytes(raw)
        tok = train_tokenizer(tokenizer, text, vocab_size)
        ids = tok.encode(text)
        tokenizer_uri = storage.put_bytes(
            storage.join(run_uri, "tokenizer.json"), tok.to_json().encode("utf-8")
        )
        buffer = io.BytesIO()
        write_tokens(
            ids,
            buffer,
            {
                "tokenizer": tok.kind,
                "vocab_size": tok.vocab_size,
                "n_tokens": len(ids),
                "source_sha256": source_sha256,
            },
        )
        tokens_uri = storage.put_bytes(storage.join(run_uri, "tokens.parquet"), buffer.getvalue())
        record.update(
            source=source,
            source_sha256=source_sha256,
            tokenizer=tok.kind,
            vocab_size=tok.vocab_size,
            n_tokens=len(ids),
            outputs={"tokenizer": describe(tokenizer_uri), "tokens": describe(tokens_uri)},
        )
    logger.info(
        "tokenized %s: %d characters -> %d %s tokens (vocab %d) -> %s",
        source, len(text), len(ids), tok.kind, tok.vocab_size, tokens_uri,
    )  # fmt: skip
    return record
