"""The recall study: attention vs Mamba-2 (two state sizes) vs hybrid vs the subquadratic mixers (linear attention,
sliding-window attention, Mamba-1) on MQAR over sequence lengths.

    python scripts/studies/recall_study.py [--out=runs/recall_study] [--lengths=32,64,128] [--steps=1500]
        [--variants=attention,ssd_state16,...]   (all eight by default)

Each run is the shared trainer on `experiments/configs/recall.py` with num_pairs = seq_len / 8 and
fresh examples, in its own workdir under --out (a finished run is read back, not run again). Writes
`results.csv`, `recall.png` (test accuracy against length, one line per model) and prints a
Markdown table. `--replot` draws the plot and table from an existing `--out`/results.csv without training (the
recall study page's plot (docs/studies/recall.md) joins the rows of several invocations into one such file).
"""

import csv
import os

from absl import app, flags
import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import models  # noqa: E402
from experiments import studies  # noqa: E402
from experiments.configs import recall  # noqa: E402
from experiments.training import plots  # noqa: E402

_OUT = flags.DEFINE_string("out", "runs/recall_study", "Folder for the runs, results.csv and recall.png.")
_LENGTHS = flags.DEFINE_list("lengths", ["32", "64", "128"], "Sequence lengths; num_pairs = length / 8.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps per run.")

VARIANTS = {  # key: (label, recall config arg, model overrides)
    "attention": ("attention (CA x 2)", "attention", {}),
    "ssd_state16": ("Mamba-2, state 16", "ssd", dict(ssm_state=16)),
    "ssd_state64": ("Mamba-2, state 64", "ssd", dict(ssm_state=64)),
    "hybrid": ("hybrid (SA), state 16", "hybrid", dict(ssm_state=16)),
    "transformer": ("transformer, no conv", "transformer", {}),
    "linear": ("linear attention (CL x 2)", "attention", dict(layer_pattern="CL")),
    "sliding": ("sliding-window attention (16 keys), CA x 2", "attention",
                dict(attention_pattern="sliding", attention_window=16)),
    "mamba1": ("Mamba-1, 3 layers, state 16", "ssd",  # trained through its recurrence, unrolled: ~2x faster on CPU
               dict(layer_pattern="M", mamba1_scan="sequential", scan_unroll=3)),
}
_REPLOT = flags.DEFINE_bool("replot", False, "Only redraw recall.png and the table from --out/results.csv.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Models to run, of {list(VARIANTS)}.")


def run(variant: str, length: int) -> dict:
    label, arg, overrides = VARIANTS[variant]
    config = recall.get_config(arg)
    config.model.update(vocab_size=config.data.vocab_size, max_len=length, **overrides)
    config.data.update(seq_len=length, num_pairs=length // 8, train_examples=_STEPS.value * config.data.batch_size)
    config.train.update(steps=_STEPS.value, checkpoint_every=_STEPS.value)
    workdir = os.path.join(_OUT.value, f"{variant}_len{length}")
    train, evals = studies.run_or_reuse(config, workdir, devices=jax.devices()[:1])
    return dict(model=label, length=length, num_pairs=length // 8,
                params=models.parameter_count(config.model, length), test_accuracy=evals[-1]["accuracy"],
                train_loss=train[-1]["loss"], wall_s=round(train[-1]["wall_s"], 1))


def read_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise app.UsageError(f"--replot: {path} does not exist (run the study into --out first)")
    with open(path, newline="") as f:
        return [dict(row, length=int(row["length"]), params=int(row["params"]),
                     test_accuracy=float(row["test_accuracy"])) for row in csv.DictReader(f)]


def plot(results: list[dict], path: str):
    labels = list(dict.fromkeys(r["model"] for r in results))
    lengths = sorted({r["length"] for r in results})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>p"
    for i, label in enumerate(labels):
        rows = sorted((r for r in results if r["model"] == label), key=lambda r: r["length"])
        ax.plot([r["length"] for r in rows], [r["test_accuracy"] for r in rows], marker=markers[i % len(markers)],
                linestyle="--" if i % 2 else "-", label=f"{label} ({rows[0]['params']:,} params)")
    ax.plot(lengths, [8 / n for n in lengths], color="gray", linestyle=":", label="1 / pairs (a value from the context)")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(lengths, [f"{n} ({n // 8} pairs)" for n in lengths])
    ax.set(xlabel="sequence length (key-value pairs)", ylabel="test accuracy", title=f"MQAR after {_STEPS.value} steps",
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5)
    plots.save_figure(fig, path)


def print_table(results: list[dict]):
    lengths = sorted({r["length"] for r in results})
    print("\n| model | params | " + " | ".join(f"L={n} ({n // 8} pairs)" for n in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for label in dict.fromkeys(r["model"] for r in results):
        by_length = {r["length"]: r for r in results if r["model"] == label}
        cells = [f"{by_length[n]['test_accuracy']:.3f}" if n in by_length else "not run" for n in lengths]
        print(f"| {label} | {next(iter(by_length.values()))['params']:,} | " + " | ".join(cells) + " |")


def main(argv):
    del argv
    results_csv = os.path.join(_OUT.value, "results.csv")
    if _REPLOT.value:
        results = read_results(results_csv)
    else:
        unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
        if unknown:
            raise app.UsageError(f"--variants={','.join(unknown)}: not among {list(VARIANTS)}")
        os.makedirs(_OUT.value, exist_ok=True)
        results = []
        for length in [int(n) for n in _LENGTHS.value]:
            for variant in _VARIANTS.value:
                results.append(run(variant, length))
                print(results[-1], flush=True)
        with open(results_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
    plot(results, os.path.join(_OUT.value, "recall.png"))
    print_table(results)


if __name__ == "__main__":
    app.run(main)
