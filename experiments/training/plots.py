"""Training curves from `metrics.jsonl`: loss and accuracy of every split against step; the monitors
(experiments/training/monitors.py), one panel per kind."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.training import metrics_writer  # noqa: E402


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Lays `fig` out, writes it to `path` (making its folder) and closes it; returns `path`. Every figure the
    project writes goes through here."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_curves(workdir: str, keys=("loss", "accuracy"), log_x: bool = False, filename: str = "curves.png") -> str:
    """Writes one panel per metric key, one line per split; returns the image's path."""
    events = metrics_writer.read(workdir)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4))
    for ax, key in zip(axes, keys):
        positive = True
        for split in sorted({e["split"] for e in events if key in e}):
            # A resumed run may have logged a step twice; the later event wins.
            points = dict(sorted({e["step"]: e[key] for e in events if e["split"] == split and key in e}.items()))
            ax.plot(list(points), list(points.values()), label=split)
            positive = positive and min(points.values()) > 0
        ax.set(xlabel="step", ylabel=key, xscale="log" if log_x else "linear",
               yscale="log" if key.endswith("loss") and positive else "linear")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    return save_figure(fig, os.path.join(workdir, filename))


def plot_monitors(workdir: str, log_x: bool = False, filename: str = "monitors.png") -> str:
    """One panel per monitor kind (weight_norm, update_ratio, grad_norm, entropy, residual_rms,
    activation_density), one line per group / layer / head; returns the image's path."""
    events = metrics_writer.read(workdir, "train")
    keys = sorted({k for e in events for k in e if k.startswith("monitor/")})
    kinds = sorted({_kind(k) for k in keys})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for key in (k for k in keys if _kind(k) == kind):
            points = dict(sorted({e["step"]: e[key] for e in events if key in e}.items()))
            label = key.removeprefix("monitor/").replace(kind, "").strip("/").replace("//", "/") or "all"
            ax.plot(list(points), list(points.values()), label=label, linewidth=1)
        ax.set(xlabel="step", title=kind, xscale="log" if log_x else "linear",
               yscale="log" if kind in ("update_ratio", "grad_norm") else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    path = os.path.join(workdir, filename)
    return save_figure(fig, path, dpi=110)


def _kind(key: str) -> str:
    """monitor/weight_norm/layers/3 -> weight_norm; monitor/layers/attention/entropy/3/1 -> entropy."""
    parts = key.split("/")
    if parts[1] in ("weight_norm", "update_ratio", "grad_norm"):
        return parts[1]
    return next(p for p in reversed(parts) if not p.isdigit())


def validation_curves(curves: dict, path: str, title: str, target: float | None = None) -> str:
    """A study's validation-loss curves, {label: (steps, losses)}, on one panel (a dashed line at `target`)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=label)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
    ax.set(xlabel="step", ylabel="validation loss (cross-entropy)", ylim=(1.4, 3.0), title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
