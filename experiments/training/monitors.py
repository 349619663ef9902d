"""Training-dynamics monitors (`train.monitors`), computed inside the train step and logged with the other
train metrics every `log_every` steps (means over the window), under `monitor/...`:

    weight_norm/G        ||W_G||_F of each parameter group G, and weight_norm (all parameters)
    update_ratio/G       ||W_G(t+1) - W_G(t)||_F / ||W_G(t)||_F, the update-to-weight ratio
    grad_norm/G          ||dL/dW_G||_F
    (model-sown, models.MONITORS)  attention entropy per layer and head (nats, mean over queries),
                         residual-stream RMS after each block, MLP activation density (fraction > 0)

A group is one unit of a scanned stack (`.../layers/3`: every parameter of layer 3), or, outside a stack,
the module that holds the parameter (`embed`, `final_norm`, `unembed`).
"""

import collections

import jax
import jax.numpy as jnp

STACKS = ("layers", "periods")  # the scanned stacks' names (models/lm.py, models/hybrid.py)


def _squared_norms_by_group(tree) -> dict:
    """{group: sum of squares}, a [units] vector for a stack's groups."""
    sums = collections.defaultdict(float)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        stacked = next((i for i, n in enumerate(names) if n in STACKS), None)
        squares = jnp.square(leaf.astype(jnp.float32))
        if stacked is not None:
            sums["/".join(names[:stacked + 1])] += jnp.sum(squares.reshape(leaf.shape[0], -1), axis=1)
        else:
            sums["/".join(names[:-1]) or names[-1]] += jnp.sum(squares)
    return sums


def _per_unit(name: str, values: dict) -> dict:
    out = {}
    for group, value in values.items():
        if value.ndim:
            out.update({f"monitor/{name}/{group}/{i}": value[i] for i in range(value.shape[0])})
        else:
            out[f"monitor/{name}/{group}"] = value
    return out


def parameter_monitors(params, new_params, grads) -> dict:
    """Weight norms, update-to-weight ratios and gradient norms per group (the module docstring)."""
    weights = _squared_norms_by_group(params)
    updates = _squared_norms_by_group(jax.tree.map(jnp.subtract, new_params, params))
    gradients = _squared_norms_by_group(grads)
    total = sum(jnp.sum(v) for v in weights.values())
    return {"monitor/weight_norm": jnp.sqrt(total),
            **_per_unit("weight_norm", {g: jnp.sqrt(v) for g, v in weights.items()}),
            **_per_unit("update_ratio", {g: jnp.sqrt(updates[g] / jnp.maximum(v, 1e-30)) for g, v in weights.items()}),
            **_per_unit("grad_norm", {g: jnp.sqrt(v) for g, v in gradients.items()})}
