"""Warm vs cold start on a grown corpus: steps and seconds to reach the champion's bits per byte.

Two nights, as the nightly loop sees them (issue 26, item 3):

- **Night 1** trains the champion: ``--night1-steps`` steps of ``--preset`` (default ``seed``,
  the 208,193-parameter tiny model) on the first half of Tiny Shakespeare (cut at a blank line),
  its own char vocabulary.
- **Night 2**'s corpus is the whole text, with a line of characters night 1 never saw
  (``NEW_LINE``) inserted where the corpus grew (at the end of night 1's half, so it lies in the
  train split; the second half also brings ``$`` and ``3``). Its vocabulary keeps night 1's ids
  and appends the new characters (``CharTokenizer.extended``, what ``--vocab keep`` does).
  It trains ``--steps`` steps, the same config and seed on both sides: **warm**, from night 1's
  checkpoint (``python -m model.train --init-from``: every weight copied, the embedding and
  ``lm_head`` rows of the new characters a fresh model's), and **cold**, from a fresh init.

Both sides run ``python -m model.train`` (the entry point the train stage launches, without
Prefect: the pipeline's fixed cost is in ``bench.overhead``), evaluating every
``--eval-interval`` steps on ``--eval-iters`` val batches. The target is the champion's bits per
byte on night 2's val text, measured **paired**: at each evaluation step the champion is scored
in this process on the very val batches the training drew at that step (`BatchSampler`'s
``eval_batch`` with the same seed, `estimate_loss`), so batch noise cancels. A side *reaches*
the champion at the first evaluation where its val bits per byte are no higher than the
champion's on the same batches. Bits per byte = val loss (nats per token) x tokens / bytes of
the val split / ln 2; night 2's val text is ASCII, so a token is a byte. "reach s" is wall
time from the process's start to that evaluation line (imports, data, the warm start's
checkpoint load and the evaluations so far included: what a night pays, but for evaluating less
often); "training s" is the training loop's share: from the end of the step-0 evaluation to the
reaching evaluation, less the evaluations in between (each measured from the step's log line
to its evaluation line); "start-up s" is the process's start to step 0, less the step-0
evaluation (counted as the median of the others). The final bits
per byte are the project's own (`model.bits`: the evaluate stage's segments of night 2's val
text, scored from each saved checkpoint), printed with the champion's on the same segments.

Repetitions alternate the sides (warm, cold, warm, cold, ...); repetition r trains night 2
with seed ``1337 + r`` on both sides (night 1: seed 1337). A training is deterministic on one
machine, so the steps vary with the seed only, the seconds with the machine's load too. Medians
and the ratios cold / warm are printed. Every run is float32 (``dtype=float32``: no precision
probe, the same arithmetic on both sides) on the threads ``threads: 0`` gives it.

    .venv/bin/python -m bench.warm_start [--repeats 3] [--steps 1000] [--night1-steps 500]
        [--eval-interval 25] [--eval-iters 20] [--preset seed] [--set KEY=VALUE ...]
        [--corpus PATH] [--segments 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, train_cli
from model.machine import cpu_description

CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NEW_LINE = "Ωμέγα — naïve café ☕ — Zoë's Ærø smörgåsbord"
LN2 = math.log(2.0)
BASE_SEED = 1337


@dataclass
class Side:
    """One night-2 training: when it reached the champion, and where it ended."""

    name: str
    seed: int
    reach_step: int | None = None
    reach_seconds: float | None = None  # wall, from the process's start
    # from the step-0 evaluation's end to the reaching one's, less the evaluations between
    reach_train_seconds: float | None = None
    startup_seconds: float = math.nan  # process start to step 0, the step-0 evaluation not
    final_val_bpb: float = math.nan  # model.bits on the saved checkpoint
    final_eval_bpb: float = math.nan  # the training's last evaluation, in bits per byte
    total_seconds: float = math.nan
    eval_seconds: float = 0.0  # all its evaluations
    # step, wall seconds, val bits per byte, the champion's on the same batches
    curve: list[tuple[int, float, float, float]] = field(default_factory=list)


def split_nights(text: str) -> tuple[str, str]:
    """Night 1's text (the first half, cut at a blank line) and night 2's (all of it, with
    NEW_LINE where the corpus grew)."""
    cut = text.rfind("\n\n", 0, len(text) // 2) + 2
    if cut < 2:
        cut = len(text) // 2
    return text[:cut], text[:cut] + NEW_LINE + "\n\n" + text[cut:]


def write_night(folder: Path, text: str, tokenizer, block_size: int) -> dict[str, str]:
    """tokenizer.json and the lecture's split (first 90% train, last 10% val) as Parquet."""
    from model.data import split_tokens, write_tokens

    folder.mkdir(parents=True, exist_ok=True)
    ids = tokenizer.encode(text)
    (folder / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    for name, part in zip(("train", "val"), split_tokens(ids, 0.1, block_size), strict=True):
        write_tokens(part, str(folder / f"{name}.parquet"), {"vocab_size": tokenizer.vocab_size})
    return {name: str(folder / name) for name in ("tokenizer.json", "train.parquet", "val.parquet")}


def train(data, out: Path, preset: str, sets: list[str], init_from: Path | None = None):
    """``python -m model.train`` to the end, its stdout read as it comes. Returns the
    evaluations as (step, val loss, seconds since the process started, seconds the evaluation
    took: from the step's log line to its evaluation line, None where no log line came first)
    and the total seconds."""
    import os
    import re

    from model.launch.protocol import parse_evaluation

    flags = [x for item in sets for x in ("--set", item)]
    cmd = [*train_cli(data, out), "--preset", preset, *flags]
    if init_from is not None:
        cmd += ["--init-from", str(init_from), "--init-label", "night-1"]
    evals: list[tuple[int, float, float, float | None]] = []
    lines: list[str] = []
    logged: tuple[int, float] | None = None  # the last "iter N/..." line: step, seconds
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            lines.append(line)
            if m := re.match(r"iter (\d+)/", line):
                logged = (int(m.group(1)), now)
            elif (found := parse_evaluation(line)) is not None:
                took = now - logged[1] if logged and logged[0] == found.step else None
                evals.append((found.step, found.val_loss, now, took))
    total = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write("".join(lines[-30:]))
        raise SystemExit(f"training failed ({proc.returncode}): {' '.join(cmd)}")
    return evals, total


def champion_losses(
    champion, val_uri: str, steps: list[int], seed: int, batch_size: int, eval_iters: int
) -> dict[int, float]:
    """The champion's eval-mode val loss at each evaluation step, on the batches the training
    drew there (BatchSampler.eval_batch with the training's seed, one rank)."""
    import torch

    from model.batching import BatchSampler
    from model.dataset import open_dataset
    from model.dist import DistInfo
    from model.evaluate import estimate_loss

    device = torch.device("cpu")
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    out: dict[int, float] = {}
    with open_dataset(val_uri) as val:
        sampler = BatchSampler(
            {"val": val}, batch_size, champion.model.config.block_size, seed, 0, 1, 1, device
        )
        for step in steps:
            losses = estimate_loss(
                champion.model,
                lambda split, k, step=step: sampler.eval_batch(split, step, k),
                ("val",),
                eval_iters,
                info,
            )
            out[step] = losses["val"]
    return out


def segment_bpb(ckpt: Path, segments, n_bytes: np.ndarray) -> tuple[np.ndarray, float]:
    from model.bits import bits_per_byte
    from model.evaluate import checkpoint_segment_nats

    nats = checkpoint_segment_nats(str(ckpt), segments, batch_size=64, device="cpu")
    return nats, bits_per_byte(nats, n_bytes)


def measure(name, seed, evals, total, champion_at, tokens_per_byte) -> Side:
    """A side's figures from its evaluations and the champion's on the same batches."""
    side = Side(name=name, seed=seed, total_seconds=total)
    champ = champion_at(seed, [step for step, *_ in evals])
    known = [took for *_, took in evals if took is not None]
    typical = statistics.median(known) if known else 0.0  # for the step-0 evaluation
    spent = 0.0  # evaluations after step 0's
    for i, (step, val_loss, seconds, took) in enumerate(evals):
        if i == 0:
            side.startup_seconds = seconds - (typical if took is None else took)
            side.eval_seconds = typical if took is None else took
        else:
            spent += typical if took is None else took
        bpb = val_loss * tokens_per_byte / LN2
        champ_bpb = champ[step] * tokens_per_byte / LN2
        side.curve.append((step, seconds, bpb, champ_bpb))
        if side.reach_step is None and bpb <= champ_bpb:
            side.reach_step, side.reach_seconds = step, seconds
            side.reach_train_seconds = seconds - evals[0][2] - spent
    side.eval_seconds += spent
    side.final_eval_bpb = side.curve[-1][2] if side.curve else math.nan
    return side


def fmt(value: float | None, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:{spec}}"
    )


