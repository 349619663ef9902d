"""Training curves from `metrics.jsonl`: loss and accuracy of every split against step."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import metrics_writer  # noqa: E402


def plot_curves(workdir: str, keys=("loss", "accuracy"), log_x: bool = False, filename: str = "curves.png") -> str:
    """Writes one panel per metric key, one line per split; returns the image's path."""
    events = metrics_writer.read(workdir)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4))
    for ax, key in zip(axes, keys):
        for split in sorted({e["split"] for e in events if key in e}):
            # A resumed run may have logged a step twice; the later event wins.
            points = dict(sorted({e["step"]: e[key] for e in events if e["split"] == split and key in e}.items()))
            ax.plot(list(points), list(points.values()), label=split)
        ax.set(xlabel="step", ylabel=key, xscale="log" if log_x else "linear",
               yscale="log" if key == "loss" else "linear")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
