"""A model's kernels compressed one layer at a time by the layer functions of this package.

Calibration: the model runs on calibration rows with its "calibration" collection mutable, and every kernel whose
module records its input (models/layers.record_input: attention's projections, GQA's or MLA's, and the MLP's) adds
its input's second moment X^T X, row count and per-feature sum and largest |x|, per layer of a scanned stack. Each
kernel [L, in..., out...]
(`in` the leading axes whose sizes multiply to the recorded width) becomes [in, out] per layer and is replaced by

    rtn        round to nearest (bits, group_size, symmetric)
    gptq       GPTQ with H = X^T X / n (bits, group_size, act_order, damp, block_size, symmetric)
    awq        AWQ's scales searched with H and mean |x|, then rtn (bits, group_size, symmetric)
    awq_gptq   the same scales, then GPTQ on the scaled problem (and act_order, damp, block_size)
    fp8        e4m3 per channel or group (group_size)
    smoothquant  SmoothQuant's scales (alpha) folded into each block's norms and the kernels they feed, then every
               matmul W8A8 through qwix (smoothquant.py); the families models/quantization.py covers
    magnitude  Wanda with every input's norm 1: the smallest |w| of each output (sparsity or n_m)
    wanda      |w| x sqrt(mean x_i^2) (sparsity or n_m)
    sparsegpt  SparseGPT with H (sparsity or n_m, damp, block_size; with bits, its joint mode: the kept weights
               also rounded on their channel's grid, symmetric or not)

Embeddings, the unembedding, norms, MoE routers and Mamba-2's depthwise convolution stay as they are (GPTQ's and
SparseGPT's papers leave the first three too; routers are kept in full precision by MoE quantization work).

The statistics come from one pass through the uncompressed model, or (`sequential`) block by block as GPTQ's and
SparseGPT's code runs: block b's from a pass through the model whose blocks before b are already compressed, so that
each block corrects the error its inputs carry (one pass per block; within a block every kernel sees the
uncompressed block, the reference's default too). Covered: GQA and MLA attention (MLA's down- and up-projections:
keys and values are per-head products of the normalised latent), MLPs, MoE experts (each expert calibrated on the
tokens routed to it) and Mamba-2's in and out projections; a model with a kernel in its layers that records no input
(linear attention, Mamba-1) is refused, naming the kernels, rather than half compressed.
"""

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from data.config_fields import ConfigError
from experiments.compression import fp8 as fp8s, grid, hessian as hessians, smoothquant, storage
from experiments.compression.awq import awq
from experiments.compression.fp8 import fp8
from experiments.compression.gptq import gptq
from experiments.compression.sparsegpt import check_sparsity, sparsegpt
from experiments.compression.wanda import wanda
from models import layers

QUANTIZERS = ("rtn", "gptq", "awq", "awq_gptq", "fp8")
SMOOTHERS = ("smoothquant",)  # W8A8: the run is written with model.quantization="w8a8" (models/quantization.py)
PRUNERS = ("magnitude", "wanda", "sparsegpt")
METHODS = QUANTIZERS + SMOOTHERS + PRUNERS
DENSE_STACK = "dense_layers"  # the plain blocks some families scan before their stack (models/lm.py)


def compress_layer(method: str, w, statistics: dict, options: dict):
    """One layer's kernel w [in, out] by `method` -> (w_hat [in, out], its stored form (storage.py), None for the
    pruners); statistics of its calibration inputs x: "hessian" X^T X / n [in, in], "mean_abs" mean |x| [in]."""
    if method in QUANTIZERS:
        w_hat, grids = _quantize(method, w, statistics, options)
        return w_hat, storage.pack(w_hat, grids, None if method == "fp8" else options["bits"])
    if method == "sparsegpt" and options.get("bits") is not None:  # joint: pruned and rounded
        w_hat, grids = sparsegpt(w, statistics["hessian"], sparsity=options["sparsity"], n_m=options["n_m"],
                                 damp=options["damp"], block_size=options["block_size"], bits=options["bits"],
                                 symmetric=options["symmetric"], with_grid=True)
        return w_hat, storage.pack(w_hat, grids, options["bits"])
    return _prune(method, w, statistics, options), None


def _quantize(method, w, statistics, options):
    hessian = statistics["hessian"]
    integer_grid = {k: options[k] for k in ("bits", "group_size", "symmetric")}
    updates = {k: options[k] for k in ("damp", "block_size") if k in options}
    if method == "rtn":
        return grid.rtn(w, **integer_grid, with_grid=True)
    if method == "fp8":
        return fp8(w, group_size=options["group_size"], with_grid=True)
    if method == "gptq":
        return gptq(w, hessian, act_order=options["act_order"], **integer_grid, **updates, with_grid=True)
    return awq(w, hessian, statistics["mean_abs"], then="gptq" if method == "awq_gptq" else "rtn",
               act_order=options["act_order"], **integer_grid, **updates, with_grid=True)


