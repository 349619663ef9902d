"""The recall study: attention vs Mamba-2 (two state sizes) vs hybrid vs the subquadratic mixers (linear attention,
sliding-window attention, Mamba-1) on MQAR over sequence lengths.

    python scripts/recall_study.py [--out=runs/recall_study] [--lengths=32,64,128] [--steps=1500]
        [--variants=attention,ssd_state16,...]   (all eight by default)

Each run is the shared trainer on `experiments/configs/recall.py` with num_pairs = seq_len / 8 and
fresh examples, in its own workdir under --out (a finished run is read back, not run again). Writes
`results.csv`, `recall.png` (test accuracy against length, one line per model) and prints a
Markdown table.
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

_OUT = flags.DEFINE_string("out", "runs/recall_study", "Folder for the runs, results.csv and recall.png.")
_LENGTHS = flags.DEFINE_list("lengths", ["32", "64", "128"], "Sequence lengths; num_pairs = length / 8.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps per run.")

VARIANTS = {  # key: (label, recall config arg, model overrides)
    "attention": ("attention (CA x 2)", "attention", {}),
    "ssd_state16": ("Mamba-2, state 16", "ssd", dict(ssm_state=16)),
    "ssd_state64": ("Mamba-2, state 64", "ssd", dict(ssm_state=64)),
    "hybrid": ("hybrid (SA), state 16", "hybrid", dict(ssm_state=16)),
    "transformer": ("transformer, no conv", "transformer", {}),
    "linear": ("linear attention: short conv + linear attention, twice (CL x 2)", "attention", dict(layer_pattern="CL")),
    "sliding": ("sliding-window attention (16 keys), CA x 2", "attention",
                dict(attention_pattern="sliding", attention_window=16)),
    "mamba1": ("Mamba-1, 3 layers, state 16", "ssd",  # trained through its recurrence, unrolled: ~2x faster on CPU
               dict(layer_pattern="M", mamba1_scan="sequential", scan_unroll=3)),
}
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


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    lengths = [int(n) for n in _LENGTHS.value]
    unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants={','.join(unknown)}: not among {list(VARIANTS)}")
    labels = [VARIANTS[v][0] for v in _VARIANTS.value]
    results = []
    for length in lengths:
        for variant in _VARIANTS.value:
            results.append(run(variant, length))
            print(results[-1], flush=True)
    with open(os.path.join(_OUT.value, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = "osD^v<>"
    for i, label in enumerate(labels):
        rows = [r for r in results if r["model"] == label]
        ax.plot([r["length"] for r in rows], [r["test_accuracy"] for r in rows], marker=markers[i % len(markers)],
                linestyle="--" if i % 2 else "-", label=f"{label} ({rows[0]['params']:,} params)")
    ax.plot(lengths, [8 / n for n in lengths], color="gray", linestyle=":", label="1 / pairs (a value from the context)")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(lengths, [f"{n} ({n // 8} pairs)" for n in lengths])
    ax.set(xlabel="sequence length (key-value pairs)", ylabel="test accuracy",
           title=f"MQAR after {_STEPS.value} steps", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(_OUT.value, "recall.png"), dpi=120)

    print("\n| model | params | " + " | ".join(f"L={n} ({n // 8} pairs)" for n in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for label in labels:
        row = [r for r in results if r["model"] == label]
        print(f"| {label} | {row[0]['params']:,} | " + " | ".join(f"{r['test_accuracy']:.3f}" for r in row) + " |")


if __name__ == "__main__":
    app.run(main)
