"""The loss curve of a training as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io


def loss_curve_png(history: list[dict[str, float]], title: str = "loss") -> bytes:
    """Train and val loss against iteration, from the evaluations' history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [h["train_loss"] for h in history], marker="o", label="train")
    ax.plot(steps, [h["val_loss"] for h in history], marker="o", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (eval mode)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
