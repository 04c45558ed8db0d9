"""Loss and accuracy curves of a training run, from its JSON-lines log, as a PNG.

    python -m training.plot training/tiny-dualfocus/train-log.jsonl training/tiny-dualfocus/curves.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(log: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    stages = ("vision", "projector", "full")
    for ax, title, keys in (
        (axes[0], "loss", ["loss", "answer_loss", "box_loss", "image_word_loss", "attention_loss"]),
        (axes[1], "vision heads: per-patch accuracy", ["colour_acc", "dot_acc", "vision_colour_acc", "vision_dot_acc"]),
        (axes[2], "stages 2-3: teacher-forced accuracy", ["acc_macro", "acc_micro", "acc_scoring", "acc_box_tokens"]),
        (axes[3], "box numbers: mean error, hundredths", ["box_number_error", "number_probe_error"]),
    ):
        for key in keys:
            for stage in stages:
                pts = [(r["elapsed_s"] / 60, r[key]) for r in rows if r["stage"] == stage and key in r]
                if pts:
                    label = f"{key} ({stage})"
                    ax.plot(*zip(*pts), label=label)
        ax.set_title(title)
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]))
