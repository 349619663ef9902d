"""Adaptive computation on tiny Shakespeare: Mixture-of-Depths against the dense transformer at equal training FLOPs,
and the early-exit frontier (validation loss against the average layers a token runs).

    # the IsoFLOP sweeps (experiments/scaling.py; one family per core; MoD's N counts routed blocks at capacity):
    S="--sizes=64x2,96x2,128x2,128x4,160x4 --budgets=3e11,1e12,3e12"
    python -m experiments.scaling --config=experiments/configs/lm_shakespeare.py $S --workdir=runs/adaptive/transformer
    python -m experiments.scaling --config=experiments/configs/lm_shakespeare.py:mod $S --workdir=runs/adaptive/mod
    # then (trains the early-exit model first if --exit_run has no checkpoint; ~3 min):
    PYTHONPATH=. python scripts/adaptive_study.py --runs=runs/adaptive --out=docs/adaptive_study.png

Every loss is the mean next-byte cross-entropy over the same validation windows (the last 10% of the text, context
64). MoD runs are scored twice: with top-k routing as trained (which reads the whole window, future tokens included)
and with the causal predictor routing that decoding uses. Prints markdown tables; draws the IsoFLOP curves and the
early-exit frontier side by side.
"""

import csv
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import length_eval, restore, trainer  # noqa: E402
from experiments.configs import lm_shakespeare  # noqa: E402

_RUNS = flags.DEFINE_string("runs", "runs/adaptive", "Folder with the transformer/ and mod/ sweeps.")
_EXIT_RUN = flags.DEFINE_string("exit_run", "runs/adaptive/early_exit", "The early-exit run (trained if absent).")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.9", "0.7", "0.5", "0.3", "0.1"], "Max-probability exit thresholds.")
_WINDOWS = flags.DEFINE_integer("windows", 1024, "Validation windows of 64 bytes scored per evaluation.")
_OUT = flags.DEFINE_string("out", "docs/adaptive_study.png", "Where the figure goes.")


def validation_loss(workdir: str, **model_overrides) -> float:
    report = length_eval.length_report(workdir, [1], max_windows=_WINDOWS.value, model_overrides=model_overrides)
    return report["factors"]["1"]["loss"]


