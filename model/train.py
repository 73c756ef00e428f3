"""Train the GPT on tokenized Parquet data, on one rank or many under torchrun.

    torchrun --standalone --nproc_per_node=2 -m model.train \
        --train STORE/datasets/split-KEY/train.json --val STORE/datasets/split-KEY/val.json \
        --tokenizer STORE/datasets/tokenize-KEY/tokenizer.json --out /tmp/train-out --preset cpu

Batches are sampled per optimizer step (see model/batching.py), so the samples a step sees do not
depend on the number of ranks, and a resumed run draws what an uninterrupted one would have.

`train` is the driver: it builds a `model.trainer.TrainingState`, loads the latest checkpoint
into it on --resume, and runs a `model.trainer.Trainer`'s steps, evaluations, log lines and
checkpoints as the config says, then its finish.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

import storage
from model import dist
from model.checkpoint import (
    CHECKPOINT_NAME,
    InitFrom,
    check_warm_start,
    latest_checkpoint,
    load_init_checkpoint,
)
from model.config import GPTConfig, TrainConfig, build_config, config_from_dict
from model.dataset import TokenDataset, open_dataset
from model.exit import skip_last_collections
from model.launch.rank import RUN_ID_ENV
from model.machine import threads_per_rank
from model.memory import keep_freed_memory
from model.recipe import clip_gradients, get_lr, make_optimizer
from model.tokenizer import tokenizer_from_json
from model.trainer import SUMMARY_NAME, Hardware, Trainer, TrainingState, seed_step
from storage.errors import GptpipeError

# SUMMARY_NAME and the step's pieces are model.trainer's and model.recipe's: the launchers,
# tasks, tests and benches import them from here, as they did when they were defined here
__all__ = [
    "MLFLOW_RUN_ID_ARG",
    "SUMMARY_NAME",
    "TRACK_STDOUT_ARG",
    "TrainingData",
    "clip_gradients",
    "get_lr",
    "main",
    "make_optimizer",
    "parse_args",
    "seed_step",
    "train",
]

# How model.launch tells rank 0 to print its tracking calls for the launcher to send
TRACK_STDOUT_ARG = "--track-stdout"
MLFLOW_RUN_ID_ARG = "--mlflow-run-id"
INIT_FROM_ARG = "--init-from"


@dataclass(frozen=True)
class TrainingData:
    """What a training reads: the train and val datasets, and the tokenizer that made them; and
    init_from, the checkpoint a warm start begins from (None: a fresh init from cfg.seed)."""

    train_uri: str
    val_uri: str
    tokenizer_uri: str
    init_from: InitFrom | None = None

    def entry_args(self) -> list[str]:
        """As this module's command-line flags (`main`)."""
        args = ["--train", self.train_uri, "--val", self.val_uri, "--tokenizer", self.tokenizer_uri]
        if self.init_from is not None:
            init = self.init_from
            args += [INIT_FROM_ARG, init.uri, "--init-sha256", init.sha256]
            args += ["--init-label", init.label]
        return args


# ----------------------------------------------------------------------------- the driver