def _prune(method, w, statistics, options):
    hessian = statistics["hessian"]
    updates = {k: options[k] for k in ("damp", "block_size") if k in options}
    pattern = {"sparsity": options["sparsity"], "n_m": options["n_m"]}
    if method == "sparsegpt":
        return sparsegpt(w, hessian, **updates, **pattern)
    norms = np.ones(w.shape[0]) if method == "magnitude" else np.diagonal(hessian)
    return wanda(w, norms, **pattern)


def check(method: str, options: dict, kernel_shapes: dict) -> None:
    """ConfigError, in one line, for a method or an option that cannot apply to these kernels {name: (in, out)}."""
    if method not in METHODS:
        raise ConfigError(f"--method={method!r}: one of {', '.join(METHODS)}")
    if method in SMOOTHERS:
        return
    for name, shape in kernel_shapes.items():
        try:
            if method == "fp8":
                fp8s.check(shape, options["group_size"])
            elif method in QUANTIZERS:
                grid.check(shape, options["bits"], options["group_size"])
            else:
                check_sparsity(shape, options["sparsity"], options["n_m"],
                                                options["block_size"] if method == "sparsegpt" else None)
                if options.get("bits") is not None:
                    grid.check(shape, options["bits"], -1)
            if method in ("gptq", "awq_gptq", "sparsegpt"):
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


def uncovered_kernels(params: dict, covered: set, stacks: tuple) -> list[str]:
    """Kernels (arrays of 3+ axes: a layer axis and a matrix; not norms or depthwise convolutions) in the stacks
    that no calibration reaches; `stacks` are the stacks' names in the parameter tree."""
    missing = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        linear = not any(part in key for key in keys[-2:] for part in ("norm", "conv", "router"))
        if keys[0] in stacks and np.ndim(leaf) >= 3 and linear and keys not in covered:
            missing.append("/".join(keys))
    return missing


def calibration_pass(model):
    """variables, tokens [B, T] -> the calibration tree of one batch, compiled (the weights an argument, not constants
    of the program: one compilation serves every pass of a sequential calibration)."""
    return jax.jit(lambda variables, tokens: model.apply(variables, tokens,
                                                         mutable=[layers.CALIBRATION])[1][layers.CALIBRATION])


def second_moments(model, variables, rows, batch_size: int = 32, one=None) -> dict:
    """The calibration tree over `rows` int32 [N, T] (batches of `batch_size`, combined by `_combine`); `one` the
    compiled `calibration_pass(model)` to reuse."""
    one = one or calibration_pass(model)
    total = None
    for start in range(0, len(rows), batch_size):
        found = one(variables, jnp.asarray(rows[start:start + batch_size]))
        total = found if total is None else jax.tree_util.tree_map_with_path(_combine, total, found)
    if total is None:
        raise ConfigError("no calibration rows")
    return jax.tree.map(np.asarray, total)


def _combine(path, total, found):
    """Two batches' statistics of one kernel: largest |x| the larger, the others (sums) added."""
    return jnp.maximum(total, found) if path[-1].key.endswith("_abs_max") else total + found


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


def compress_params(params: dict, calibration: dict, method: str, options: dict, block=None
                    ) -> tuple[dict, list[dict], dict]:
    """(params with every recorded kernel compressed, per kernel and layer (and expert) {"kernel", "layer",
    "expert" (MoE experts only), "relative_error", "zeros"}, the quantized kernels' stored forms {parameter path:
    {index: stored form}} (storage.py; empty for the pruners)); relative_error = ||X (W - W_hat)||^2 / ||X W||^2 on
    the calibration inputs. A kernel's statistics carry its stack's leading axes: [L] per layer, [L, E] per expert,
    the index. block = (stack, layer): that block's kernels alone, the others as they are (a sequential calibration)."""
    report, stored = [], {}
    for name, (param_path, scope, kernel_name) in sorted(kernels(params, calibration).items()):
        if block is not None and param_path[0] != block[0]:
            continue
        statistic = lambda name: _get(calibration, scope + (f"{kernel_name}_{name}",))  # noqa: E731
        gram_stack, rows, abs_sums = statistic("gram"), statistic("rows"), statistic("abs_sum")
        stacked = np.asarray(_get(params, param_path))
        new = stacked.copy()
        for index in np.ndindex(*rows.shape):
            if block is not None and index[0] != block[1]:
                continue
            count = max(float(rows[index]), 1.0)
            hessian = gram_stack[index] / count
            shape = matrix_shape(stacked.shape[len(index):], hessian.shape[0])
            w = stacked[index].reshape(shape).astype(np.float32)
            statistics = {"hessian": hessian, "mean_abs": abs_sums[index] / count}
            w_hat, form = compress_layer(method, w, statistics, options)
            w_hat = np.asarray(w_hat)
            new[index] = w_hat.reshape(stacked.shape[len(index):]).astype(stacked.dtype)
            if form is not None:
                stored.setdefault(param_path, {})[index] = form
            delta = w - w_hat
            report.append({"kernel": name, "layer": index[0], **({"expert": index[1]} if len(index) > 1 else {}),
                           "relative_error": float(np.sum(delta * (hessian @ delta)) / max(np.sum(w * (hessian @ w)),
                                                                                         1e-30)),
                           "zeros": float(np.mean(w_hat == 0))})
        params = _set(params, param_path, new)
    return params, report, stored