def sweep_rows(family: str) -> list[dict]:
    """The sweep's results.csv rows, each with its validation loss (and MoD's under predictor routing)."""
    folder = os.path.join(_RUNS.value, family)
    with open(os.path.join(folder, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        run = os.path.join(folder, f"{row['size']}_{float(row['Training FLOP']):.3g}")
        row["val"] = validation_loss(run)
        if family == "mod":
            row["val_causal"] = validation_loss(run, routing="predictor")
    return rows


def frontier(rows, key):
    budgets = sorted({float(r["Training FLOP"]) for r in rows})
    best = [min(r[key] for r in rows if float(r["Training FLOP"]) == c) for c in budgets]
    return budgets, best, np.polyfit(np.log(budgets), np.log(best), 1)[0]


def isoflop_table(families: dict) -> None:
    print("| family | loss | best val loss at " + " / ".join(f"{c:.0e}" for c in frontier(families["transformer"], "val")[0])
          + " | its size | frontier slope |")
    print("|---|---|---|---|---|")
    for name, rows, key in (("transformer", families["transformer"], "val"), ("MoD (12.5%, every other block)",
                            families["mod"], "val"), ("MoD, causal predictor routing", families["mod"], "val_causal")):
        budgets, best, slope = frontier(rows, key)
        sizes = [min((r for r in rows if float(r["Training FLOP"]) == c), key=lambda r: r[key])["size"] for c in budgets]
        print(f"| {name} | {key} | {' / '.join(f'{b:.3f}' for b in best)} | {' / '.join(sizes)} | {slope:.3f} |")
    print()
    print("| size | N dense | N MoD (active) | " + " | ".join(f"dense / MoD / MoD causal at {c:.0e}" for c in
                                                            frontier(families["transformer"], "val")[0]) + " |")
    print("|---|---|---|" + "---|" * len(frontier(families["transformer"], "val")[0]))
    for size in dict.fromkeys(r["size"] for r in families["transformer"]):
        dense = {float(r["Training FLOP"]): r for r in families["transformer"] if r["size"] == size}
        mod = {float(r["Training FLOP"]): r for r in families["mod"] if r["size"] == size}
        cells = [f"{dense[c]['val']:.3f} / {mod[c]['val']:.3f} / {mod[c]['val_causal']:.3f}" for c in sorted(dense)]
        first = min(dense)
        print(f"| {size} | {int(float(dense[first]['Model Size'])):,} | {int(float(mod[first]['Model Size'])):,} | "
              + " | ".join(cells) + " |")


def early_exit_run() -> str:
    """The 6-layer LM with an exit after every block (trained once: the LM row's recipe otherwise)."""
    workdir = _EXIT_RUN.value
    if not (os.path.isdir(workdir) and restore.checkpoint_steps(workdir)):
        config = lm_shakespeare.get_config()
        config.model.update(num_layers=6, exit_every=1)
        trainer.train_and_evaluate(config, workdir, verbose=False)
    return workdir


def mean_layers_used(workdir: str, threshold: float) -> float:
    config = restore.load_config(workdir)
    config.model.update(exit_threshold=threshold)
    model, variables = restore.load_variables(config, workdir)
    stream = length_eval.validation_stream(config)
    length = config.data.seq_len
    windows = stream[:(len(stream) - 1) // length * length].reshape(-1, length)[:_WINDOWS.value]
    used = jax.jit(lambda t: model.apply(variables, t, method=model.layers_used))
    return float(np.mean([np.asarray(used(jnp.asarray(windows[i:i + 64]))).mean() for i in range(0, len(windows), 64)]))


def exit_frontier() -> list[tuple]:
    workdir = early_exit_run()
    rows = [(0.0, float(restore.load_config(workdir).model.num_layers), validation_loss(workdir))]
    for threshold in map(float, _THRESHOLDS.value):
        rows.append((threshold, mean_layers_used(workdir, threshold), validation_loss(workdir, exit_threshold=threshold)))
    print("| max-probability threshold | mean layers per token | val loss |")
    print("|---|---|---|")
    for threshold, layers, loss in rows:
        print(f"| {'off' if not threshold else threshold} | {layers:.2f} | {loss:.3f} |")
    return rows


def main(argv):
    del argv
    families = {name: sweep_rows(name) for name in ("transformer", "mod")}
    isoflop_table(families)
    print()
    exits = exit_frontier()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, key, style in (("transformer", "val", "-o"), ("mod", "val", "--s"), ("mod", "val_causal", ":^")):
        for colour, budget in zip(("tab:blue", "tab:orange", "tab:green"), frontier(families[name], key)[0]):
            points = sorted((float(r["Model Size"]), r[key]) for r in families[name] if float(r["Training FLOP"]) == budget)
            left.plot(*zip(*points), style, color=colour, label=f"{name}{' causal' if key == 'val_causal' else ''} {budget:.0e}")
    left.set(xscale="log", xlabel="active non-embedding parameters N", ylabel="validation loss",
             title="IsoFLOP: dense (-) vs MoD (--), MoD causal (:)")
    left.legend(fontsize=6)
    right.plot([layers for _, layers, _ in exits], [loss for _, _, loss in exits], "-o")
    for threshold, layers, loss in exits:
        right.annotate("off" if not threshold else f"{threshold:g}", (layers, loss), fontsize=8)
    right.set(xlabel="mean layers per token", ylabel="validation loss", title="early exit (6 layers, max-prob threshold)")
    fig.tight_layout()
    fig.savefig(_OUT.value, dpi=120)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
