"""Optimizers on tiny Shakespeare at the LM config's shape (experiments/configs/lm_shakespeare.py).

    python scripts/studies/optimizer_study.py [--optimizers=adamw,lion,...] [--steps=2000] [--workdir=runs/optimizer_study]

For each optimizer: a small learning-rate sweep (`LRS`, seed 0), the best lr by final validation loss, then a
second seed at that lr. Every run keeps the config's schedule (100 warmup steps, cosine to 0.1x; schedule-free:
constant after warmup), clipping at 1.0, and its optimizer's own keys (`KEYS`); evaluation every 100 steps.
Reports per optimizer: validation loss at the end (both seeds), the first evaluated step at which the
validation loss is <= 1.90 (nanoGPT's CPU baseline reaches ~1.88 at 2,000 steps), and the training loop's
milliseconds per step. Finished runs are read, not rerun. Writes `table.md` and `curves.png` to the workdir.
"""

import os

from absl import app, flags
import numpy as np

from experiments import studies
from experiments.training import plots
from experiments.configs import lm_shakespeare

LRS = {  # peak learning rates swept, around each method's usual value at this scale
    "adamw": (3e-4, 1e-3, 3e-3),
    "adam": (3e-4, 1e-3, 3e-3),
    "sgd": (0.1, 0.3, 1.0),
    "lion": (1e-4, 3e-4, 1e-3),  # Chen et al.: 3-10x below AdamW's
    "adafactor": (3e-3, 1e-2, 3e-2),
    "schedule_free_adamw": (1e-3, 3e-3, 1e-2),
    "muon": (0.01, 0.02, 0.05),  # hidden matrices; the AdamW group (embeddings, norms) at 0.1x
    "shampoo": (3e-4, 1e-3, 3e-3),  # grafted to Adam's step size
}
KEYS = {  # each optimizer's keys beyond its defaults; decoupled decays match AdamW's lr * wd = 1e-4 at 1e-3
    "adamw": dict(b1=0.9, b2=0.99, weight_decay=0.1),
    "adam": dict(b1=0.9, b2=0.99),
    "sgd": dict(momentum=0.9, nesterov=True),
    "lion": dict(b1=0.9, b2=0.99, weight_decay=0.3),
    "adafactor": {},
    "schedule_free_adamw": dict(b1=0.9, b2=0.99, weight_decay=0.1),
    "muon": dict(weight_decay=0.0),
    "shampoo": dict(b1=0.9, b2=0.99, weight_decay=0.1),
}
TARGET = 1.90

_OPTIMIZERS = flags.DEFINE_list("optimizers", list(LRS), "Optimizers to study.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps per run.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/optimizer_study", "Where the runs, the table and the plot go.")


def config_for(name: str, lr: float, seed: int, steps: int):
    config = lm_shakespeare.get_config()
    config.seed = seed
    config.train.update(steps=steps, eval_every=100, checkpoint_every=steps)
    config.optimizer.update(name=name, lr=lr, decay="weights")
    if name == "schedule_free_adamw":
        config.optimizer.schedule = "constant"
    config.optimizer[name].update(**KEYS[name])
    return config


def run(name: str, lr: float, seed: int) -> dict:
    workdir = os.path.join(_WORKDIR.value, f"{name}_lr{lr:g}_seed{seed}")
    train, evals = studies.run_or_reuse(config_for(name, lr, seed, _STEPS.value), workdir)
    steps = np.array([e["step"] for e in evals])
    losses = np.array([e["loss"] for e in evals])
    reached = steps[losses <= TARGET]
    ms_per_step = 1e3 * np.median([(b["wall_s"] - a["wall_s"]) / (b["step"] - a["step"])
                                   for a, b in zip(train, train[1:])])
    return dict(lr=lr, loss=float(losses[-1]), reached=int(reached[0]) if len(reached) else None,
                ms_per_step=float(ms_per_step), curve=(steps, losses))


def main(argv):
    del argv
    os.makedirs(_WORKDIR.value, exist_ok=True)
    rows = {}
    for name in _OPTIMIZERS.value:
        sweep = [run(name, lr, 0) for lr in LRS[name]]
        for r in sweep:
            print(f"{name} lr {r['lr']:g}: val loss {r['loss']:.4f}, <= {TARGET} at {r['reached']}", flush=True)
        finite = [r for r in sweep if np.isfinite(r["loss"])]
        best = min(finite, key=lambda r: r["loss"])
        rows[name] = dict(sweep=sweep, best=best, second=run(name, best["lr"], 1))

    lines = [f"| optimizer | lrs swept (val loss) | best lr | val loss at {_STEPS.value} (seeds 0, 1) | "
             f"first step <= {TARGET} (seeds 0, 1) | loop ms / step, as run |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        sweep = ", ".join(f"{r['lr']:g} ({r['loss']:.3f})" for r in row["sweep"])
        runs = (row["best"], row["second"])
        lines.append(f"| {name} | {sweep} | {row['best']['lr']:g} | "
                     f"{runs[0]['loss']:.4f}, {runs[1]['loss']:.4f} | "
                     f"{', '.join(str(r['reached'] or 'never') for r in runs)} | "
                     f"{np.mean([r['ms_per_step'] for r in runs]):.1f} |")
    studies.write_table(_WORKDIR.value, lines)
    curves = {f"{name} (lr {row['best']['lr']:g})": row["best"]["curve"] for name, row in rows.items()}
    plots.validation_curves(curves, os.path.join(_WORKDIR.value, "curves.png"),
                            "tiny Shakespeare, 4-layer LM: each optimizer at its best lr (seed 0)", target=TARGET)


if __name__ == "__main__":
    app.run(main)
