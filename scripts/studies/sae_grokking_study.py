"""A TopK SAE on the grokked modular-addition model's MLP (issue 22): does it find the Fourier features the
progress measures find, and does ablating them break the circuit?

    python -m experiments.train --config=experiments/configs/grokking.py --workdir=runs/grokking \
        --config.train.steps=7000
    PYTHONPATH=. python scripts/studies/sae_grokking_study.py --lm=runs/grokking --out=runs/grokking_sae

1. An activation store of the MLP hidden activations (mlp_hidden, d_mlp = 512) at the `=` position of every pair
   (train and test), and a TopK SAE trained on it through the one trainer (experiments/configs/sae.py).
2. Each latent's activation over all p^2 pairs (a, b), and the share of its variance at each frequency
   (experiments/analysis/progress_measures.frequency_shares); a latent is a frequency-k latent when k holds at least
   --threshold of it. The key frequencies are the final embedding's (progress_measures.key_frequencies).
3. Ablations on the test pairs, with the SAE's error term kept (x <- x - sum_{i in S} f_i W_dec,i, at the `=`
   position): S = the key-frequency latents, S = as many other live latents drawn at random (5 draws), S = every
   live latent that is not a key-frequency latent; test accuracy and loss after each.
4. Dashboards of the key-frequency latents (experiments/analysis/sae_dashboard.py) and a figure.

`--site=mixer_out` reads the attention output at `=` instead (what the MLP reads). Writes
OUT/study_SITE_LATENTS_kK.json, docs/sae_grokking_SITE.png and docs/sae_grokking_dashboards_SITE/.
"""

