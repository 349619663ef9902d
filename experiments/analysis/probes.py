"""Linear probes: multinomial logistic regression from activations x [N, D] to labels y [N] in 0..C-1,

    p(y | x) = softmax(W standardise(x) + b),   minimise  mean_n -log p(y_n | x_n) + l2 ||W||^2

(or MLP probes, softmax(W relu(W_in standardise(x) + b_in) + b), `hidden` > 0; many targets at once: `fit_many`)

trained by optax (Adam, full batch) on a seeded train / test split, with each feature standardised by the training
split's mean and standard deviation. `probe_layers` fits one probe per layer of a site captured at every token
(experiments/analysis/activations.py): what each layer's residual stream makes linearly readable.

Properties of byte-level text to probe for (`text_properties`), per character, fitted on upper-case letters only
(so the current character alone does not give the answer: it must come from the context), with the positions
chosen balanced (as many positives as negatives, seeded), so chance is 0.5:

    line_start     the character follows a newline (a verse line's first capital, against capitals inside lines)
    speaker_name   a letter of a speaker's name: a line ending in ':' after a blank line ("MENENIUS:", "All:"),
                   against capitals in the speech

    python -m experiments.analysis.probes --workdir=RUN --property=speaker_name [--max_examples=256]

writes WORKDIR/probes_PROPERTY.json and .png: the train / test accuracy of a probe at each layer (0: embeddings).
"""

import json
import os
import re

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

import data as datasets
from data import text
from experiments import restore
from experiments.analysis import activations
from experiments.training import cli, plots

PROPERTIES = ("line_start", "speaker_name")


def split(count: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    test = int(round(test_fraction * count))
    return order[test:], order[:test]


def fit(features, labels, num_classes: int, **fit_args) -> dict:
    """{"train_accuracy", "test_accuracy", "weights" [D, C], "bias" [C], "mean", "scale"} of one probe (`fit_many`'s
    keyword arguments)."""
    found = fit_many(features, np.asarray(labels)[:, None], num_classes, **fit_args)
    return {k: v if k in ("mean", "scale") else v[0] for k, v in found.items()}


def fit_many(features, labels, num_classes: int, *, hidden: int = 0, steps: int = 500, lr: float = 0.05,
             l2: float = 1e-4, test_fraction: float = 0.25, seed: int = 0) -> dict:
    """K probes of the same features x [N, D] at once, one per column of labels [N, K] (e.g. every square of a
    board), each trained as if alone: the loss is the sum of theirs and Adam works per coordinate. hidden = H > 0
    makes each an MLP probe, softmax(relu(x W_in + b_in) W + b) with W_in [D, H] drawn N(0, 1/D).

    {"train_accuracy" [K], "test_accuracy" [K], "weights" [K, D or H, C], "bias" [K, C] (and "w_in", "b_in"),
    "mean" [D], "scale" [D]} (standardisation by the training rows, shared by the K probes)."""
    features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)
    train, test = split(len(labels), test_fraction, seed)
    mean, scale = features[train].mean(0), features[train].std(0) + 1e-6
    x = jnp.asarray((features - mean) / scale)
    tx = optax.adam(lr)

    def init(key):
        width = hidden or x.shape[1]
        params = {"weights": jnp.zeros((width, num_classes)), "bias": jnp.zeros(num_classes)}
        if hidden:
            params.update(w_in=jax.random.normal(key, (x.shape[1], hidden)) / np.sqrt(x.shape[1]),
                          b_in=jnp.zeros(hidden))
        return params

    def train_one(y, key):
        def loss(p):
            penalty = l2 * sum(jnp.sum(jnp.square(p[k])) for k in ("weights", "w_in") if k in p)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(probe_logits(p, x[train]), y[train])) + penalty

        def one(carry, _):
            p, state = carry
            updates, state = tx.update(jax.grad(loss)(p), state, p)
            return (optax.apply_updates(p, updates), state), None

        p = init(key)
        p = jax.lax.scan(one, (p, tx.init(p)), None, length=steps)[0][0]
        return p, jnp.argmax(probe_logits(p, x), axis=-1)

    keys = jax.random.split(jax.random.PRNGKey(seed), labels.shape[1])
    params, predicted = jax.jit(jax.vmap(train_one, in_axes=(1, 0)))(jnp.asarray(labels), keys)
    correct = np.asarray(predicted).T == labels  # [N, K]
    accuracy = lambda rows: correct[rows].mean(0) if len(rows) else np.full(labels.shape[1], np.nan)  # noqa: E731
    return {"train_accuracy": accuracy(train), "test_accuracy": accuracy(test), "mean": mean, "scale": scale,
            **{k: np.asarray(v) for k, v in params.items()}}


def probe_logits(params: dict, standardised):
    """One probe's logits [..., C] of standardised features [..., D]."""
    h = jax.nn.relu(standardised @ params["w_in"] + params["b_in"]) if "w_in" in params else standardised
    return h @ params["weights"] + params["bias"]