def median_or_none(values: list[float | None]) -> float | None:
    """The median of the values; None when fewer than half of them are there (not reached)."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got and 2 * len(got) >= len(values) else None


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    args = parse_args()
    if not args.corpus.is_file():
        print(f"skipped: the corpus {args.corpus} is absent (--corpus PATH)", file=sys.stderr)
        return
    load_before = load_average()
    nights = run_nights(args)
    report(args, nights, load_before, load_average())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (alternating)")
    parser.add_argument("--steps", type=int, default=1000, help="night 2's steps, both sides")
    parser.add_argument("--night1-steps", type=int, default=500, help="the champion's steps")
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-iters", type=int, default=20, help="val batches per evaluation")
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--segments", type=int, default=2000, help="model.bits segments, at most")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    return parser.parse_args()


@dataclass
class Nights:
    """What the two nights measured: the texts and vocabularies, the champion's figures, and
    every night-2 run of each side."""

    night1_text: str
    night2_text: str
    tok1: Any
    tok2: Any
    night1_seconds: float
    champion_bpb: float
    n_segments: int
    champ_cache: dict[int, dict[int, float]]
    tokens_per_byte: float
    runs: list[Side]


def night_settings(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The --set values of night 1's champion and of night 2's runs (both sides)."""
    common = ["dtype=float32", "checkpoint_interval=0", *args.set]
    night1_sets = [
        *common,
        f"max_iters={args.night1_steps}",
        f"eval_interval={args.night1_steps}",
        f"log_interval={args.night1_steps}",
        "eval_iters=20",
    ]
    night2_sets = [
        *common,
        f"max_iters={args.steps}",
        f"eval_interval={args.eval_interval}",
        f"eval_iters={args.eval_iters}",
        f"log_interval={args.eval_interval}",  # a log line just before each evaluation
    ]
    return night1_sets, night2_sets


