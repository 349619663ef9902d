"""Optimizers and grokking (experiments/configs/grokking.py: a+b mod 113, 30% train, Nanda et al.'s 1-layer
transformer, full batch), with the monitors on (`train.monitors`).

    python scripts/studies/grokking_optimizers_study.py [--optimizers=adamw,lion,muon,adafactor,sgd] [--seeds=0,1,2]
        [--sweep=adafactor,sgd] [--steps=10000] [--workdir=runs/grokking_optimizers] [--config.data.p=59 ...]

1. Steps to test accuracy >= 0.99 (evaluated every 100 steps) for each optimizer and seed, at the settings in
   `SETTINGS` (weight decay at lr * wd = 1e-3 per step, AdamW's in the paper). The optimizers in `--sweep`
   (those without a known grokking lr: Adafactor, SGD) first run seed 0 at each lr in `SWEEPS`; their rows
   run at the best (the earliest to grok; else the highest final test, then train, accuracy).
   Anchor: Tveit et al. 2025 report Muon grokking faster than AdamW.
2. AdamW's total weight norm against test accuracy through the transition: with weight decay 1.0, without
   any, and with dropout 0.1 on the residual branches (seed 0).
The table's runs stop at the first evaluation >= 0.99 (trained `--chunk` steps at a time, resuming: the schedule is
constant, so a run in chunks equals one run); the weight-norm runs go the full `--steps`. Finished runs are
read, not rerun. Writes `table.md` and `weight_norm.png` to the workdir. On a 2-core CPU a run of the paper's
config takes ~20 min (5 steps/s), of the default config's (`--config=experiments/configs/default.py`: mod 59,
half the pairs) ~4 min.
"""

import os

from absl import app, flags
import matplotlib
import numpy as np
from ml_collections import config_flags

from experiments import studies
from experiments.training import metrics_writer, plots, trainer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETTINGS = {  # (lr, the optimizer's own keys); weight_decay = LR_TIMES_DECAY / lr
    "adamw": (1e-3, dict(b1=0.9, b2=0.98)),
    "lion": (1e-4, dict(b1=0.9, b2=0.98)),  # Chen et al.: 3-10x smaller lr, larger decay
    "muon": (0.02, dict(adam_weight_decay=1.0)),
    "adafactor": (1e-2, dict()),
    "sgd": (0.3, dict(momentum=0.9, nesterov=True)),
}
LR_TIMES_DECAY = 1e-3  # AdamW's lr x weight decay in the paper: the decay per step of every run (SGD: through
# its momentum, so its wd is LR_TIMES_DECAY (1 - momentum) / lr; at LR_TIMES_DECAY / lr the decay per step was 10x,
# the weights shrank from norm 24 to ~1 in 700 steps and the loss stayed at ln 59 at every lr from 0.03 to 0.3)
SWEEPS = {"adafactor": (3e-3, 1e-2, 3e-2, 1e-1), "sgd": (0.03, 0.1, 0.3, 1.0)}  # untuned for grokking: swept first
TARGET = 0.99

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/grokking.py", "The base config.")
_OPTIMIZERS = flags.DEFINE_list("optimizers", list(SETTINGS), "Optimizers to compare.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per optimizer.")
_STEPS = flags.DEFINE_integer("steps", 10_000, "Training steps per run.")
_CHUNK = flags.DEFINE_integer("chunk", 500, "The table's runs train this many steps at a time until they grok.")
_SWEEP = flags.DEFINE_list("sweep", list(SWEEPS), "Optimizers whose lr is swept first (seed 0 at each lr in SWEEPS, "
                           "until it groks or --steps run out); their table rows run at the best lr.")
_WEIGHT_NORM = flags.DEFINE_bool("weight_norm", True, "Also run AdamW's weight-norm variants and plot them.")
_TRAIN = flags.DEFINE_bool("train", True, "False: only read the runs in the workdir (a study stopped early reports how "
                            "far each run got).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/grokking_optimizers", "Where the runs, the table and the plot go.")


def config_for(name: str, seed: int, lr=None, weight_decay=None, dropout: float = 0.0, steps=None):
    config = _CONFIG.value.copy_and_resolve_references()
    lr = lr or SETTINGS[name][0]
    config.seed = seed
    config.train.update(steps=steps or _STEPS.value, monitors=True, checkpoint_every=min(_CHUNK.value, _STEPS.value))
    config.optimizer.update(name=name, lr=lr)
    if weight_decay is None:
        weight_decay = LR_TIMES_DECAY / lr
        if name == "sgd":  # its L2 term goes through the momentum: lr wd / (1 - momentum) per step in the steady state
            weight_decay *= 1 - SETTINGS[name][1]["momentum"]
    config.optimizer[name].update(**SETTINGS[name][1], weight_decay=weight_decay)
    config.model.residual_dropout = dropout
    return config


def grokked_at(workdir: str):
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return None
    evals = metrics_writer.read(workdir, "eval")
    return next((e["step"] for e in evals if e["accuracy"] >= TARGET), None)


def evaluated_until(workdir: str) -> int:
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return 0
    return max((e["step"] for e in metrics_writer.read(workdir, "eval")), default=0)


