"""Loss curves of a pre-training stage as a PNG: one panel per logged loss, step on the x axis.

Why: the issue's acceptance asks to see every objective's loss fall; the same PNG goes to MLflow and into
`snakemake --report`.

Use: `png_bytes = loss_curves_png(history, title="stage 2")`  (history: the `history` list of `train_stage`)
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def loss_curves_png(history: Sequence[Mapping[str, float]], title: str) -> bytes:
    keys = sorted({k for h in history for k in h if k.startswith("loss")})
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    if not keys:
        axes[0][0].text(0.5, 0.5, "no training steps", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