import json
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import data as datasets
from experiments import restore, studies
from experiments.analysis import activation_store, activations, sae_dashboard, sae_eval
from experiments.training import plots
from experiments.analysis import progress_measures as pm
from experiments.configs import sae as sae_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LM = flags.DEFINE_string("lm", "runs/grokking", "A grokked run of experiments/configs/grokking.py.")
_OUT = flags.DEFINE_string("out", "runs/grokking_sae", "The study's folder (store, SAE run, study.json).")
_SITE = flags.DEFINE_string("site", "mlp_hidden", "The site at the `=` position: mlp_hidden, mixer_out, ffn_out, residual.")
_LATENTS = flags.DEFINE_integer("latents", 512, "SAE latents.")
_K = flags.DEFINE_integer("k", 8, "TopK's k.")
_STEPS = flags.DEFINE_integer("steps", 3000, "SAE training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 1024, "SAE training batch (rows).")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "Variance share that makes a latent a frequency-k latent.")
_DOCS = flags.DEFINE_string("docs", "docs", "Where the figure and the dashboards go.")


def train_sae(store: str, workdir: str):
    config = sae_config.get_config("topk")
    config.data.store = store
    config.model.update(num_latents=_LATENTS.value, k=_K.value, aux_k=64, dead_after=20_000)
    config.data.batch_size = _BATCH.value
    config.train.update(steps=_STEPS.value, checkpoint_every=_STEPS.value)
    studies.run_or_reuse(config, workdir)
    return restore.load_variables(restore.load_config(workdir), workdir)


def latent_maps(model, variables, sae_model, sae_variables, p: int) -> np.ndarray:
    """[p, p, M]: every latent's activation at the `=` position of every pair (a, b)."""
    a, b = (x.ravel() for x in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
    tokens = jnp.asarray(np.stack([a, b, np.full(p * p, p)], 1), jnp.int32)
    hidden = jax.jit(lambda t: activations.capture(model, variables, t)[2][0][_SITE.value][:, -1])(tokens)
    f = sae_model.apply(sae_variables, hidden, method=sae_model.encode)
    return np.asarray(f, np.float64).reshape(p, p, -1)


def ablation(model, variables, sae_model, sae_variables, examples, chosen) -> dict:
    """Test loss and accuracy with the latents `chosen` (bool [M]) removed from x, the error term kept."""
    decode = lambda f: sae_model.apply(sae_variables, f, method=sae_model.decode)  # noqa: E731

    def reconstruct(x):  # the chosen latents' part of x_hat, in x's units (the SAE's input scale undone)
        f = sae_model.apply(sae_variables, x, method=sae_model.encode)
        return x - (decode(f * chosen) - decode(jnp.zeros_like(f))), f

    result = sae_eval.evaluate(model, variables, examples, 0, _SITE.value, reconstruct, -1, batch_size=len(
        examples["inputs"]), batches=1)
    return {"loss": result["loss_spliced"], "accuracy": result["accuracy_spliced"], "latents": int(np.sum(chosen))}


def figure(shares, dominant, live, keys, maps, examples_of_key, path):
    fig = plt.figure(figsize=(13, 6))
    ax = fig.add_subplot(2, 1, 1)
    counts = np.bincount(dominant[live], minlength=shares.shape[1] + 1)[1:]
    ks = np.arange(1, shares.shape[1] + 1)
    ax.bar(ks, counts, color=["tab:red" if k in keys else "tab:gray" for k in ks])
    ax.set(xlabel="frequency k (red: the embedding's key frequencies)", ylabel="latents",
           title=f"SAE latents by dominant frequency (share >= {_THRESHOLD.value}); {int(np.sum(dominant[live] == 0))} "
                 "latents have none")
    for i, latent in enumerate(examples_of_key[:6]):
        sub = fig.add_subplot(2, 6, 7 + i)
        sub.imshow(maps[:, :, latent], cmap="viridis", origin="lower")
        sub.set(title=f"latent {latent}: k={dominant[latent]}", xticks=[], yticks=[], xlabel="b", ylabel="a")
    plots.save_figure(fig, path, dpi=110)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    out, lm = _OUT.value, _LM.value
    lm_config = restore.load_config(lm)
    p = lm_config.data.p
    store = os.path.join(out, f"store_{_SITE.value}")
    activation_store.write(lm, store, _SITE.value, 0, "train,eval", batches=1_000, batch_size=1024, position=-1)
    sae_workdir = os.path.join(out, f"sae_{_SITE.value}_{_LATENTS.value}_k{_K.value}")
    sae_model, sae_variables = train_sae(store, sae_workdir)
    evaluation = sae_eval.evaluate_run(sae_workdir, split="eval", batches=1, batch_size=p * p)
    model, variables = restore.load_variables(lm_config, lm)
    keys = pm.key_frequencies(np.asarray(variables["params"]["embed"]["embedding"])[:p])
    maps = latent_maps(model, variables, sae_model, sae_variables, p)
    live = np.any(maps != 0, axis=(0, 1))
    shares = pm.frequency_shares(maps)
    dominant = np.where(shares.max(axis=1) >= _THRESHOLD.value, shares.argmax(axis=1) + 1, 0)
    key_latents = live & np.isin(dominant, keys)
    others = np.flatnonzero(live & ~key_latents)
    test = datasets.load(lm_config.data, seed=lm_config.seed).evals["eval"]
    ablate = lambda chosen: ablation(model, variables, sae_model, sae_variables, test, chosen)  # noqa: E731
    rng = np.random.default_rng(0)
    random_draws = [ablate(np.isin(np.arange(len(live)), rng.choice(others, min(len(others), key_latents.sum()),
                                                                        replace=False))) for _ in range(5)]
    result = {
        "key_frequencies": keys, "sae": evaluation, "live_latents": int(live.sum()),
        "latents_by_frequency": {int(k): int(np.sum(live & (dominant == k))) for k in np.unique(dominant[live])},
        "key_frequency_latents": int(key_latents.sum()),
        "other_frequency_latents": int(np.sum(live & (dominant > 0) & ~key_latents)),
        "no_single_frequency": int(np.sum(live & (dominant == 0))),
        "mean_top_share_of_key_latents": float(shares[key_latents].max(axis=1).mean()) if key_latents.any() else 0.0,
        "ablate_none": ablate(np.zeros(len(live), bool)),
        "ablate_key_frequency_latents": ablate(key_latents),
        "ablate_each_key_frequency": {int(k): ablate(live & (dominant == k)) for k in keys},
        "ablate_random_others": random_draws,
        "ablate_all_others": ablate(live & ~key_latents),
        "ablate_all_latents": ablate(live),
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"study_{_SITE.value}_{_LATENTS.value}_k{_K.value}.json"), "w") as f:
        json.dump(result, f, indent=1)
    by_frequency = np.argsort(-np.mean(maps != 0, axis=(0, 1)))
    first_of_each = [next((int(i) for i in by_frequency if key_latents[i] and dominant[i] == k), None) for k in keys]
    examples_of_key = [i for i in first_of_each if i is not None]  # one per key frequency first, then the rest
    examples_of_key += [int(i) for i in by_frequency if key_latents[i] and i not in examples_of_key]
    figure(shares, dominant, live, keys, maps, examples_of_key, os.path.join(_DOCS.value, f"sae_grokking_{_SITE.value}.png"))
    sae_dashboard.write_dashboards(sae_workdir, os.path.join(_DOCS.value, f"sae_grokking_dashboards_{_SITE.value}"),
                                   latent_ids=examples_of_key[:16] or None,  # none: the 16 most active
                                   split="eval", batches=1, batch_size=p * p,
                                   contexts=8)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