def packed_params(params: dict, stored: dict) -> dict:
    """params with each quantized kernel replaced by its stored form, the stack's leading axes first (storage.py)."""
    for path, per_index in stored.items():
        lead = np.shape(_get(params, path))[:len(next(iter(per_index)))]
        params = _set(params, path, storage.stack(per_index, lead))
    return params


def check_smoothable(model) -> None:
    """ConfigError, in one line, for a model whose norms SmoothQuant cannot fold its scales into, or whose matmuls
    W8A8 does not reach."""
    import ml_collections

    import models

    cfg = model.cfg
    quantized = ml_collections.ConfigDict(dataclasses.asdict(dataclasses.replace(cfg, quantization="w8a8")))
    problems = models.MODELS[cfg.name][2](quantized)
    if cfg.norm not in ("layernorm", "rmsnorm"):
        problems.append(f"model.norm={cfg.norm!r}: SmoothQuant folds its scales into a layernorm or rmsnorm")
    if problems:
        raise ConfigError(f"--method=smoothquant runs W8A8 after folding scales into the norms: {problems[0]}")


def compress_variables(model, variables: dict, rows, method: str, options: dict, sequential: bool = False
                       ) -> tuple[dict, dict, dict | None]:
    """(variables with compressed params, the report, the params with the quantized kernels' stored forms
    (storage.py; None for pruners and SmoothQuant)): calibration on `rows`, then every kernel (module doc); in one
    pass through the given model, or `sequential`ly, block after block, each block's statistics from a pass through
    the model whose earlier blocks are already compressed."""
    params = variables["params"]
    if method in SMOOTHERS:
        check_smoothable(model)
    abstract = jax.eval_shape(  # the calibration tree's shapes, nothing compiled: refusals come first
        lambda tokens: model.apply(variables, tokens, mutable=[layers.CALIBRATION])[1].get(layers.CALIBRATION, {}),
        jnp.asarray(rows[:1]))
    found = kernels(params, abstract)
    missing = uncovered_kernels(params, {path for path, _, _ in found.values()}, (model.stack_name, DENSE_STACK))
    if not found or missing:
        raise ConfigError(f"this model's layers have kernels whose inputs no calibration records: "
                          f"{', '.join(missing[:6]) or 'all of them'}; compression covers GQA and MLA attention, MLPs, "
                          "MoE experts and Mamba-2's projections")
    grams = {name: _get(abstract, scope + (f"{kernel}_gram",)) for name, (_, scope, kernel) in found.items()}
    shapes = {name: matrix_shape(np.shape(_get(params, path))[grams[name].ndim - 2:], grams[name].shape[-1])
              for name, (path, _, _) in found.items()}  # past the stack's axes: [L] per layer, [L, E] per expert
    check(method, options, shapes)
    if method in SMOOTHERS:
        return _smooth(model, variables, rows, options, sequential)
    started, one = time.time(), calibration_pass(model)
    per_kernel, stored = [], {}
    for block in blocks(params, model.stack_name) if sequential else [None]:
        calibration = second_moments(model, {**variables, "params": params}, rows, one=one)
        params, done, forms = compress_params(params, calibration, method, options, block)
        per_kernel += done
        for path, per_index in forms.items():
            stored.setdefault(path, {}).update(per_index)
    report = {
        "method": method, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "calibration": "sequential" if sequential else "one pass", "calibration_rows": int(len(rows)),
        "calibration_tokens": int(np.size(rows)), "seconds": time.time() - started, "kernels": per_kernel}
    return {**variables, "params": params}, report, packed_params(params, stored) if stored else None


def blocks(params: dict, stack_name: str) -> list[tuple[str, int]]:
    """(stack, layer) of every block in the order the model runs them: the plain blocks some families scan first,
    then the stack's (a hybrid's periods)."""
    found = []
    for stack in (DENSE_STACK, stack_name):
        if stack in params:
            found += [(stack, layer) for layer in range(jax.tree.leaves(params[stack])[0].shape[0])]
    return found


def _smooth(model, variables, rows, options, sequential):
    if sequential:
        raise ConfigError("--sequential does not apply to --method=smoothquant: smoothing leaves the float model as it "
                          "was, so every block's statistics are the same either way")
    started = time.time()
    new, per_group = smoothquant.smooth_params(variables["params"], second_moments(model, variables, rows),
                                               model.stack_name, options["alpha"])
    return {**variables, "params": new}, {
        "method": "smoothquant", "options": {"alpha": options["alpha"]}, "calibration": "one pass",
        "calibration_rows": int(len(rows)), "calibration_tokens": int(np.size(rows)), "seconds": time.time() - started,
        "stored_as": "float32, smoothed; every block matmul W8A8 through qwix (model.quantization='w8a8')",
        "smoothing": per_group, "kernels": []}, None