def train(
    cfg: TrainConfig,
    out_uri: str,
    *,
    inputs: TrainingData,
    info: dist.DistInfo,
    resume: bool = False,
    track_stdout: bool = False,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Run training on this process's rank; rank 0 writes checkpoints and the summary.

    Rank 0's tracking: track_stdout prints its calls for the launcher (`storage.tracking.LineRun`),
    else mlflow_run_id logs into that run itself ($MLFLOW_TRACKING_URI); neither: none.
    """
    tokenizer_json, vocab_size, data = _open_inputs(cfg, inputs)
    threads = threads_per_rank(info.local_world_size, requested=cfg.threads)
    torch.set_num_threads(threads)  # before anything runs: the probe and the peak measure at it
    model_config = cfg.model_config(vocab_size)
    ckpt_uri = storage.join(out_uri, CHECKPOINT_NAME)
    ckpt = (
        _resumable_checkpoint(ckpt_uri, inputs, tokenizer_json, model_config, info)
        if resume
        else None
    )
    start = int(ckpt["step"]) if ckpt is not None else 0
    hardware = Hardware.decide(cfg, model_config, info, threads, steps=cfg.max_iters - start)
    state = TrainingState.create(
        cfg, model_config, hardware.precision, info.device, tokenizer_json, inputs.tokenizer_uri
    )
    if ckpt is not None:  # a warm-started training resumes from its own checkpoint too
        state.load_state_dict(ckpt)
        dist.print0(f"resumed from step {state.step} ({ckpt_uri})")
    else:
        if resume:  # a retry that failed before its first checkpoint lands here too: no error
            dist.print0(f"nothing to resume in {ckpt_uri}: training from step 0")
        if inputs.init_from is not None:
            _warm_start(state, inputs.init_from, model_config, tokenizer_json, info)
    del ckpt  # the state holds what it needs: the checkpoint's copy of the weights can go
    trainer = Trainer(
        state, data, info, hardware, out_uri, track_stdout=track_stdout, mlflow_run_id=mlflow_run_id
    )
    while state.step < cfg.max_iters:
        if state.step % cfg.eval_interval == 0 and state.last_evaluation() is None:
            trainer.evaluate()
        loss, lr = trainer.train_step()
        step = state.step  # the steps taken, this one included
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            trainer.log_progress(loss, lr)
        # the last checkpoint is finish()'s
        if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step < cfg.max_iters:
            trainer.checkpoint()
    return trainer.finish()


def _open_inputs(
    cfg: TrainConfig, inputs: TrainingData
) -> tuple[str, int, dict[str, TokenDataset]]:
    """The tokenizer's JSON, the vocabulary size of the model (cfg.vocab_size may ask for more
    rows than the tokenizer has tokens), and the train and val datasets, each checked to hold a
    block and its next token."""
    tokenizer_json = storage.get_bytes(inputs.tokenizer_uri).decode("utf-8")
    tokenizer = tokenizer_from_json(tokenizer_json)
    data = {"train": open_dataset(inputs.train_uri), "val": open_dataset(inputs.val_uri)}
    for split, ids in data.items():
        if len(ids) < cfg.block_size + 1:
            raise GptpipeError(
                f"the {split} split has {len(ids)} tokens, fewer than block_size + 1 "
                f"({cfg.block_size + 1}): use a larger corpus or a smaller block_size"
            )
        if ids.streaming:
            groups = len(ids.group_starts) - 1
            dist.print0(
                f"{split}: {len(ids):,} tokens in {groups} row groups, more than "
                f"{ids.max_bytes:,} bytes: streaming the row groups each batch samples"
            )
    return tokenizer_json, max(tokenizer.vocab_size, cfg.vocab_size or 0), data


def _warm_start(
    state: TrainingState,
    init: InitFrom,
    model_config: GPTConfig,
    tokenizer_json: str,
    info: dist.DistInfo,
) -> None:
    """Every rank reads the checkpoint (checked against its sha256) and copies its weights."""
    ckpt = load_init_checkpoint(init, map_location=info.device)
    shared = check_warm_start(ckpt, init, model_config, tokenizer_json)
    fresh = state.warm_start(ckpt, init, shared)
    grew = f", {fresh} new token row(s) initialised fresh" if fresh else ""
    dist.print0(
        f"warm start from {init.label} (its step {int(ckpt['step'])}, sha256 "
        f"{init.sha256[:12]}){grew}"
    )


def _resumable_checkpoint(
    ckpt_uri: str,
    inputs: TrainingData,
    tokenizer_json: str,
    model_config: GPTConfig,
    info: dist.DistInfo,
) -> dict | None:
    """The checkpoint --resume continues (the newer of the store's and this machine's copy), or
    None. One of another tokenizer or shape is refused: continuing would overwrite it."""
    ckpt = latest_checkpoint(ckpt_uri, map_location=info.device)
    if ckpt is None:
        return None
    saved = tokenizer_from_json(ckpt["tokenizer"]).to_json()
    if saved != tokenizer_from_json(tokenizer_json).to_json():
        raise GptpipeError(
            f"{ckpt_uri} was trained with another tokenizer than {inputs.tokenizer_uri}: resume "
            "with the tokenizer it was made with, or use a new --out folder"
        )
    stored, wanted = ckpt.get("model_config", {}), model_config.__dict__
    keys = ("vocab_size", "block_size", "n_embd", "n_head", "n_layer", "bias")
    differ = [f"{k} {stored.get(k)} vs {wanted[k]}" for k in keys if stored.get(k) != wanted[k]]
    if differ:
        raise GptpipeError(
            f"{ckpt_uri} holds a model of another shape ({', '.join(differ)}): resume with the "
            "config it was made with, or use a new --out folder"
        )
    return ckpt


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train the GPT (one rank, or many under torchrun).",
    )
    parser.add_argument(
        "--train",
        required=True,
        help="URI of the train split: a dataset manifest or a Parquet file",
    )
    parser.add_argument(
        "--val", required=True, help="URI of the val split: a dataset manifest or a Parquet file"
    )
    parser.add_argument("--tokenizer", required=True, help="URI of the tokenizer JSON")
    parser.add_argument("--out", required=True, help="URI of the folder for checkpoints")
    parser.add_argument("--preset", help="preset name from configs/")
    parser.add_argument("--config", help="YAML file of hyperparameters")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--config-json", help="a whole resolved config as JSON (used by tasks)")
    parser.add_argument("--resume", action="store_true", help="continue from out/ckpt.pt")
    parser.add_argument(
        INIT_FROM_ARG,
        metavar="URI",
        help="warm start: begin from this checkpoint's weights, not a fresh init",
    )
    parser.add_argument(
        "--init-sha256", metavar="SHA256", help="the --init-from file's sha256 (else hashed now)"
    )
    parser.add_argument(
        "--init-label", metavar="NAME", help="what to call the --init-from checkpoint in logs"
    )
    parser.add_argument(
        TRACK_STDOUT_ARG,
        action="store_true",
        help="rank 0 prints its MLflow calls for the launcher to send (set by model.launch)",
    )
    parser.add_argument(
        MLFLOW_RUN_ID_ARG,
        default=os.environ.get(RUN_ID_ENV) or None,
        metavar="RUN_ID",
        help=f"rank 0 logs into this MLflow run on $MLFLOW_TRACKING_URI (default: ${RUN_ID_ENV})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    skip_last_collections()  # dist.teardown() collects what matters (DDP) before the exit
    keep_freed_memory()  # large configs: no page faults for the same tensors every step
    args = parse_args(argv)
    code = 0
    try:
        if args.config_json:
            cfg = config_from_dict(json.loads(args.config_json))
        else:
            cfg = build_config(args.preset, args.config, args.set)
        init = None
        if args.init_from:
            sha = args.init_sha256 or storage.sha256(args.init_from)
            init = InitFrom(args.init_from, sha, args.init_label or args.init_from)
        info = dist.setup(cfg.device)
        train(
            cfg,
            args.out,
            inputs=TrainingData(args.train, args.val, args.tokenizer, init),
            info=info,
            resume=args.resume,
            track_stdout=args.track_stdout,
            mlflow_run_id=args.mlflow_run_id,
        )
    except GptpipeError as exc:
        # the error line first: leaving after an error may be the last thing this rank does
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except BaseException:
        dist.teardown(ok=False)  # a bug: its traceback follows; never wait for the other ranks
        raise
    dist.teardown(ok=code == 0)  # the model and optimizer died with train()'s frame
    return code


if __name__ == "__main__":
    sys.exit(main())
