"""What rank 0 shows while training: a progress bar on a terminal, plain log lines elsewhere.

Under Prefect, CI or a log file the output is not a terminal, and a bar redrawn with carriage
returns would turn into noise; there each log step prints one line that carries the same facts.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def eval_line(step: int, train_loss: float, val_loss: float) -> str:
    """The line rank 0 prints at each evaluation, for people: the launcher reads evaluations
    from the line printed beside it (`model.launch.protocol.evaluation_line`), never this one."""
    return f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, stream=None):
        stream = stream or sys.stdout
        self.total, self.start = total, start
        self.enabled = enabled
        self.started = time.perf_counter()
        self.bar = None
        if enabled and stream.isatty():
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, file=stream)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, loss: float, lr: float, tokens_per_sec: float, mfu: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            return
        done = step - self.start
        eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
        print(
            f"iter {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, "
            f"{tokens_per_sec:,.0f} tokens/s, mfu {100 * mfu:.1f}%, eta {eta:.0f} s",
            flush=True,
        )

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
