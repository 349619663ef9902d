"""Nanda et al. 2023's progress measures over the checkpoints of a grokking run.

    python -m experiments.train --config=experiments/configs/grokking.py --workdir=runs/grokking \
        --config.train.checkpoint_every=250 --config.train.keep_checkpoints=100
    PYTHONPATH=. python scripts/studies/progress_measures_study.py --workdir=runs/grokking

Key frequencies come from the final embedding's Fourier spectrum (`experiments/analysis/progress_measures.py`);
for every checkpoint it computes train and test loss, the restricted loss (key-frequency part of
the logits only, all pairs) and the excluded loss (logits without it, train pairs). Writes
`progress_measures.json` and `progress_measures.png` (spectrum of the final embedding; losses
against steps, log-x) to the workdir.
"""

import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from data import algorithmic
from experiments.analysis import progress_measures as pm
from experiments import restore
from experiments.training import plots  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/grokking", "A finished grokking run with several checkpoints.")
_KEYS = flags.DEFINE_integer("key_frequencies", 5, "How many key frequencies to keep.")


def all_logits(model, variables, p):
    """[p, p, p]: logits of c at the `=` position for every pair (a, b)."""
    a, b = (x.ravel() for x in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
    tokens = jnp.asarray(np.stack([a, b, np.full(p * p, p)], 1), jnp.int32)
    logits = jax.jit(model.apply)(variables, tokens)[:, -1, :p]
    return np.asarray(logits, np.float64).reshape(p, p, p)


def main(argv):
    del argv
    config = restore.load_config(_WORKDIR.value)
    p = config.data.p
    train, _ = algorithmic.train_test_split(p, config.data.op, config.data.train_fraction, config.seed)
    train_pairs = train["inputs"][:, :2].astype(np.int64)
    in_train = np.zeros((p, p), bool)
    in_train[train_pairs[:, 0], train_pairs[:, 1]] = True
    test_pairs = np.argwhere(~in_train)
    steps = restore.checkpoint_steps(_WORKDIR.value)
    _, final = restore.load_variables(config, _WORKDIR.value, steps[-1])
    embedding = np.asarray(final["params"]["embed"]["embedding"])[:p]
    keys = pm.key_frequencies(embedding, _KEYS.value)
    spectrum = pm.embedding_spectrum(embedding)
    rows = []
    for step in steps:
        model, variables = restore.load_variables(config, _WORKDIR.value, step)
        logits = all_logits(model, variables, p)
        restricted, excluded = pm.restricted_and_excluded_loss(logits, keys, train_pairs)
        rows.append(dict(step=step, train_loss=pm._cross_entropy(logits, train_pairs[:, 0], train_pairs[:, 1]),
                         test_loss=pm._cross_entropy(logits, test_pairs[:, 0], test_pairs[:, 1]),
                         restricted_loss=restricted, excluded_loss=excluded))
        print(rows[-1], flush=True)
    with open(os.path.join(_WORKDIR.value, "progress_measures.json"), "w") as f:
        json.dump({"key_frequencies": keys, "spectrum": spectrum.tolist(), "checkpoints": rows}, f, indent=1)

    fig, (ax_spec, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
    ax_spec.bar(pm.frequencies(p), spectrum)
    ax_spec.set(xlabel="frequency k", ylabel="embedding norm on cos/sin(2 pi k x / p)",
                title=f"final embedding; key frequencies {keys}")
    for name in ("train_loss", "test_loss", "restricted_loss", "excluded_loss"):
        ax_loss.plot([r["step"] for r in rows], [r[name] for r in rows], label=name.replace("_", " "))
    ax_loss.set(xscale="log", yscale="log", xlabel="step", ylabel="loss", title="progress measures")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    plots.save_figure(fig, os.path.join(_WORKDIR.value, "progress_measures.png"))
    print(f"key frequencies {keys}")


if __name__ == "__main__":
    app.run(main)