def run_until_grokked(name: str, seed: int, workdir: str, lr=None):
    """Trains `_CHUNK` steps at a time (resuming) until test accuracy reaches TARGET or `--steps` run out."""
    for steps in range(_CHUNK.value, _STEPS.value + _CHUNK.value, _CHUNK.value):
        if grokked_at(workdir) or diverged(workdir) or not _TRAIN.value:
            break
        if evaluated_until(workdir) >= min(steps, _STEPS.value):  # this chunk ran before
            continue
        try:
            studies.run_or_reuse(config_for(name, seed, lr=lr, steps=min(steps, _STEPS.value)), workdir)
        except trainer.NonFiniteLossError as error:  # a diverging lr is one of a sweep's results
            with open(os.path.join(workdir, "DIVERGED"), "w") as f:
                f.write(f"{error}\n")
    return grokked_at(workdir)


def diverged(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "DIVERGED"))


def final_accuracies(workdir: str) -> tuple:
    """(test, train) accuracy at the last evaluation; (0, 0) for a run that has not started."""
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return 0.0, 0.0
    last = lambda split: max(metrics_writer.read(workdir, split), key=lambda e: e["step"], default={})  # noqa: E731
    return last("eval").get("accuracy", 0.0), last("train").get("accuracy", 0.0)


def sweep_lr(name: str, lines: list) -> float:
    """Seed 0 at each lr in SWEEPS[name]; the best groks first, or (none grokking) ends with the highest test, then
    train, accuracy. Appends a row to the sweep table `lines`."""
    results = {}
    for lr in SWEEPS[name]:
        workdir = os.path.join(_WORKDIR.value, f"{name}_lr{lr:g}_seed0")
        step = run_until_grokked(name, 0, workdir, lr)
        results[lr] = (-(step or np.inf), *((-1.0, -1.0) if diverged(workdir) else final_accuracies(workdir)))
        print(f"{name} lr {lr:g}: grokked at {step}, final test / train accuracy {results[lr][1:]}", flush=True)
    best = max(results, key=results.get)
    cells = [f"{'**' if lr == best else ''}{lr:g}: " + ("diverged" if r[1] < 0 else
             f"{f'{-r[0]:,.0f}' if np.isfinite(r[0]) else 'never'} ({r[1]:.2f} / {r[2]:.2f})")
             + ("**" if lr == best else "") for lr, r in results.items()]
    lines.append(f"| {name} | {' | '.join(cells)} |")
    return best


def run_folder(name: str, seed: int, lr: float) -> str:
    return os.path.join(_WORKDIR.value, f"{name}_lr{lr:g}_seed{seed}" if name in _SWEEP.value else f"{name}_seed{seed}")


def main(argv):
    del argv
    os.makedirs(_WORKDIR.value, exist_ok=True)
    width = max((len(SWEEPS[name]) for name in _SWEEP.value), default=1)
    sweep_lines = ["| optimizer (seed 0) |" + " lr: steps to 0.99 (final test / train accuracy) |" * width,
                   "|---|" + "---|" * width]
    lrs = {name: sweep_lr(name, sweep_lines) if name in _SWEEP.value else SETTINGS[name][0] for name in _OPTIMIZERS.value}
    lines = [f"| optimizer (lr) | {' | '.join(f'seed {s}' for s in _SEEDS.value)} | median |",
             "|---|" + "---|" * (len(_SEEDS.value) + 1)]
    for name in _OPTIMIZERS.value:
        steps, folders = [], [run_folder(name, int(seed), lrs[name]) for seed in _SEEDS.value]
        for seed, workdir in zip(map(int, _SEEDS.value), folders):
            steps.append(run_until_grokked(name, seed, workdir, lrs[name]))
            print(f"{name} seed {seed}: test accuracy >= {TARGET} at step {steps[-1]}", flush=True)
        cells = [f"{s:,}" if s else "diverged" if diverged(f) else f"not by {evaluated_until(f):,} "
                 f"({final_accuracies(f)[0]:.2f})" if evaluated_until(f) else "not run" for s, f in zip(steps, folders)]
        median = np.median([s or np.inf for s in steps])
        lines.append(f"| {name} ({lrs[name]:g}) | {' | '.join(cells)} | "
                     f"{f'{median:,.0f}' if np.isfinite(median) else 'never'} |")
    if len(sweep_lines) > 2:
        lines += ["", "lr sweeps:", ""] + sweep_lines
    studies.write_table(_WORKDIR.value, lines)
    if _WEIGHT_NORM.value:
        plot_weight_norms()


def plot_weight_norms():
    """AdamW's total weight norm and test accuracy through the transition: decay 1.0, none, and dropout 0.1."""
    variants = {"AdamW, no weight decay": (config_for("adamw", 0, weight_decay=0.0), "adamw_no_decay"),
                "AdamW, weight decay 1.0, dropout 0.1": (config_for("adamw", 0, dropout=0.1), "adamw_dropout"),
                "AdamW, weight decay 1.0": (config_for("adamw", 0), "adamw_seed0")}
    fig, (ax_norm, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (config, folder) in variants.items():
        workdir = os.path.join(_WORKDIR.value, folder)
        if _TRAIN.value:
            studies.run_or_reuse(config, workdir)
        elif not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            continue
        train, evals = metrics_writer.read(workdir, "train"), metrics_writer.read(workdir, "eval")
        ax_norm.plot([e["step"] for e in train], [e["monitor/weight_norm"] for e in train], label=label)
        ax_acc.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], label=label)
        print(f"{label}: test accuracy >= {TARGET} at step {grokked_at(workdir)}", flush=True)
    ax_norm.set(xlabel="step", ylabel="total weight norm", xscale="log", title="weight norm")
    ax_acc.set(xlabel="step", ylabel="test accuracy", xscale="log", title="test accuracy")
    for ax in (ax_norm, ax_acc):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    plots.save_figure(fig, os.path.join(_WORKDIR.value, "weight_norm.png"))


if __name__ == "__main__":
    app.run(main)
