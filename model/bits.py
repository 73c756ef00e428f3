"""Bits per byte: a loss that does not depend on the tokenizer, and paired comparisons by it.

A model's val loss is in nats per *token*, and a token is a character for one tokenizer and a
few bytes for another, so two models with different tokenizers (or a char vocabulary that grew)
cannot be compared by it. Bits per byte can: the nats a model needs to encode a text, summed over
its tokens, divided by the UTF-8 bytes of that text and by ln 2.

The val text is cut into **segments** (`eval_segments`): evenly spaced, non-overlapping windows
of the val split's token ids (``segment_tokens`` ids each, at most ``n_segments`` of them),
decoded with the val split's own tokenizer to text. A window's edges may cut a character in two
(byte-level BPE); those pieces are dropped, so every segment is a true piece of the val text. Each
segment is a ``context`` (about its first quarter, ending before a space or newline) and a
``target``: a model reads the context, and only the target's bytes are scored. Each model encodes
the context and the target with its *own* tokenizer, separately, so both models score exactly
the same bytes whatever their tokenizers (`segment_nats`); a target longer than a model's
block_size is scored in sliding windows that keep at least half a block of context.

A tokenizer that cannot encode a segment (a char vocabulary without one of its characters)
scores it NaN. `compare` then pairs two models on the segments both encoded, and says how much of
the text (in bytes) was left out: the rule of docs/tracking.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)
# a context ends before a whitespace that follows a non-whitespace character: a place where
# byte-level pre-tokenization splits anyway, so encoding context and target apart changes nothing
_CUT = re.compile(r"(?<=\S)\s")
# The default margin a new model must win by: this many standard errors of the paired difference
# (the evaluation's noise: which text the segments happened to hold), and at least this share of
# the champion's bits per byte. The standard error cannot see the spread between two trainings
# of the same data with other seeds (it shifts every segment alike), and that spread does not
# shrink with more val text: tiny char models of the test corpus trained with seeds 1..4 differed
# by up to 1% of their bits per byte after 60 steps, 3% after 200 (docs/tracking.md).
NOISE_STDERRS = 2.0
MIN_RELATIVE_IMPROVEMENT = 0.02


@dataclass(frozen=True)
class Segment:
    """A piece of the val text: the model reads ``context``; ``target``'s bytes are scored."""

    context: str
    target: str

    @property
    def n_bytes(self) -> int:
        return len(self.target.encode("utf-8"))


