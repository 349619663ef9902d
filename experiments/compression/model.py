"""A model's kernels compressed one layer at a time by the layer functions of this package.

Calibration: the model runs on calibration rows with its "calibration" collection mutable, and every kernel whose
module records its input (models/layers.record_input: attention's query, key, value and output projections and the
MLP's) adds its input's second moment X^T X and row count, per layer of a scanned stack. Each kernel [L, in..., out...]
(`in` the leading axes whose sizes multiply to the recorded width) becomes [in, out] per layer and is replaced by

    rtn        round to nearest (bits, group_size, symmetric)
    gptq       GPTQ with H = X^T X / n (bits, group_size, act_order, damp, block_size, symmetric)
    magnitude  Wanda with every input's norm 1: the smallest |w| of each output (sparsity or n_m)
    wanda      |w| x sqrt(mean x_i^2) (sparsity or n_m)
    sparsegpt  SparseGPT with H (sparsity or n_m, damp, block_size)

Embeddings, the unembedding and norms stay as they are (GPTQ's and SparseGPT's papers leave them too). The
second moments come from the uncompressed model in one pass, not layer after layer from the compressed one as the
papers' code runs it. A model with a kernel in its layers that records no input (MoE experts, MLA, Mamba) is
refused, naming the kernels, rather than half compressed.
"""

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from data.config_fields import ConfigError
from experiments.compression import grid, hessian as hessians
from experiments.compression.gptq import gptq
from experiments.compression.sparsegpt import check_sparsity, sparsegpt
from experiments.compression.wanda import wanda
from models import layers

QUANTIZERS = ("rtn", "gptq")
PRUNERS = ("magnitude", "wanda", "sparsegpt")
METHODS = QUANTIZERS + PRUNERS
STACKS = ("layers", "dense_layers")  # the scanned stacks of LM.hidden (models/lm.py)


def compress_layer(method: str, w, hessian, options: dict):
    """One layer's kernel w [in, out] by `method`; hessian = X^T X / n [in, in]."""
    if method == "rtn":
        return grid.rtn(w, bits=options["bits"], group_size=options["group_size"], symmetric=options["symmetric"])
    if method == "gptq":
        return gptq(w, hessian, bits=options["bits"], group_size=options["group_size"], act_order=options["act_order"],
                    damp=options["damp"], block_size=options["block_size"], symmetric=options["symmetric"])
    pattern = {"sparsity": options["sparsity"], "n_m": options["n_m"]}
    if method == "sparsegpt":
        return sparsegpt(w, hessian, damp=options["damp"], block_size=options["block_size"], **pattern)
    norms = np.ones(w.shape[0]) if method == "magnitude" else np.diagonal(hessian)
    return wanda(w, norms, **pattern)


def check(method: str, options: dict, kernel_shapes: dict) -> None:
    """ConfigError, in one line, for a method or an option that cannot apply to these kernels {name: (in, out)}."""
    if method not in METHODS:
        raise ConfigError(f"--method={method!r}: one of {', '.join(METHODS)}")
    for name, shape in kernel_shapes.items():
        try:
            if method in QUANTIZERS:
                grid.check(shape, options["bits"], options["group_size"])
            else:
                check_sparsity(shape, options["sparsity"], options["n_m"],
                                                options["block_size"] if method == "sparsegpt" else None)
            if method in ("gptq", "sparsegpt"):
                hessians.check(shape, (shape[0], shape[0]), options["block_size"], options["damp"])
        except ValueError as error:
            raise ConfigError(f"{error} (kernel {name})") from None


