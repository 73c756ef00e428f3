"""The pipeline flow: tokenize -> split -> train -> evaluate -> sample, passing URIs."""

from __future__ import annotations

import json
import secrets
import time

from prefect import flow, get_run_logger

import storage
from model.config import config_from_dict
from tasks.evaluate import evaluate
from tasks.sample import sample
from tasks.split import split
from tasks.tokenize import tokenize
from tasks.train import train

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
DEFAULT_STORE = "./gptpipe-store"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@flow(name="gptpipe-pipeline")
def pipeline(
    source: str = TINY_SHAKESPEARE_URL,
    config: dict | None = None,
    store: str = DEFAULT_STORE,
    nproc: int = 1,
    run_id: str | None = None,
    prompt: str = "",
    sample_tokens: int = 500,
) -> dict:
    """Run every stage once and return (and store) the run's summary."""
    cfg = config_from_dict(config or {})
    run_id = run_id or new_run_id()
    run_uri = storage.join(store, "runs", run_id)
    logger = get_run_logger()
    logger.info("run %s -> %s", run_id, run_uri)

    tokenized = tokenize(source, run_uri, cfg.tokenizer, cfg.vocab_size)
    tokens_uri = tokenized["outputs"]["tokens"]["uri"]
    tokenizer_uri = tokenized["outputs"]["tokenizer"]["uri"]
    splits = split(tokens_uri, run_uri, cfg.val_fraction, cfg.block_size)
    train_uri, val_uri = splits["outputs"]["train"]["uri"], splits["outputs"]["val"]["uri"]
    trained = train(cfg.to_dict(), train_uri, val_uri, tokenizer_uri, run_uri, nproc)
    checkpoint_uri = trained["checkpoint"]
    evaluated = evaluate(
        checkpoint_uri, train_uri, val_uri, cfg.eval_iters, cfg.batch_size, cfg.seed
    )
    sampled = sample(checkpoint_uri, run_uri, prompt, sample_tokens, seed=cfg.seed)

    summary = {
        "run_id": run_id,
        "run_uri": run_uri,
        "source": source,
        "config": cfg.to_dict(),
        "world_size": trained["world_size"],
        "n_params": trained["n_params"],
        "train_loss": evaluated["train_loss"],
        "val_loss": evaluated["val_loss"],
        "outputs": {
            "tokenizer": tokenizer_uri,
            "tokens": tokens_uri,
            "train": train_uri,
            "val": val_uri,
            "checkpoint": checkpoint_uri,
            "samples": sampled["outputs"]["samples"]["uri"],
        },
        "sample": sampled["text"],
        "stages": {
            "tokenize": tokenized,
            "split": splits,
            "train": {k: v for k, v in trained.items() if k != "history"},
            "evaluate": evaluated,
            "sample": {k: v for k, v in sampled.items() if k != "text"},
        },
    }
    storage.put_bytes(
        storage.join(run_uri, "summary.json"), json.dumps(summary, indent=2).encode("utf-8")
    )
    return summary