def _cut(text: str) -> int:
    """Where a segment's context ends: the first whitespace after a non-whitespace character in
    its second quarter, else a quarter of the way in (at least 1 character of context)."""
    lo, hi = max(1, len(text) // 4), max(1, len(text) // 2)
    found = _CUT.search(text, lo, hi)
    return found.start() if found else lo


def segment_of(text: str) -> Segment | None:
    """A segment of ``text`` (a piece of the val text); None if it is too short to cut."""
    if len(text) < 2:
        return None
    at = _cut(text)
    return Segment(context=text[:at], target=text[at:])


def segment_starts(n_tokens: int, segment_tokens: int, n_segments: int) -> np.ndarray:
    """Evenly spaced, non-overlapping window starts: at most n_segments windows that fit."""
    fit = n_tokens // segment_tokens
    n = min(n_segments, fit)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    spacing = n_tokens // n
    return np.arange(n, dtype=np.int64) * spacing


def eval_segments(dataset, tokenizer, *, segment_tokens: int, n_segments: int) -> list[Segment]:
    """The val text's segments (see the module docstring), from a token dataset (a
    `model.dataset.TokenDataset` or a 1-D tensor of ids) and the tokenizer that made it.

    Deterministic: the same ids, tokenizer and settings give the same segments."""
    from model.data import windows_at
    from model.dataset import TokenDataset

    if segment_tokens < 2:
        raise ValueError(f"segment_tokens must be at least 2, got {segment_tokens}")
    starts = segment_starts(len(dataset), segment_tokens, n_segments)
    segments: list[Segment] = []
    for first in range(0, len(starts), 256):  # windows read in groups: bounded memory
        ix = torch.from_numpy(starts[first : first + 256])
        if isinstance(dataset, TokenDataset):
            x, y = dataset.windows(ix, segment_tokens - 1)
        else:
            x, y = windows_at(dataset, ix, segment_tokens - 1)
        rows = torch.cat([x, y[:, -1:]], dim=1)  # (B, segment_tokens)
        for row in rows:
            # a cut character decodes as U+FFFD at an edge: what is left is a piece of the text
            text = tokenizer.decode(row).strip("\ufffd")
            segment = segment_of(text)
            if segment is not None:
                segments.append(segment)
    return segments


def _windows(n: int, n_ctx: int, block: int):
    """(start, end, first scored position) of the windows that score positions n_ctx..n-1 of a
    sequence of n ids: input ids[start:end-1], targets ids[start+1:end]; every scored position
    sees min(itself, block - block // 2) earlier ids at least."""
    keep = block - block // 2  # context kept before the first scored position of a window
    j = n_ctx
    while j < n:
        start = max(0, j - keep)
        end = min(n, start + block + 1)
        yield start, end, j
        j = end


@torch.no_grad()
def segment_nats(
    model: torch.nn.Module,
    tokenizer,
    segments: Sequence[Segment],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """The nats ``model`` needs for each segment's target bytes, given its context: a float64
    array, NaN where ``tokenizer`` cannot encode the segment. Eval mode, no gradients, float32;
    the model's mode is restored afterwards."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    block = model.config.block_size
    nats = np.full(len(segments), np.nan, dtype=np.float64)
    windows: list[tuple[int, list[int], int]] = []  # (segment, ids of the window, scored from)
    for i, seg in enumerate(segments):
        if tokenizer.unknown_chars(seg.context) or tokenizer.unknown_chars(seg.target):
            continue
        ctx = np.asarray(tokenizer.encode(seg.context), dtype=np.int64)
        tgt = np.asarray(tokenizer.encode(seg.target), dtype=np.int64)
        ids = np.concatenate([ctx, tgt]).tolist()
        nats[i] = 0.0
        for start, end, j in _windows(len(ids), len(ctx), block):
            windows.append((i, ids[start:end], j - start - 1))  # target index of position j
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(windows), batch_size):
            group = windows[first : first + batch_size]
            width = max(len(ids) for _, ids, _ in group) - 1
            x = torch.zeros((len(group), width), dtype=torch.long)
            y = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.bool)
            for row, (_, ids, scored_from) in enumerate(group):
                t = len(ids) - 1
                x[row, :t] = torch.tensor(ids[:-1])
                y[row, :t] = torch.tensor(ids[1:])
                mask[row, scored_from:t] = True
            logits, _ = model(x.to(device))
            logp = F.log_softmax(logits.float(), dim=-1)
            nll = -logp.gather(-1, y.to(device).unsqueeze(-1)).squeeze(-1)  # (B, T)
            sums = (nll * mask.to(device)).double().sum(dim=1).cpu().numpy()
            for row, (i, _, _) in enumerate(group):
                nats[i] += sums[row]
    finally:
        model.train(was_training)
    return nats


def bits_per_byte(nats: np.ndarray, n_bytes: np.ndarray) -> float:
    """Summed nats over summed bytes, in bits, on the segments with a score (not NaN)."""
    ok = ~np.isnan(nats)
    total = float(np.sum(n_bytes[ok]))
    return float(np.sum(nats[ok]) / total / LN2) if total else math.nan


@dataclass(frozen=True)
class Paired:
    """Two models scored on the same segments: ``new`` against ``old``, in bits per byte.

    ``improvement`` is old's bits per byte minus new's on the segments both encoded (positive:
    the new model is better); ``stderr`` its standard error over those segments (the ratio
    estimator's: segments of unequal length weigh by their bytes); ``left_out`` the share of
    the val text's segment bytes that one of the two could not encode.
    """

    new_bpb: float
    old_bpb: float
    improvement: float
    stderr: float
    segments: int
    left_out: float

    def margin(self, min_improvement: float | None = None) -> float:
        """The margin the improvement must exceed: ``min_improvement``, else NOISE_STDERRS
        standard errors, and at least MIN_RELATIVE_IMPROVEMENT of the champion's bits per byte."""
        if min_improvement is not None:
            return min_improvement
        return max(NOISE_STDERRS * self.stderr, MIN_RELATIVE_IMPROVEMENT * self.old_bpb)

    def promotes(self, min_improvement: float | None = None) -> bool:
        """Whether the new model wins by more than the margin."""
        return self.improvement > self.margin(min_improvement)


def compare(new_nats: np.ndarray, old_nats: np.ndarray, n_bytes: np.ndarray) -> Paired | None:
    """The paired comparison of two models' per-segment nats (`segment_nats` on the same
    segments) on the segments both encoded; None if fewer than two are shared."""
    new_nats, old_nats = np.asarray(new_nats, float), np.asarray(old_nats, float)
    n_bytes = np.asarray(n_bytes, float)
    both = ~np.isnan(new_nats) & ~np.isnan(old_nats)
    n = int(both.sum())
    total = float(n_bytes.sum())
    if n < 2 or total <= 0:
        return None
    b = n_bytes[both]
    d = (old_nats[both] - new_nats[both]) / LN2  # bits the new model saves, per segment
    shared = float(b.sum())
    improvement = float(d.sum() / shared)
    residual = d - improvement * b
    stderr = math.sqrt(n / (n - 1) * float(np.sum(residual**2))) / shared
    return Paired(
        new_bpb=float(new_nats[both].sum() / shared / LN2),
        old_bpb=float(old_nats[both].sum() / shared / LN2),
        improvement=improvement,
        stderr=stderr,
        segments=n,
        left_out=1.0 - shared / total,
    )
