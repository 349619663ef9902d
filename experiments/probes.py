"""Linear probes: multinomial logistic regression from activations x [N, D] to labels y [N] in 0..C-1,

    p(y | x) = softmax(W standardise(x) + b),   minimise  mean_n -log p(y_n | x_n) + l2 ||W||^2

trained by optax (Adam, full batch) on a seeded train / test split, with each feature standardised by the training
split's mean and standard deviation. `probe_layers` fits one probe per layer of a site captured at every token
(experiments/activations.py): what each layer's residual stream makes linearly readable.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import activations


def split(count: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    test = int(round(test_fraction * count))
    return order[test:], order[:test]


def fit(features, labels, num_classes: int, *, steps: int = 500, lr: float = 0.05, l2: float = 1e-4,
        test_fraction: float = 0.25, seed: int = 0) -> dict:
    """{"train_accuracy", "test_accuracy", "weights" [D, C], "bias" [C], "mean", "scale"} of one probe."""
    features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)
    train, test = split(len(labels), test_fraction, seed)
    mean, scale = features[train].mean(0), features[train].std(0) + 1e-6
    x = (features - mean) / scale
    params = {"weights": jnp.zeros((features.shape[1], num_classes)), "bias": jnp.zeros(num_classes)}
    tx = optax.adam(lr)

    def loss(p):
        logits = x[train] @ p["weights"] + p["bias"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels[train])) + l2 * jnp.sum(
            jnp.square(p["weights"]))

    @jax.jit
    def train_all(p):
        def one(carry, _):
            p, state = carry
            grads = jax.grad(loss)(p)
            updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None
        return jax.lax.scan(one, (p, tx.init(p)), None, length=steps)[0][0]

    params = train_all(params)
    predicted = np.asarray(jnp.argmax(x @ params["weights"] + params["bias"], axis=-1))
    accuracy = lambda rows: float(np.mean(predicted[rows] == labels[rows])) if len(rows) else float("nan")  # noqa: E731
    return {"train_accuracy": accuracy(train), "test_accuracy": accuracy(test), "mean": mean, "scale": scale,
            **{k: np.asarray(v) for k, v in params.items()}}


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
