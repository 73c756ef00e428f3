"""Train the GPT on tokenized Parquet data, on one rank or many under torchrun.

    torchrun --standalone --nproc_per_node=2 -m model.train \
        --train STORE/datasets/split-KEY/train.json --val STORE/datasets/split-KEY/val.json \
        --tokenizer STORE/datasets/tokenize-KEY/tokenizer.json --out /tmp/train-out --preset cpu

Batches are sampled per optimizer step (see model/batching.py), so the samples a step sees do not
depend on the number of ranks, and a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import storage
from model import dist
from model.batching import BatchSampler, seed_for
from model.checkpoint import CHECKPOINT_NAME, CheckpointWriter, latest_checkpoint
from model.config import TrainConfig, build_config, config_from_dict
from model.dataset import open_dataset
from model.evaluate import estimate_loss
from model.exit import skip_last_collections
from model.gpt import GPT, flops_per_token
from model.launch.protocol import evaluation_line
from model.launch.rank import RUN_ID_ENV, training_run
from model.machine import corrected_peak, peak_flops, threads_per_rank, usable_cores
from model.memory import keep_freed_memory
from model.params import group_subtotals_flat, parameter_table
from model.plots import loss_curve_png
from model.precision import resolve_precision
from model.progress import Progress, eval_line
from model.tokenizer import tokenizer_from_json
from storage.errors import GptpipeError

SUMMARY_NAME = "summary.json"
# How model.launch tells rank 0 to print its tracking calls for the launcher to send
TRACK_STDOUT_ARG = "--track-stdout"
MLFLOW_RUN_ID_ARG = "--mlflow-run-id"


# ----------------------------------------------------------------------------- pure helpers


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Constant, or linear warmup then cosine decay from learning_rate to min_lr at max_iters."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (it - cfg.warmup_iters) / span)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a training step draws from (dropout): the CPU's and the device's.

    What `torch.manual_seed` does for these, without its walk over every backend (CUDA, MPS,
    XPU, ...), which costs about 150 us a call here: 2-3% of a step at the seed config.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


def make_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, layer norms), as nanoGPT does."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def clip_gradients(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float
) -> None:
    """Scale the gradients to a total norm of at most max_norm before the optimizer's step, as
    `clip_grad_norm_` does, but without multiplying them in a pass of its own.

    The scale, min(1, max_norm / norm), is handed to the fused AdamW step as its `grad_scale`
    (the attribute GradScaler sets on fused optimizers), which divides each gradient by
    max(1, norm / max_norm) as it reads it. `clip_grad_norm_` multiplies every gradient in a
    kernel of its own first: on a CPU about 50 small kernels, which `python -m bench.clip`
    measured at 6.6% of a tiny model's step, against 4.3% for this (a Xeon, float32). With
    float16's GradScaler, whose own `grad_scale` that is, the gradients are unscaled and
    clipped as usual.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler.is_enabled() or not optimizer.defaults.get("fused"):
        scaler.unscale_(optimizer)  # clip the true gradients (a no-op without float16)
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)


def _check_resumable(
    ckpt: dict, ckpt_uri: str, tokenizer_json: str, tokenizer_uri: str, model: GPT
) -> None:
    """Refuse to continue a checkpoint of another tokenizer or shape (it would be overwritten)."""
    saved = tokenizer_from_json(ckpt["tokenizer"]).to_json()
    if saved != tokenizer_from_json(tokenizer_json).to_json():
        raise GptpipeError(
            f"{ckpt_uri} was trained with another tokenizer than {tokenizer_uri}: resume with "
            "the tokenizer it was made with, or use a new --out folder"
        )
    stored, wanted = ckpt.get("model_config", {}), model.config.__dict__
    keys = ("vocab_size", "block_size", "n_embd", "n_head", "n_layer", "bias")
    differ = [f"{k} {stored.get(k)} vs {wanted[k]}" for k in keys if stored.get(k) != wanted[k]]
    if differ:
        raise GptpipeError(
            f"{ckpt_uri} holds a model of another shape ({', '.join(differ)}): resume with the "
            "config it was made with, or use a new --out folder"
        )


