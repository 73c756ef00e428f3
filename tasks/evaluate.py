"""The evaluate stage: eval-mode losses, and the val text's bits per byte with its per-segment
scores kept in the store (for the register stage's paired comparison with the champion)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
from prefect import get_run_logger, task

import storage
from model.dist import pick_device
from model.evaluate import evaluate_checkpoint_bits
from tasks.common import IO_RETRIES, log_split_inputs, stage_run
from tasks.results import Artifact, EvaluateResult, SplitResult, Workspace, artifact_dicts

SCORES_FORMAT = "gptpipe-bpb-1"


@task(name="evaluate", **IO_RETRIES)
def evaluate(
    checkpoint: Artifact,
    splits: SplitResult,
    *,
    workspace: Workspace,
    eval_iters: int,
    batch_size: int,
    seed: int,
) -> EvaluateResult:
    """Eval-mode loss of the final model on train and val, and the val text's bits per byte."""
    with stage_run(workspace.tracking, "evaluate") as run:
        log_split_inputs(run, splits, {"train": "evaluation", "val": "evaluation"})

        def evaluation_of(settings: dict) -> str:
            return bpb_evaluation(
                splits.val.sha256,
                settings["tokenizer"],
                settings["segment_tokens"],
                settings["n_segments"],
            )

        def known(settings: dict):  # an unchanged night: the scores are in the store already
            uri = scores_uri(workspace.store, evaluation_of(settings), checkpoint.sha256)
            return load_scores(uri)

        losses, bits = evaluate_checkpoint_bits(
            checkpoint.uri,
            {"train": splits.train.uri, "val": splits.val.uri},
            eval_iters,
            batch_size,
            seed,
            known=known,
        )
        evaluation = evaluation_of(bits)
        scores = scores_uri(workspace.store, evaluation, checkpoint.sha256)
        if not bits["recorded"]:
            save_scores(
                scores,
                bits["nats"],
                bits["bytes"],
                evaluation=evaluation,
                checkpoint_sha256=checkpoint.sha256,
            )
        val_bpb = bits["val_bpb"]
        n_segments, n_bytes = len(bits["bytes"]), int(np.sum(bits["bytes"]))
        _log_evaluation(run, losses, bits, eval_iters=eval_iters, batch_size=batch_size, seed=seed)
        inputs = {"checkpoint": checkpoint, "train": splits.train, "val": splits.val}
        run.record_io(artifact_dicts(inputs), {})
    get_run_logger().info(
        "eval-mode loss: train %.4f, val %.4f; val %.4f bits per byte (%d segments, %d bytes)",
        losses["train"],
        losses["val"],
        val_bpb,
        n_segments,
        n_bytes,
    )
    return EvaluateResult(
        train_loss=losses["train"],
        val_loss=losses["val"],
        eval_iters=eval_iters,
        batch_size=batch_size,
        seed=seed,
        mlflow_run_id=run.run_id,
        val_bpb=val_bpb if math.isfinite(val_bpb) else None,
        bpb_segments=n_segments,
        bpb_bytes=n_bytes,
        bpb_evaluation=evaluation,
        bpb_scores_uri=scores,
    )


def _log_evaluation(run, losses: dict, bits: dict, **settings: int) -> None:
    """The evaluate stage's MLflow metrics (losses, bits per byte when finite) and params."""
    metrics = {"train_loss": losses["train"], "val_loss": losses["val"]}
    if math.isfinite(bits["val_bpb"]):
        metrics["val_bpb"] = bits["val_bpb"]
    run.log_metrics(metrics)
    run.log_params(
        {
            **settings,
            "bpb_segments": len(bits["bytes"]),
            "bpb_bytes": int(np.sum(bits["bytes"])),
            "bpb_segment_tokens": bits["segment_tokens"],
            "bpb_recorded": bits["recorded"],
        }
    )


def bpb_evaluation(val_sha256: str, tokenizer_json: str, segment_tokens: int, n_segments: int):
    """How a bits-per-byte evaluation cut the val text (JSON): models scored under the same one
    are scored on the same segments, so their per-segment scores pair up."""
    return json.dumps(
        {
            "val_sha256": val_sha256,
            "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
            "segment_tokens": segment_tokens,
            "n_segments": n_segments,
            "device": pick_device("auto").type,
            "scheme": SCORES_FORMAT,
        },
        sort_keys=True,
    )


def scores_uri(store: str, evaluation: str, checkpoint_sha256: str) -> str:
    """Where the store keeps a model's (its checkpoint's) per-segment scores under an
    evaluation: keyed on content, like the stages' results."""
    key = hashlib.sha256(f"{evaluation}\0{checkpoint_sha256}".encode()).hexdigest()[:24]
    return storage.join(store, "evals", f"bpb-{key}.json")


def save_scores(
    uri: str, nats: np.ndarray, n_bytes: np.ndarray, *, evaluation: str, checkpoint_sha256: str
) -> str:
    """Write per-segment nats (NaN: not encodable, stored as null) and bytes; returns ``uri``."""
    doc = {
        "format": SCORES_FORMAT,
        "evaluation": json.loads(evaluation),
        "checkpoint_sha256": checkpoint_sha256,
        "nats": [None if math.isnan(v) else float(v) for v in nats],
        "bytes": [int(b) for b in n_bytes],
    }
    return storage.put_bytes(uri, json.dumps(doc).encode("utf-8"))


def load_scores(uri: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(nats, bytes) from a scores file, or None if there is none (or it is not one)."""
    if not uri or not storage.exists(uri):
        return None
    try:
        doc = json.loads(storage.get_bytes(uri))
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != SCORES_FORMAT:
        return None
    nats = np.array([math.nan if v is None else v for v in doc["nats"]], dtype=np.float64)
    return nats, np.array(doc["bytes"], dtype=np.int64)
