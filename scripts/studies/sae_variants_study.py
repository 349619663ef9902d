"""SAE variants on the Shakespeare LM's residual stream (issue 22): the L0 / normalised-MSE frontier and the
fraction of cross-entropy loss recovered of ReLU + L1, TopK, BatchTopK and JumpReLU at several sparsities each.

    python -m experiments.train --config=experiments/configs/lm_shakespeare.py --workdir=runs/lm
    PYTHONPATH=. python scripts/studies/sae_variants_study.py --lm=runs/lm --out=runs/sae_variants

One activation store of the residual stream after `--layer` (every token of the first `--batches` training
batches), then one SAE per (kind, setting) through the one trainer (experiments/configs/sae.py, the same latents,
steps, batch and lr for all), each evaluated in the model on the validation text (experiments/analysis/sae_eval.py).
A finished SAE run is reused, so an interrupted study resumes. Writes OUT/study.json and docs/sae_variants.png.
"""

import json
import os

from absl import app, flags, logging
import matplotlib

from experiments import studies
from experiments.analysis import activation_store, sae_eval
from experiments.training import plots
from experiments.configs import sae as sae_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LM = flags.DEFINE_string("lm", "runs/lm", "A Shakespeare LM run (experiments/configs/lm_shakespeare.py).")
_OUT = flags.DEFINE_string("out", "runs/sae_variants", "The study's folder.")
_LAYER = flags.DEFINE_integer("layer", 1, "The residual stream after this layer (run order).")
_BATCHES = flags.DEFINE_integer("batches", 64, "Training batches of 32 windows captured into the store.")
_LATENTS = flags.DEFINE_integer("latents", 1024, "SAE latents.")
_STEPS = flags.DEFINE_integer("steps", 2000, "SAE training steps.")
_LR = flags.DEFINE_float("lr", 1e-3, "SAE learning rate.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Validation batches of 64 windows for sae_eval.")
_SETTINGS = {
    "relu": flags.DEFINE_list("relu", ["0.5", "1", "2", "4", "8"], "L1 coefficients."),
    "topk": flags.DEFINE_list("topk", ["4", "8", "16", "32"], "k values."),
    "batchtopk": flags.DEFINE_list("batchtopk", ["4", "8", "16", "32"], "k values."),
    "jumprelu": flags.DEFINE_list("jumprelu", ["0.03", "0.1", "0.3", "1", "3"], "L0 coefficients."),
}
KNOB = {"relu": "l1_coefficient", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coefficient"}
_DOCS = flags.DEFINE_string("docs", "docs", "Where the figure goes.")


def run_one(store: str, kind: str, value: str, workdir: str) -> dict:
    config = sae_config.get_config(kind)
    config.data.store = store
    config.model.update(num_latents=_LATENTS.value, **{KNOB[kind]: int(value) if KNOB[kind] == "k" else float(value)})
    if kind == "jumprelu":  # thresholds that can move in 2,000 steps (the paper trains ~100x longer): theta starts
        # at 0.1 on rows of E||x||^2 = D, its log learns at 10x the lr, and the kernel is 0.05 wide
        config.model.update(epsilon=0.05, initial_threshold=0.1)
        config.optimizer.lr_multipliers = "log_theta=10"
    config.train.update(steps=_STEPS.value, checkpoint_every=_STEPS.value)
    config.optimizer.lr = _LR.value
    if not os.path.isfile(os.path.join(workdir, "sae_eval.json")):
        studies.run_or_reuse(config, workdir)  # resumes an interrupted run
        sae_eval.evaluate_run(workdir, split="eval", batches=_EVAL_BATCHES.value, batch_size=64)
    with open(os.path.join(workdir, "sae_eval.json")) as f:
        return {"kind": kind, KNOB[kind]: value, **json.load(f)}


def figure(rows, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, marker in zip(KNOB, "osD^"):
        points = sorted((r["l0"], r["normalised_mse"], r["loss_recovered"]) for r in rows if r["kind"] == kind)
        if not points:
            continue
        l0, nmse, recovered = zip(*points)
        axes[0].plot(l0, nmse, marker=marker, label=kind)
        axes[1].plot(l0, recovered, marker=marker, label=kind)
    axes[0].set(xscale="log", yscale="log", xlabel="L0 (active latents per token)", ylabel="normalised MSE",
                title="reconstruction frontier (lower left is better)")
    axes[1].set(xscale="log", xlabel="L0", ylabel="fraction of CE loss recovered", title="loss recovered")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    plots.save_figure(fig, path, dpi=110)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    store = os.path.join(_OUT.value, "store")
    activation_store.write(_LM.value, store, "residual", _LAYER.value, "train", batches=_BATCHES.value, batch_size=32)
    rows = []
    for kind, values in _SETTINGS.items():
        for value in values.value:
            rows.append(run_one(store, kind, value, os.path.join(_OUT.value, f"{kind}_{value}")))
            print(json.dumps({k: rows[-1][k] for k in ("kind", KNOB[kind], "l0", "normalised_mse", "loss_recovered",
                                                        "dead_fraction")}), flush=True)
    with open(os.path.join(_OUT.value, "study.json"), "w") as f:
        json.dump(rows, f, indent=1)
    figure(rows, os.path.join(_DOCS.value, "sae_variants.png"))


if __name__ == "__main__":
    app.run(main)