# ----------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class TrainingData:
    """What a training reads: the train and val datasets, and the tokenizer that made them."""

    train_uri: str
    val_uri: str
    tokenizer_uri: str

    def entry_args(self) -> list[str]:
        """As this module's command-line flags (`main`)."""
        return ["--train", self.train_uri, "--val", self.val_uri, "--tokenizer", self.tokenizer_uri]


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
    p0 = dist.print0
    tokenizer_uri = inputs.tokenizer_uri
    tokenizer_json = storage.get_bytes(tokenizer_uri).decode("utf-8")
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
            p0(
                f"{split}: {len(ids):,} tokens in {groups} row groups, more than "
                f"{ids.max_bytes:,} bytes: streaming the row groups each batch samples"
            )
    threads = threads_per_rank(info.local_world_size, requested=cfg.threads)
    torch.set_num_threads(threads)  # before anything runs: the probe and the peak measure at it
    vocab_size = max(tokenizer.vocab_size, cfg.vocab_size or 0)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model = GPT(cfg.model_config(vocab_size)).to(info.device)
    optimizer = make_optimizer(raw_model, cfg)
    ckpt_uri = storage.join(out_uri, CHECKPOINT_NAME)

    step = 0
    history: list[dict[str, float]] = []
    writer = CheckpointWriter(ckpt_uri)
    ckpt = latest_checkpoint(ckpt_uri, map_location=info.device) if resume else None
    if ckpt is not None:
        _check_resumable(ckpt, ckpt_uri, tokenizer_json, tokenizer_uri, raw_model)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        history = list(ckpt.get("history", []))
        p0(f"resumed from step {step} ({ckpt_uri})")
    elif resume:  # a retry that failed before its first checkpoint lands here too: not an error
        p0(f"nothing to resume in {ckpt_uri}: training from step 0")
    start_step = step

    use_cuda = info.device.type == "cuda"
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def decide_precision():
        chosen = resolve_precision(
            cfg, raw_model.config, info.device, planned_steps=cfg.max_iters - step
        )
        return chosen, peak_flops(info.device, chosen.dtype)

    # rank 0 decides (its probe, its measured peak, its cache) and every rank follows: ranks
    # never differ, and never measure the machine at the same time
    precision, rank_peak = dist.broadcast_from_main(decide_precision, info)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision.needs_grad_scaler)
    if ckpt is not None and precision.needs_grad_scaler and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])

    def autocast():
        return precision.autocast(info.device.type)

    model = torch.compile(raw_model) if cfg.compile else raw_model
    ddp_model = (
        DDP(model, device_ids=[info.device.index] if use_cuda else None)
        if (info.distributed)
        else model
    )
    sampler = BatchSampler(
        data,
        cfg.batch_size,
        cfg.block_size,
        cfg.seed,
        info.rank,
        info.world_size,
        cfg.grad_accum_steps,
        info.device,
    )
    tokens_per_step = info.world_size * cfg.grad_accum_steps * cfg.batch_size * cfg.block_size
    fpt = flops_per_token(raw_model)
    peak = rank_peak.flops * info.world_size
    run = training_run(info.is_main, track_stdout=track_stdout, run_id=mlflow_run_id)
    table = parameter_table(raw_model)
    machine = {
        "dtype_resolved": precision.dtype,
        "dtype_reason": precision.reason,
        "threads_per_rank": threads,
        "mfu_peak_flops": peak,
        "mfu_peak_source": f"{info.world_size} x {rank_peak.source}",
    }
    run.log_params(
        {
            **cfg.to_dict(),
            "vocab_size": vocab_size,
            "world_size": info.world_size,
            "device": info.device.type,
            "n_params": table.total,
            "n_params_by_group": group_subtotals_flat(table),
            "tokens_per_step": tokens_per_step,
            **machine,
        }
    )
    run.log_text(table.format(), "parameter_table.txt")
    run.log_dict(table.to_dict(), "parameter_table.json")
    p0(
        f"training on {info.world_size} rank(s), device {info.device.type}, "
        f"{raw_model.num_params():,} parameters, {tokens_per_step:,} tokens per step, "
        f"{precision.describe()}"
    )
    if info.device.type == "cpu":
        p0(
            f"threads: {threads} per rank ({usable_cores()} usable cores, "
            f"{info.local_world_size} rank(s) on this machine)"
        )
    if precision.warning:
        p0(f"warning: {precision.warning}")

    def evaluate_now(at_step: int) -> dict[str, float]:
        losses = estimate_loss(
            model,
            lambda split, k: sampler.eval_batch(split, at_step, k),
            ("train", "val"),
            cfg.eval_iters,
            info,
            autocast,
        )
        record = {"step": at_step, "train_loss": losses["train"], "val_loss": losses["val"]}
        history.append(record)
        run.log_metrics({"train_loss": losses["train"], "val_loss": losses["val"]}, at_step)
        progress.write(eval_line(at_step, losses["train"], losses["val"]))
        progress.write(evaluation_line(at_step, losses["train"], losses["val"]))
        return record

    def checkpoint_now(at_step: int) -> None:
        if info.is_main:
            writer.save(
                {
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": at_step,
                    "config": cfg.to_dict(),
                    "model_config": raw_model.config.__dict__,
                    "tokenizer": tokenizer_json,
                    "tokenizer_uri": tokenizer_uri,
                    "history": history,
                    **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                },
            )

    progress = Progress(cfg.max_iters, step, enabled=info.is_main)
    model.train()
    window_start, window_steps, tokens_per_sec, mfu = time.perf_counter(), 0, 0.0, 0.0
    fastest = 0.0  # tokens/s of the fastest log window
    train_start = time.perf_counter()
    while step < cfg.max_iters:
        if step % cfg.eval_interval == 0 and not (history and history[-1]["step"] == step):
            evaluate_now(step)
            window_start, window_steps = time.perf_counter(), 0
        # dropout's randomness is a function of (seed, rank, step), like the batches, so a run
        # resumed from a checkpoint continues exactly as an uninterrupted one
        seed_step(seed_for(cfg.seed, info.rank, step), info.device)
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum_steps):
            x, y = sampler.train_batch(step, micro)
            last = micro == cfg.grad_accum_steps - 1
            sync = contextlib.nullcontext() if last or not info.distributed else ddp_model.no_sync()
            with sync:
                with autocast():
                    _, loss = ddp_model(x, y)
                scaler.scale(loss / cfg.grad_accum_steps).backward()
        if cfg.grad_clip > 0:
            clip_gradients(optimizer, scaler, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        progress.update()
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            loss_value = loss.item()  # the only host sync of the step, and only at log steps
            elapsed = time.perf_counter() - window_start
            tokens_per_sec = window_steps * tokens_per_step / max(elapsed, 1e-9)
            fastest = max(fastest, tokens_per_sec)
            mfu = fpt * tokens_per_sec / peak
            run.log_metrics(
                {"loss": loss_value, "lr": lr, "tokens_per_sec": tokens_per_sec, "mfu": mfu}, step
            )
            progress.log(step, loss_value, lr, tokens_per_sec, mfu)
            window_start, window_steps = time.perf_counter(), 0
        if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step < cfg.max_iters:
            checkpoint_now(step)
            progress.write(f"checkpoint at step {step}: {ckpt_uri}")
    train_seconds = time.perf_counter() - train_start
    if info.is_main and fpt * fastest > peak:
        # MFU over 100%: the cached peak was measured while the machine was busy
        low = rank_peak.flops
        rank_peak = corrected_peak(
            info.device, precision.dtype, rank_peak, reached_flops=fpt * fastest / info.world_size
        )
        peak = rank_peak.flops * info.world_size
        mfu = fpt * tokens_per_sec / peak
        machine["mfu_peak_flops"] = peak
        machine["mfu_peak_source"] = f"{info.world_size} x {rank_peak.source}"
        run.log_params(
            {
                "mfu_peak_corrected_flops": peak,
                "mfu_peak_corrected_source": machine["mfu_peak_source"],
            }
        )
        p0(
            f"MFU read over 100% against the cached {precision.dtype} peak "
            f"({low / 1e9:.1f} GFLOP/s a rank), measured while the machine was busy: "
            f"measured again, {rank_peak.flops / 1e9:.1f} GFLOP/s, cached for later runs"
        )
    final = history[-1] if history and history[-1]["step"] == step else evaluate_now(step)
    progress.close()
    checkpoint_now(step)
    summary = {
        "step": step,
        "train_loss": final["train_loss"],
        "val_loss": final["val_loss"],
        "n_params": raw_model.num_params(),
        "world_size": info.world_size,
        "device": info.device.type,
        "tokens_per_sec": tokens_per_sec,
        "mfu": mfu,
        **machine,
        "train_seconds": train_seconds,
        "checkpoint": ckpt_uri,
        "history": history,
    }
    if info.is_main:
        writer.finish()  # the final checkpoint is in the store before the summary says so
        curve = loss_curve_png(history, f"{raw_model.num_params():,} parameters")
        storage.put_bytes(storage.join(out_uri, "loss_curve.png"), curve)
        run.log_artifact_bytes(curve, "loss_curve.png")
        storage.put_bytes(
            storage.join(out_uri, SUMMARY_NAME), json.dumps(summary, indent=2).encode()
        )
    run.close()
    # the steps this process ran: a resumed training names where it started
    steps = f"{step - start_step} steps" + (
        f" (from step {start_step} to {step})" if start_step else ""
    )
    p0(f"done: {steps} in {train_seconds:.1f} s, final val loss {final['val_loss']:.4f}")
    return summary


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
        info = dist.setup(cfg.device)
        train(
            cfg,
            args.out,
            inputs=TrainingData(args.train, args.val, args.tokenizer),
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