class ChampionLosses:
    """The champion's val loss on the batches a night-2 run drew at each evaluation, by seed
    and step (computed once, shared by both sides)."""

    def __init__(self, champion, val_uri: str, *, batch_size: int, eval_iters: int) -> None:
        self.champion, self.val_uri = champion, val_uri
        self.batch_size, self.eval_iters = batch_size, eval_iters
        self.known: dict[int, dict[int, float]] = {}  # seed -> step -> champion's val loss

    def __call__(self, seed: int, steps: list[int]) -> dict[int, float]:
        known = self.known.setdefault(seed, {})
        missing = [step for step in steps if step not in known]
        if missing:
            known.update(
                champion_losses(
                    self.champion, self.val_uri, missing, seed, self.batch_size, self.eval_iters
                )
            )
        return known


def run_nights(args: argparse.Namespace) -> Nights:
    """Night 1's champion, then night 2's warm and cold runs, alternating."""
    from model.config import build_config
    from model.evaluate import val_segments
    from model.sample import load_model
    from model.tokenizer import CharTokenizer

    cfg = build_config(args.preset, overrides=args.set)
    night1_sets, night2_sets = night_settings(args)
    text = args.corpus.read_text(encoding="utf-8")
    night1_text, night2_text = split_nights(text)
    tok1 = CharTokenizer.train(night1_text)
    tok2 = tok1.extended(night2_text)
    with tempfile.TemporaryDirectory(prefix="warm-start-bench-") as tmp:
        work = Path(tmp)
        data1 = write_night(work / "night1", night1_text, tok1, cfg.block_size)
        data2 = write_night(work / "night2", night2_text, tok2, cfg.block_size)
        val_text = _val_text(data2["val.parquet"], tok2)
        if tok1.unknown_chars(val_text):
            raise SystemExit("night 2's val text has characters night 1 never saw: not pairable")
        tokens_per_byte = len(val_text) / len(val_text.encode("utf-8"))

        t0 = time.perf_counter()
        train(data1, work / "champion", args.preset, night1_sets)
        night1_seconds = time.perf_counter() - t0
        champion_ckpt = work / "champion" / "ckpt.pt"
        champion = load_model(str(champion_ckpt), "cpu")

        segments = val_segments(
            data2["val.parquet"],
            tok2,
            segment_tokens=cfg.block_size + 1,
            n_segments=args.segments,
        )
        n_bytes = np.array([s.n_bytes for s in segments], dtype=np.int64)
        champion_nats, champion_bpb = segment_bpb(champion_ckpt, segments, n_bytes)

        champion_at = ChampionLosses(
            champion, data2["val.parquet"], batch_size=cfg.batch_size, eval_iters=args.eval_iters
        )
        champ_cache = champion_at.known
        runs: list[Side] = []
        for rep in range(args.repeats):
            seed = BASE_SEED + rep
            for name, init in (("warm", champion_ckpt), ("cold", None)):
                out = work / f"{name}-{rep}"
                evals, total = train(
                    data2, out, args.preset, [*night2_sets, f"seed={seed}"], init_from=init
                )
                side = measure(name, seed, evals, total, champion_at, tokens_per_byte)
                _, side.final_val_bpb = segment_bpb(out / "ckpt.pt", segments, n_bytes)
                runs.append(side)
                print(
                    f"  {name} seed {seed}: reached the champion at step "
                    f"{fmt(side.reach_step, 'd')}: {fmt(side.reach_seconds, '.1f')} s from "
                    f"the process's start, {fmt(side.reach_train_seconds, '.2f')} s of training "
                    f"(start-up {side.startup_seconds:.1f} s); final "
                    f"{side.final_val_bpb:.4f} bits per byte; {total:.1f} s in all",
                    flush=True,
                )
    return Nights(
        night1_text=night1_text,
        night2_text=night2_text,
        tok1=tok1,
        tok2=tok2,
        night1_seconds=night1_seconds,
        champion_bpb=champion_bpb,
        n_segments=len(segments),
        champ_cache=champ_cache,
        tokens_per_byte=tokens_per_byte,
        runs=runs,
    )