def probe_layers(model, variables, tokens, labels, mask, num_classes: int, site: str = "residual", **fit_args):
    """[{"layer", "train_accuracy", "test_accuracy"}] for layer 0 (the embeddings) .. L: a probe of `site` at
    every token where mask [B, T] is true, to labels [B, T]."""
    _, embed, per_layer = activations.capture(model, variables, tokens)
    chosen = np.asarray(mask, bool).reshape(-1)
    rows = [embed] + [layer[site] for layer in per_layer]
    results = []
    for layer, acts in enumerate(rows):
        flat = np.asarray(acts).reshape(-1, acts.shape[-1])[chosen]
        probe = fit(flat, np.asarray(labels).reshape(-1)[chosen], num_classes, **fit_args)
        results.append({"layer": layer, "train_accuracy": probe["train_accuracy"],
                        "test_accuracy": probe["test_accuracy"]})
    return results


def text_properties(corpus: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{property: (labels int32 [len], eligible bool [len])} per character of `corpus` (see the module doc)."""
    chars = np.frombuffer(corpus.encode("latin-1", "replace"), np.uint8)
    line_start = np.zeros(len(chars), np.int32)
    line_start[1:] = chars[:-1] == ord("\n")
    speaker = np.zeros(len(chars), np.int32)
    for match in re.finditer(r"(?:^|\n\n)([^\n]+:)\n", corpus):
        speaker[match.start(1):match.end(1)] = 1
    capitals = (chars >= ord("A")) & (chars <= ord("Z"))
    return {"line_start": (line_start, capitals), "speaker_name": (speaker, capitals)}


def balanced_mask(labels, eligible, seed: int = 0) -> np.ndarray:
    """bool like `labels`: every eligible position of the rarer class and as many of the other, drawn at random."""
    labels, eligible = np.asarray(labels).reshape(-1), np.asarray(eligible, bool).reshape(-1)
    positive, negative = np.flatnonzero(eligible & (labels == 1)), np.flatnonzero(eligible & (labels == 0))
    count = min(len(positive), len(negative))
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    mask[rng.choice(positive, count, replace=False)] = True
    mask[rng.choice(negative, count, replace=False)] = True
    return mask


def probe_text_property(workdir: str, prop: str, max_examples: int = 256, seed: int = 0) -> dict:
    """{"property", "layers": [{"layer", "train_accuracy", "test_accuracy"}], "positions"} of a byte-level text run's
    validation windows."""
    config = restore.load_config(workdir)
    if config.data.name != "text" or config.data.tokenizer != "byte":
        raise ValueError(f"--workdir={workdir!r} is not a byte-level text run (data.name='text', tokenizer='byte'): "
                         "its tokens are not characters")
    if prop not in PROPERTIES:
        raise ValueError(f"--property={prop!r} is not one of {list(PROPERTIES)}")
    _, eval_text = text.split_text(text.read_corpus(config.data.path), config.data.train_fraction)
    labels, eligible = text_properties(eval_text)[prop]
    windows = text.pack(np.arange(len(eval_text)), config.data.seq_len)["inputs"][:max_examples]  # char indices
    eligible = eligible[windows]
    eligible[:, 0] = False  # a window's first character sees no context
    mask = balanced_mask(labels[windows], eligible, seed).reshape(windows.shape)
    tokens = datasets.load(config.data, seed=config.seed).evals["eval"]["inputs"][:max_examples]
    model, variables = restore.load_variables(config, workdir)
    results = probe_layers(model, variables, jnp.asarray(tokens), labels[windows], mask, 2, seed=seed)
    return {"property": prop, "layers": results, "positions": int(mask.sum())}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in report["layers"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in ("train_accuracy", "test_accuracy"):
        ax.plot(layers, [r[key] for r in report["layers"]], marker="o", label=key.replace("_", " "))
    ax.axhline(0.5, color="gray", linestyle=":", label="chance")
    ax.set(xlabel="layer (0: embeddings)", ylabel="probe accuracy", title=f"linear probe: {report['property']}")
    ax.grid(alpha=0.3)
    ax.legend()
    plots.save_figure(fig, path)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    args = flags.FLAGS
    try:
        report = probe_text_property(args.workdir, args.property, args.max_examples)
    except (FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    stem = os.path.join(args.workdir, f"probes_{args.property}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f)
    plot(report, stem + ".png")
    for r in report["layers"]:
        print(f"layer {r['layer']}: train {r['train_accuracy']:.3f}, test {r['test_accuracy']:.3f}")


if __name__ == "__main__":  # the flags exist only for the command
    flags.DEFINE_string("workdir", None, "A byte-level text LM run folder.", required=True)
    flags.DEFINE_string("property", "speaker_name", f"One of {list(PROPERTIES)}.")
    flags.DEFINE_integer("max_examples", 256, "Validation windows read (the first ones).")
    app.run(main)