def kernels(params: dict, calibration: dict) -> dict:
    """{name: (parameter path, calibration scope path, kernel name)} of every recorded kernel: NAME_gram at a
    calibration scope is parameter NAME (or NAME/kernel) at the same scope."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(calibration)[0]:
        keys = [k.key for k in path]
        if not keys[-1].endswith("_gram"):
            continue
        name, scope = keys[-1][:-len("_gram")], keys[:-1]
        node = params
        for key in scope + [name]:
            node = node[key]
        found["/".join(scope + [name])] = (tuple(scope + [name] + (["kernel"] if isinstance(node, dict) else [])),
                                           tuple(scope), name)
    return found


def uncovered_kernels(params: dict, covered: set) -> list[str]:
    """Kernels (arrays of 3+ axes: a layer axis and a matrix) in the stacks that no calibration reaches."""
    missing = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        if keys[0] in STACKS and np.ndim(leaf) >= 3 and "norm" not in keys[-2] and keys not in covered:
            missing.append("/".join(keys))
    return missing


def second_moments(model, variables, rows, batch_size: int = 32) -> dict:
    """The calibration tree summed over `rows` int32 [N, T] (batches of `batch_size`)."""
    @jax.jit
    def one(variables, tokens):  # the weights an argument, not constants of the program
        return model.apply(variables, tokens, mutable=[layers.CALIBRATION])[1][layers.CALIBRATION]

    total = None
    for start in range(0, len(rows), batch_size):
        found = one(variables, jnp.asarray(rows[start:start + batch_size]))
        total = found if total is None else jax.tree.map(jnp.add, total, found)
    if total is None:
        raise ConfigError("no calibration rows")
    return jax.tree.map(np.asarray, total)


def _get(tree, path):
    return functools.reduce(lambda node, key: node[key], path, tree)


def _set(tree, path, value):
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def matrix_shape(kernel_shape, inputs: int) -> tuple[int, int]:
    """(in, out) of one layer's kernel [in..., out...] whose leading axes multiply to `inputs`."""
    for k in range(1, len(kernel_shape)):
        if math.prod(kernel_shape[:k]) == inputs:
            return inputs, math.prod(kernel_shape[k:])
    raise ValueError(f"a kernel of shape {kernel_shape} has no leading axes of {inputs} inputs")


def compress_params(params: dict, calibration: dict, method: str, options: dict) -> tuple[dict, list[dict]]:
    """(params with every recorded kernel compressed, per kernel and layer {"kernel", "layer", "relative_error",
    "zeros"}); relative_error = ||X (W - W_hat)||^2 / ||X W||^2 on the calibration inputs."""
    report = []
    for name, (param_path, scope, kernel_name) in sorted(kernels(params, calibration).items()):
        gram_stack = _get(calibration, scope + (f"{kernel_name}_gram",))
        rows = _get(calibration, scope + (f"{kernel_name}_rows",))
        stacked = np.asarray(_get(params, param_path))
        new = np.empty_like(stacked)
        for layer in range(stacked.shape[0]):
            hessian = gram_stack[layer] / max(float(rows[layer]), 1.0)
            shape = matrix_shape(stacked.shape[1:], hessian.shape[0])
            w = stacked[layer].reshape(shape).astype(np.float32)
            w_hat = np.asarray(compress_layer(method, w, hessian, options))
            new[layer] = w_hat.reshape(stacked.shape[1:]).astype(stacked.dtype)
            delta = w - w_hat
            report.append({"kernel": name, "layer": layer,
                           "relative_error": float(np.sum(delta * (hessian @ delta)) / max(np.sum(w * (hessian @ w)),
                                                                                         1e-30)),
                           "zeros": float(np.mean(w_hat == 0))})
        params = _set(params, param_path, new)
    return params, report


def compress_variables(model, variables: dict, rows, method: str, options: dict) -> tuple[dict, dict]:
    """(variables with compressed params, the report): calibration on `rows`, then every kernel (module doc)."""
    params = variables["params"]
    abstract = jax.eval_shape(  # the calibration tree's shapes, nothing compiled: refusals come first
        lambda tokens: model.apply(variables, tokens, mutable=[layers.CALIBRATION])[1].get(layers.CALIBRATION, {}),
        jnp.asarray(rows[:1]))
    found = kernels(params, abstract)
    missing = uncovered_kernels(params, {path for path, _, _ in found.values()})
    if not found or missing:
        raise ConfigError(f"this model's layers have kernels whose inputs no calibration records: "
                          f"{', '.join(missing[:6]) or 'all of them'}; compression covers the transformer family's "
                          "GQA attention and MLP kernels")
    shapes = {name: matrix_shape(np.shape(_get(params, path))[1:], _get(abstract, scope + (f"{kernel}_gram",)).shape[-1])
              for name, (path, scope, kernel) in found.items()}
    check(method, options, shapes)
    started = time.time()
    calibration = second_moments(model, variables, rows)
    calibrated = time.time()
    new, per_kernel = compress_params(params, calibration, method, options)
    return {**variables, "params": new}, {
        "method": method, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "calibration_rows": int(len(rows)), "calibration_tokens": int(np.size(rows)),
        "calibration_seconds": calibrated - started, "compression_seconds": time.time() - calibrated,
        "stored_as": "float32, dequantized (no packed integer format yet)", "kernels": per_kernel}
