"""Auxiliary-loss vs auxiliary-loss-free MoE balancing (Wang et al. 2024) on tiny Shakespeare.

    python scripts/studies/moe_balance_study.py [--seeds=0,1,2] [--steps=1000] [--workdir=runs/moe_balance]

Trains `experiments/configs/moe_balance.py:aux` and `:loss_free` for each seed with the shared
trainer (a finished run is not re-run: the trainer resumes from its last checkpoint), then reports:
- validation loss at the end (and the training loop's wall time), read from each run's metrics.jsonl;
- MaxVio_batch: (max - mean) / mean of the per-expert load in a training batch, averaged over the
  MoE layers and the last 10% of the logged steps;
- MaxVio_global: the same over the loads of the whole validation split, from the final parameters.
Writes `table.md` and `curves.png` (validation loss and MaxVio_batch against steps) to the workdir.
"""

import os

from absl import app, flags
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import data as datasets
from data import pipeline
from experiments import restore, studies
from experiments.training import metrics_writer, plots, trainer
from experiments.configs import moe_balance
from models import moe

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per scheme.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps per run.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/moe_balance", "Where the runs, the table and the plot go.")


def batch_curves(workdir):
    """(steps, MaxVio_batch averaged over layers) and (steps, validation loss) from metrics.jsonl."""
    train = metrics_writer.read(workdir, "train")
    steps = np.array([e["step"] for e in train])
    vio = np.array([np.mean([v for k, v in e.items() if k.endswith("max_violation") or "/max_violation/" in k])
                    for e in train])
    evals = metrics_writer.read(workdir, "eval")
    return (steps, vio), (np.array([e["step"] for e in evals]), np.array([e["loss"] for e in evals]))


def global_max_violation(config, splits, workdir) -> float:
    """MaxVio over the whole validation split's expert loads, averaged over the MoE layers."""
    model, variables = restore.load_variables(config, workdir)
    apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["metrics"])[1]["metrics"])
    total = None
    for batch in pipeline.batched(splits.evals["eval"], batch_size=256, seed=0, shuffle=False, num_epochs=1,
                                  drop_remainder=True, process_index=0, process_count=1):  # no padding rows
        metrics = apply(variables, jnp.asarray(batch["inputs"]))
        loads = [np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(metrics)[0]
                 if "load" in jax.tree_util.keystr(path)]
        load = np.concatenate([x.reshape(-1, x.shape[-1]) for x in loads])  # [MoE layers, E]
        total = load if total is None else total + load
    return float(np.mean(jax.vmap(moe.max_violation)(total)))  # per MoE layer, then averaged


def main(argv):
    del argv
    os.makedirs(_WORKDIR.value, exist_ok=True)
    rows, curves = {}, {}
    for scheme in moe_balance.SCHEMES:
        for seed in map(int, _SEEDS.value):
            config = moe_balance.get_config(scheme)
            config.seed = seed
            config.train.steps = _STEPS.value
            workdir = os.path.join(_WORKDIR.value, f"{scheme}_seed{seed}")
            seconds = studies.run_or_reuse(config, workdir)[0][-1]["wall_s"]
            (steps, vio), (eval_steps, eval_loss) = batch_curves(workdir)
            splits = datasets.load(config.data, seed=seed)
            tail = vio[steps > 0.9 * _STEPS.value]
            rows.setdefault(scheme, []).append(dict(
                loss=float(eval_loss[-1]), vio_batch=float(np.mean(tail)),
                vio_global=global_max_violation(trainer.resolve(config, splits), splits, workdir),
                seconds=seconds))
            curves.setdefault(scheme, []).append(((steps, vio), (eval_steps, eval_loss)))
            print(f"{scheme} seed {seed}: {rows[scheme][-1]}", flush=True)

    lines = ["| scheme | seeds | val loss | MaxVio_batch | MaxVio_global | training-loop s per run |", "|---|---|---|---|---|---|"]
    for scheme, runs in rows.items():
        cell = lambda k, f: f"{np.mean([r[k] for r in runs]):{f}} ± {np.std([r[k] for r in runs]):{f}}"  # noqa: E731
        lines.append(f"| {scheme} | {len(runs)} | {cell('loss', '.4f')} | {cell('vio_batch', '.3f')} | "
                     f"{cell('vio_global', '.3f')} | {np.mean([r['seconds'] for r in runs]):.0f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(_WORKDIR.value, "table.md"), "w") as f:
        f.write(table + "\n")

    fig, (ax_loss, ax_vio) = plt.subplots(1, 2, figsize=(11, 4))
    for scheme, color in zip(curves, ("tab:red", "tab:blue")):
        for i, ((steps, vio), (eval_steps, eval_loss)) in enumerate(curves[scheme]):
            label = scheme if i == 0 else None
            ax_loss.plot(eval_steps, eval_loss, color=color, alpha=0.7, label=label)
            ax_vio.plot(steps, vio, color=color, alpha=0.7, label=label)
    ax_loss.set(xlabel="step", ylabel="validation loss", title="validation loss")
    ax_vio.set(xlabel="step", ylabel="MaxVio_batch (mean over layers)", yscale="log", title="load imbalance")
    for ax in (ax_loss, ax_vio):
        ax.legend()
        ax.grid(alpha=0.3)
    plots.save_figure(fig, os.path.join(_WORKDIR.value, "curves.png"))


if __name__ == "__main__":
    app.run(main)