def report(args: argparse.Namespace, nights: Nights, load_before, load_after) -> None:
    """The figures, medians per side and the cold / warm ratios (and --json)."""
    night1_text, night2_text, tok1, tok2 = (
        nights.night1_text,
        nights.night2_text,
        nights.tok1,
        nights.tok2,
    )
    night1_seconds, champion_bpb, champ_cache = (
        nights.night1_seconds,
        nights.champion_bpb,
        nights.champ_cache,
    )
    tokens_per_byte, runs = nights.tokens_per_byte, nights.runs
    champ_paired = statistics.mean(
        v * tokens_per_byte / LN2 for per_seed in champ_cache.values() for v in per_seed.values()
    )
    print()
    print(cpu_description())
    print(f"load average before {load_before}, after {load_after}")
    print(
        f"preset {args.preset} (float32), night 1: {args.night1_steps} steps on the first half "
        f"({len(night1_text):,} chars, {tok1.vocab_size} chars vocab, {night1_seconds:.1f} s); "
        f"night 2: {args.steps} steps on {len(night2_text):,} chars "
        f"({tok2.vocab_size} chars vocab: +{tok2.vocab_size - tok1.vocab_size})"
    )
    print(
        f"champion on night 2's val text: {champion_bpb:.4f} bits per byte (model.bits, "
        f"{nights.n_segments} segments); {champ_paired:.4f} on the evaluations' batches (mean)"
    )
    columns = ("reach_step", "reach_seconds", "reach_train_seconds")
    summary = {}
    print(
        f"{'':6}{'reach step':>11}{'reach s':>9}{'training s':>12}{'start-up s':>12}"
        f"{'final bpb':>11}{'run s':>8}  (medians of {args.repeats} runs each)"
    )
    for name in ("warm", "cold"):
        sides = [s for s in runs if s.name == name]
        row = {key: median_or_none([getattr(s, key) for s in sides]) for key in columns}
        row["reached"] = sum(s.reach_step is not None for s in sides)
        row["runs"] = len(sides)
        for key in ("startup_seconds", "final_val_bpb", "total_seconds"):
            row[key] = statistics.median(getattr(s, key) for s in sides)
        summary[name] = row
        print(
            f"{name:6}{fmt(row['reach_step'], ',.0f'):>11}{fmt(row['reach_seconds'], '.1f'):>9}"
            f"{fmt(row['reach_train_seconds'], '.2f'):>12}{row['startup_seconds']:>12.1f}"
            f"{row['final_val_bpb']:>11.4f}{row['total_seconds']:>8.1f}"
            f"  reached in {row['reached']} of {len(sides)}"
        )
    ratios = {}
    for key in columns:
        warm, cold = summary["warm"][key], summary["cold"][key]
        ratios[key] = cold / warm if warm and cold else None
    print(
        "cold / warm: steps {}, seconds from the start {}, seconds of training {}".format(
            *(f"{ratios[key]:.1f}x" if ratios[key] else "-" for key in columns)
        )
        + ("" if all(ratios.values()) else " (-: a side missed the champion in most runs, or 0)")
    )
    if args.json:
        doc = {
            "cpu": cpu_description(),
            "load_before": load_before,
            "load_after": load_after,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "champion_val_bpb": champion_bpb,
            "champion_paired_bpb": champ_paired,
            "summary": summary,
            "ratios": ratios,
            "runs": [asdict(s) for s in runs],
        }
        args.json.write_text(json.dumps(doc, indent=1), encoding="utf-8")


def _val_text(val_uri: str, tokenizer) -> str:
    """The val split's text, decoded from its Parquet ids."""
    from model.dataset import open_dataset

    with open_dataset(val_uri) as val:
        return tokenizer.decode(val.ids())


if __name__ == "__main__":
    main()
