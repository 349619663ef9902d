"""Steering the Shakespeare LM toward upper case (issue 22): a contrastive mean-difference direction in the
residual stream, added at scale alpha while the KV-cached sampler generates, and what it costs.

    PYTHONPATH=. python scripts/studies/steering_study.py --lm=runs/lm --layer=2

v = mean of the residual after `--layer` at upper-case letters minus its mean at lower-case letters, over the
validation windows (experiments/analysis/steering.mean_difference). For each alpha, with x <- x + alpha v at every position:
- the property: the fraction of upper-case letters among the letters of samples (temperature 1, the same seeds
  and prompts for every alpha; 0 on the validation text's own letters is its natural rate),
- the cost: the steered model's next-character loss on the validation windows (nats), against alpha = 0.
Writes OUT/steering.json and docs/steering_study.png.
"""

import json
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import data as datasets
from experiments import losses, restore
from experiments.analysis import steering
from experiments.training import plots  # noqa: E402
from models import sampling

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LM = flags.DEFINE_string("lm", "runs/lm", "A byte-level Shakespeare LM run.")
_OUT = flags.DEFINE_string("out", "runs/steering", "The study's folder.")
_LAYER = flags.DEFINE_integer("layer", 2, "Steer the residual stream after this layer (run order).")
_ALPHAS = flags.DEFINE_list("alphas", ["0", "0.5", "1", "2", "3", "4", "6"], "Scales of the direction.")
_SAMPLES = flags.DEFINE_integer("samples", 32, "Samples per alpha.")
_LENGTH = flags.DEFINE_integer("length", 160, "Characters per sample.")
_DOCS = flags.DEFINE_string("docs", "docs", "Where the figure goes.")


def uppercase_fraction(tokens) -> float:
    chars = np.asarray(tokens).reshape(-1)
    upper, lower = np.sum((chars >= 65) & (chars <= 90)), np.sum((chars >= 97) & (chars <= 122))
    return float(upper / max(upper + lower, 1))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = restore.load_config(_LM.value)
    model, variables = restore.load_variables(config, _LM.value)
    evals = datasets.load(config.data, seed=config.seed).evals["eval"]
    tokens = jnp.asarray(evals["inputs"][:256])
    upper, lower = (tokens >= 65) & (tokens <= 90), (tokens >= 97) & (tokens <= 122)
    vector = steering.mean_difference(model, variables, _LAYER.value, tokens, tokens, mask_a=upper, mask_b=lower)
    prompts = tokens[:_SAMPLES.value, :16]
    window = {k: jnp.asarray(v[:128]) for k, v in evals.items()}
    rows = []
    for alpha in map(float, _ALPHAS.value):
        steered = steering.steered(variables, steering.steering_tree(model, variables, tokens[:1], _LAYER.value, vector,
                                                                     alpha))
        samples = jax.jit(lambda v, p: sampling.generate(model, v, p, model.init_cache(p.shape[0], 16 + _LENGTH.value),
                                                         jax.random.key(0), num_tokens=_LENGTH.value))(steered, prompts)
        loss, _ = losses.masked_mean(model.apply(steered, window["inputs"]), window["targets"], window["loss_mask"])
        rows.append({"alpha": alpha, "uppercase_fraction": uppercase_fraction(samples), "validation_loss": float(loss),
                     "example": bytes(np.asarray(samples[0], np.uint8)).decode("latin-1")})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "example"}), flush=True)
    result = {"layer": _LAYER.value, "vector_norm": float(jnp.linalg.norm(vector)),
              "validation_text_uppercase_fraction": uppercase_fraction(evals["inputs"]), "alphas": rows}
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "steering.json"), "w") as f:
        json.dump(result, f, indent=1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    alphas = [r["alpha"] for r in rows]
    left.plot(alphas, [r["uppercase_fraction"] for r in rows], marker="o", label="samples")
    left.axhline(result["validation_text_uppercase_fraction"], color="gray", linestyle=":", label="validation text")
    left.set(xlabel="alpha", ylabel="upper-case share of letters", title=f"steering after layer {_LAYER.value}")
    right.plot(alphas, [r["validation_loss"] - rows[0]["validation_loss"] for r in rows], marker="o", color="tab:red")
    right.set(xlabel="alpha", ylabel="validation loss increase (nats / char)", title="cost")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend()
    plots.save_figure(fig, os.path.join(_DOCS.value, "steering_study.png"), dpi=110)


if __name__ == "__main__":
    app.run(main)
