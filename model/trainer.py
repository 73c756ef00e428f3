"""The training loop in parts: the state a checkpoint holds, one optimizer step, the finish.

`TrainingState` is everything a checkpoint saves (model, optimizer, GradScaler, step, the
evaluations so far) with `state_dict()` / `load_state_dict()`, in the manner of torchtitan's
stateful trainer: the checkpoint is `state_dict()`, and a resumed run loads it into a freshly
built state. `Trainer` runs a state on this rank: `train_step`, `evaluate`, `log_progress`,
`checkpoint` and, after the last step, `finish`. `model.train.train` decides when each is due.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import storage
from model import dist
from model.batching import BatchSampler, seed_for
from model.checkpoint import CHECKPOINT_NAME, CheckpointWriter, InitFrom
from model.config import GPTConfig, TrainConfig
from model.dataset import TokenDataset
from model.evaluate import estimate_loss
from model.gpt import GPT, flops_per_token
from model.launch.protocol import evaluation_line
from model.launch.rank import training_run
from model.machine import Peak, corrected_peak, peak_flops, usable_cores
from model.params import group_subtotals_flat, parameter_table
from model.plots import loss_curve_png
from model.precision import Precision, resolve_precision
from model.progress import Progress, eval_line
from model.recipe import MuonWithAdamW, clip_gradients, make_optimizer, set_lr

SUMMARY_NAME = "summary.json"
# the parameters with a row per token id: a warm start copies the rows of the ids it shares
VOCAB_ROWS = ("token_embedding_table.weight", "lm_head.weight", "lm_head.bias")


# ----------------------------------------------------------------------------- the step's pieces


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a training step draws from (dropout): the CPU's and the device's.

    What `torch.manual_seed` does for these, without its walk over every backend (CUDA, MPS,
    XPU, ...), which costs about 150 us a call here: 2-3% of a step at the seed config.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


# ----------------------------------------------------------------------------- what is saved


@dataclass(eq=False)
class TrainingState:
    """What a checkpoint holds: `state_dict()` is the checkpoint, and `load_state_dict()` of one
    continues it exactly (a step's batches and dropout are functions of the seed and the step).

    Besides the stateful parts it keeps what the weights were trained with (the config and the
    tokenizer), which every checkpoint carries so that it can be sampled and served on its own.
    """

    cfg: TrainConfig
    model: GPT  # the plain module, neither compiled nor DDP-wrapped: its keys are the checkpoint's
    optimizer: torch.optim.Optimizer | MuonWithAdamW  # model.recipe.make_optimizer's
    scaler: torch.amp.GradScaler  # enabled for float16 only (see model.precision)
    tokenizer_json: str
    tokenizer_uri: str
    step: int = 0  # optimizer steps taken
    history: list[dict[str, float]] = field(default_factory=list)  # {step, train_loss, val_loss}
    init_from: InitFrom | None = None  # the checkpoint a warm start began from (None: fresh init)

    @classmethod
    def create(
        cls,
        cfg: TrainConfig,
        model_config: GPTConfig,
        precision: Precision,
        device: torch.device,
        tokenizer_json: str,
        tokenizer_uri: str,
    ) -> TrainingState:
        """A state at step 0, its initial weights drawn from cfg.seed."""
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = GPT(model_config, init_std=cfg.init_std).to(device)
        matmuls = torch.bfloat16 if precision.dtype == "bfloat16" else torch.float32
        optimizer = make_optimizer(model, cfg, orthogonalize_in=matmuls)
        scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaler)
        return cls(cfg, model, optimizer, scaler, tokenizer_json, tokenizer_uri)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (`CheckpointWriter.save` adds its format_version). Its keys are the
        checkpoint format, read by resumed runs, model.sample (model_config, tokenizer) and
        tasks.register: change them with model.checkpoint.FORMAT_VERSION."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model_config": self.model.config.__dict__,
            "tokenizer": self.tokenizer_json,
            "tokenizer_uri": self.tokenizer_uri,
            "history": self.history,
            **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            **({"init_from": self.init_from.to_dict()} if self.init_from else {}),
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint of this state's shape and tokenizer (the caller checks).

        A checkpoint without "history" (older ones) starts an empty one; its "scaler" is loaded
        only when this run trains in float16 too (a float32 or bf16 run has no scaler to load).
        """
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = int(checkpoint["step"])
        self.history = list(checkpoint.get("history", []))
        if self.scaler.is_enabled() and "scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if "init_from" in checkpoint:  # a warm-started training's own checkpoint: still is one
            self.init_from = InitFrom.from_dict(checkpoint["init_from"])

    def warm_start(self, checkpoint: dict[str, Any], init: InitFrom, shared_ids: int) -> int:
        """Start from another training's weights (`model.checkpoint.check_warm_start` checked
        that they fit): every parameter is the checkpoint's, except the rows of the token
        embedding and lm_head for ids from shared_ids on (tokens the checkpoint's vocabulary
        lacks, or padding), which keep this state's fresh init (`GPT._init_weights`). The
        optimizer, the step and the history stay fresh. Returns how many rows stayed fresh."""
        own = self.model.state_dict()
        weights = checkpoint["model"]
        with torch.no_grad():
            for name, tensor in own.items():
                theirs = weights[name]
                if name in VOCAB_ROWS:
                    tensor[:shared_ids].copy_(theirs[:shared_ids])
                else:
                    tensor.copy_(theirs)
        self.init_from = init
        return self.model.config.vocab_size - shared_ids

    def last_evaluation(self) -> dict[str, float] | None:
        """The evaluation of the current step if there is one already (made by this process,
        or before the checkpoint it resumed from), else None."""
        if self.history and self.history[-1]["step"] == self.step:
            return self.history[-1]
        return None


# ----------------------------------------------------------------------------- what is not saved


@dataclass(frozen=True)
class Hardware:
    """How every rank of the job computes, decided once before the model is built."""

    threads: int  # torch threads per rank
    precision: Precision
    rank_peak: Peak  # one rank's dense matmul FLOP/s at that precision: MFU's denominator

    @classmethod
    def decide(
        cls,
        cfg: TrainConfig,
        model_config: GPTConfig,
        info: dist.DistInfo,
        threads: int,
        steps: int,
    ) -> Hardware:
        """TF32 matmuls on CUDA, then the precision and its peak for `steps` more steps.

        Rank 0 decides (its probe, its measured peak, its cache) and every rank follows: ranks
        never differ, and never measure the machine at the same time.
        """
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        def decide_on_main() -> tuple[Precision, Peak]:
            chosen = resolve_precision(cfg, model_config, info.device, planned_steps=steps)
            return chosen, peak_flops(info.device, chosen.dtype)

        precision, rank_peak = dist.broadcast_from_main(decide_on_main, info)
        return cls(threads, precision, rank_peak)


class Throughput:
    """Tokens/s and MFU over a log window: the steps since the last log line, or since the last
    evaluation (whose time is not training time)."""

    def __init__(self, tokens_per_step: int, flops_per_token: int, rank_peak: Peak, ranks: int):
        self.tokens_per_step = tokens_per_step  # of all ranks together
        self.flops_per_token = flops_per_token
        self.rank_peak = rank_peak
        self.ranks = ranks
        self.tokens_per_sec, self.mfu = 0.0, 0.0  # of the last window measured
        self.fastest = 0.0  # tokens/s of the fastest window
        self.restart()

    @property
    def peak(self) -> float:
        """The job's peak FLOP/s: all its ranks'."""
        return self.rank_peak.flops * self.ranks

    def peak_params(self) -> dict[str, Any]:
        return {
            "mfu_peak_flops": self.peak,
            "mfu_peak_source": f"{self.ranks} x {self.rank_peak.source}",
        }

    def restart(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.window_steps += 1

    def measure(self) -> tuple[float, float]:
        """(tokens/s, MFU) of the window so far; call it after a host sync (`loss.item()`), so
        that the window's time includes the device's work."""
        elapsed = time.perf_counter() - self.window_start
        self.tokens_per_sec = self.window_steps * self.tokens_per_step / max(elapsed, 1e-9)
        self.fastest = max(self.fastest, self.tokens_per_sec)
        self.mfu = self.flops_per_token * self.tokens_per_sec / self.peak
        return self.tokens_per_sec, self.mfu

    def beat_peak(self) -> bool:
        """The fastest window computed more than the peak allows: MFU over 100%."""
        return self.flops_per_token * self.fastest > self.peak

    def correct_peak(self, device: torch.device, dtype: str) -> None:
        """Measure the peak again (`corrected_peak` caches it) and the last MFU against it."""
        reached = self.flops_per_token * self.fastest / self.ranks
        self.rank_peak = corrected_peak(device, dtype, self.rank_peak, reached_flops=reached)
        self.mfu = self.flops_per_token * self.tokens_per_sec / self.peak


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """A training in progress on this rank: its TrainingState, and what runs it but is not
    saved (the compiled and DDP-wrapped model, the batches, the precision, the MLflow run, the
    progress output, the throughput). Rank 0 writes the checkpoints, the summary and the loss
    curve; every rank runs the same steps and evaluations.

    Three views of one model: `state.model` is the plain module (the checkpoint's weights),
    `model` may be compiled and runs the evaluations (on every rank, without DDP, see
    model.evaluate), `ddp_model` wraps it for the training steps (DDP all-reduces gradients).
    """

    def __init__(
        self,
        state: TrainingState,
        data: dict[str, TokenDataset],
        info: dist.DistInfo,
        hardware: Hardware,
        out_uri: str,
        *,
        track_stdout: bool = False,
        mlflow_run_id: str | None = None,
    ):
        cfg = self.cfg = state.cfg
        self.state, self.info, self.precision = state, info, hardware.precision
        self.start_step = state.step  # where this process started: a resumed run's checkpoint
        self.out_uri = out_uri
        self.ckpt_uri = storage.join(out_uri, CHECKPOINT_NAME)
        self.writer = CheckpointWriter(self.ckpt_uri)
        self.model = torch.compile(state.model) if cfg.compile else state.model
        self.ddp_model = self.model
        if info.distributed:
            cuda = info.device.type == "cuda"
            self.ddp_model = DDP(self.model, device_ids=[info.device.index] if cuda else None)
        self.sampler = BatchSampler(
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
        self.meter = Throughput(
            tokens_per_step, flops_per_token(state.model), hardware.rank_peak, info.world_size
        )
        self.run = training_run(info.is_main, track_stdout=track_stdout, run_id=mlflow_run_id)
        self.machine = {  # MLflow params, and part of the summary
            "dtype_resolved": self.precision.dtype,
            "dtype_reason": self.precision.reason,
            "threads_per_rank": hardware.threads,
            **self.meter.peak_params(),
        }
        self._announce(hardware.threads)
        self.progress = Progress(cfg.max_iters, state.step, enabled=info.is_main)
        self.model.train()
        self.meter.restart()
        self.train_start = time.perf_counter()

    def _announce(self, threads: int) -> None:
        """The run's params and parameter table to MLflow, and the training's first lines."""
        cfg, info, model = self.cfg, self.info, self.state.model
        table = parameter_table(model)
        self.run.log_params(
            {
                **cfg.to_dict(),
                "vocab_size": model.config.vocab_size,
                "world_size": info.world_size,
                "device": info.device.type,
                "n_params": table.total,
                "n_params_by_group": group_subtotals_flat(table),
                "tokens_per_step": self.meter.tokens_per_step,
                **self.machine,
            }
        )
        self.run.log_text(table.format(), "parameter_table.txt")
        self.run.log_dict(table.to_dict(), "parameter_table.json")
        dist.print0(
            f"training on {info.world_size} rank(s), device {info.device.type}, "
            f"{model.num_params():,} parameters, {self.meter.tokens_per_step:,} tokens per step, "
            f"{self.precision.describe()}"
        )
        if info.device.type == "cpu":
            dist.print0(
                f"threads: {threads} per rank ({usable_cores()} usable cores, "
                f"{info.local_world_size} rank(s) on this machine)"
            )
        if self.precision.warning:
            dist.print0(f"warning: {self.precision.warning}")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward runs in (autocast to bf16 or float16, or none)."""
        return self.precision.autocast(self.info.device.type)

    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum_steps micro-batches; (the last micro-batch's loss,
        a 0-dim tensor still on the device, and the step's learning rate)."""
        cfg, state = self.cfg, self.state
        # dropout's randomness is a function of (seed, rank, step), like the batches, so a run
        # resumed from a checkpoint continues exactly as an uninterrupted one
        seed_step(seed_for(cfg.seed, self.info.rank, state.step), self.info.device)
        lr = set_lr(state.optimizer, state.step, cfg)
        for micro in range(cfg.grad_accum_steps):
            loss = self._forward_backward(micro)
        if cfg.grad_clip > 0:
            clip_gradients(state.optimizer, state.scaler, cfg.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        self.meter.tick()
        self.progress.update()
        return loss, lr

    def _forward_backward(self, micro: int) -> torch.Tensor:
        """Add one micro-batch's gradients (scaled by 1 / grad_accum_steps); its loss, ()."""
        x, y = self.sampler.train_batch(self.state.step, micro)  # (B, T) ids, (B, T) next ids
        last = micro == self.cfg.grad_accum_steps - 1
        # DDP all-reduces the gradients in the backward of the last micro-batch only
        skip_sync = self.info.distributed and not last
        with self.ddp_model.no_sync() if skip_sync else contextlib.nullcontext():
            with self.autocast():
                _, loss = self.ddp_model(x, y)  # (B, T, vocab_size) logits, () mean loss
            self.state.scaler.scale(loss / self.cfg.grad_accum_steps).backward()
        return loss

    def evaluate(self) -> dict[str, float]:
        """Eval-mode loss on train and val at this step: kept in the history, logged, and
        printed twice, rounded for people (`eval_line`) and as it is for the launcher, which hands
        it to a sweep's pruner (`evaluation_line`)."""
        at_step = self.state.step
        losses = estimate_loss(
            self.model,
            lambda split, k: self.sampler.eval_batch(split, at_step, k),
            ("train", "val"),
            self.cfg.eval_iters,
            self.info,
            self.autocast,
        )
        record = {"step": at_step, "train_loss": losses["train"], "val_loss": losses["val"]}
        self.state.history.append(record)
        self.run.log_metrics({"train_loss": losses["train"], "val_loss": losses["val"]}, at_step)
        self.progress.write(eval_line(at_step, losses["train"], losses["val"]))
        self.progress.write(evaluation_line(at_step, losses["train"], losses["val"]))
        self.meter.restart()
        return record

    def log_progress(self, loss: torch.Tensor, lr: float) -> None:
        """The last step's loss, lr, tokens/s and MFU: to MLflow and the progress output."""
        loss_value = loss.item()  # the only host sync of the step, and only at log steps
        tokens_per_sec, mfu = self.meter.measure()
        metrics = {"loss": loss_value, "lr": lr, "tokens_per_sec": tokens_per_sec, "mfu": mfu}
        self.run.log_metrics(metrics, self.state.step)
        self.progress.log(self.state.step, loss_value, lr, tokens_per_sec, mfu)
        self.meter.restart()

    def checkpoint(self) -> None:
        """Save a checkpoint (rank 0) and say so: model.launch reads the line as the step an
        interrupted run can be continued from."""
        self._save()
        self.progress.write(f"checkpoint at step {self.state.step}: {self.ckpt_uri}")

    def _save(self) -> None:
        if self.info.is_main:
            self.writer.save(self.state.state_dict())

    def finish(self) -> dict[str, Any]:
        """After the last step: the final evaluation and checkpoint, the summary, the artifacts.

        Returns the summary (rank 0 also writes it, SUMMARY_NAME beside the checkpoint) and
        prints the done line, which bench/gpu.py parses.
        """
        train_seconds = time.perf_counter() - self.train_start
        if self.info.is_main and self.meter.beat_peak():
            self._correct_peak()
        final = self.state.last_evaluation() or self.evaluate()
        self.progress.close()
        self._save()
        summary = self._summary(final, train_seconds)
        if self.info.is_main:
            self.writer.finish()  # the final checkpoint is in the store before the summary says so
            self._write_artifacts(summary)
        self.run.close()
        # the steps this process ran: a resumed training names where it started
        step, start = self.state.step, self.start_step
        steps = f"{step - start} steps" + (f" (from step {start} to {step})" if start else "")
        dist.print0(
            f"done: {steps} in {train_seconds:.1f} s, final val loss {final['val_loss']:.4f}"
        )
        return summary

    def _correct_peak(self) -> None:
        """MFU over 100%: the cached peak was measured while the machine was busy. Measure it
        again, and log and report the MFU against that."""
        low = self.meter.rank_peak.flops
        self.meter.correct_peak(self.info.device, self.precision.dtype)
        self.machine.update(self.meter.peak_params())
        self.run.log_params(
            {
                "mfu_peak_corrected_flops": self.machine["mfu_peak_flops"],
                "mfu_peak_corrected_source": self.machine["mfu_peak_source"],
            }
        )
        dist.print0(
            f"MFU read over 100% against the cached {self.precision.dtype} peak "
            f"({low / 1e9:.1f} GFLOP/s a rank), measured while the machine was busy: "
            f"measured again, {self.meter.rank_peak.flops / 1e9:.1f} GFLOP/s, cached for later runs"
        )

    def _summary(self, final: dict[str, float], train_seconds: float) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "train_loss": final["train_loss"],
            "val_loss": final["val_loss"],
            "n_params": self.state.model.num_params(),
            "world_size": self.info.world_size,
            "device": self.info.device.type,
            "tokens_per_sec": self.meter.tokens_per_sec,
            "mfu": self.meter.mfu,
            **self.machine,
            "train_seconds": train_seconds,
            "checkpoint": self.ckpt_uri,
            "history": self.state.history,
            **({"init_from": self.state.init_from.to_dict()} if self.state.init_from else {}),
        }

    def _write_artifacts(self, summary: dict[str, Any]) -> None:
        """The loss curve (to the store and MLflow), then summary.json."""
        curve = loss_curve_png(summary["history"], f"{summary['n_params']:,} parameters")
        storage.put_bytes(storage.join(self.out_uri, "loss_curve.png"), curve)
        self.run.log_artifact_bytes(curve, "loss_curve.png")
        summary_bytes = json.dumps(summary, indent=2).encode()
        storage.put_bytes(storage.join(self.out_uri, SUMMARY_NAME), summary_bytes)
