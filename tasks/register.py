from __future__ import annotations

import json

from prefect import get_run_logger, task

import storage
from model.checkpoint import load_checkpoint
from model.dist import pick_device
from model.evaluate import evaluate_checkpoint
from storage.registry import CHAMPION, FetchedCheckpoint, current_champion, register
from tasks.common import IO_RETRIES, tracker_for


@task(name="register", **IO_RETRIES)
def register_model(
    tracking: dict,
    name: str,
    model_uri: str,
    train_run_id: str,
    val_loss: float,
    val_uri: str,
    tokenizer_uri: str,
    eval_iters: int,
    batch_size: int,
    seed: int,
    run_id: str,
) -> dict:
    """Register a new version; `champion` moves to it only if it beats the champion's val loss.

    Both losses are measured on this run's val split with the evaluate stage's batches: the
    champion's recorded loss when it was measured so (the same val data, tokenizer, batches and
    device: the `evaluation` tag), or else the champion evaluated afresh, whatever data it saw.
    """
    logger = get_run_logger()
    tracker = tracker_for(tracking)
    val_sha256 = storage.sha256(val_uri)
    evaluation = json.dumps(
        {"val_sha256": val_sha256, "tokenizer_sha256": storage.sha256(tokenizer_uri),
         "eval_iters": eval_iters, "batch_size": batch_size, "seed": seed,
         "device": pick_device("auto").type},
        sort_keys=True,
    )  # fmt: skip
    version = register(
        tracker,
        name,
        model_uri,
        train_run_id,
        tags={"val_loss": f"{val_loss:.6f}", "val_sha256": val_sha256, "evaluation": evaluation,
              "gptpipe.run_id": run_id},
    )  # fmt: skip
    champion = current_champion(tracker, name)
    champion_loss = None
    if champion is None:
        promote, reason = True, "no champion yet"
    else:
        champion_loss, recorded = _champion_val_loss(
            tracker,
            name,
            champion,
            evaluation,
            tokenizer_uri,
            val_uri,
            eval_iters,
            batch_size,
            seed,
        )
        if champion_loss is None:
            promote = False
            reason = f"champion v{champion.version} uses another tokenizer: not comparable"
        else:
            # a recorded loss has the tag's 6 decimals: ours is compared at that precision too
            promote = (round(val_loss, 6) if recorded else val_loss) < champion_loss
            reason = (
                f"val loss {val_loss:.4f} {'beats' if promote else 'does not beat'} champion "
                f"v{champion.version}'s {champion_loss:.4f}{', as recorded' if recorded else ''} "
                "on the same val data"
            )
    if promote:
        tracker.client.set_registered_model_alias(name, CHAMPION, version)
    logger.info("registered %s version %s; %s%s", name, version, reason,
                f" -> {CHAMPION}" if promote else "")  # fmt: skip
    return {
        "name": name,
        "version": version,
        "champion": promote,
        "champion_version": version if promote else (champion.version if champion else None),
        "previous_champion_val_loss": champion_loss,
        "reason": reason,
    }


def _champion_val_loss(tracker, name: str, champion, evaluation: str, tokenizer_uri: str,
                       val_uri: str, eval_iters: int, batch_size: int,
                       seed: int) -> tuple[float | None, bool]:  # fmt: skip
    """The champion's loss on this run's val batches, and whether it is its recorded one (it was
    measured the same way: what evaluating it again would give); None if the champion uses
    another tokenizer."""
    if champion.tags.get("evaluation") == evaluation and "val_loss" in champion.tags:
        return float(champion.tags["val_loss"]), True
    with FetchedCheckpoint(tracker, f"models:/{name}/{champion.version}") as path:
        if load_checkpoint(path)["tokenizer"] != storage.get_bytes(tokenizer_uri).decode("utf-8"):
            return None, False
        losses = evaluate_checkpoint(path, {"val": val_uri}, eval_iters, batch_size, seed)
    return losses["val"], False
