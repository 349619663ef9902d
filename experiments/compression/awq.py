"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

Scaling input i's weights up by s_i and the input down by the same factor changes nothing before rounding,
x W = (x / s) (diag(s) W), but shrinks the relative rounding error of the inputs that carry large activations.
With a_i = mean over calibration tokens of |x_i|, the scales are searched over alpha in {0, 1/n, ..., (n-1)/n}:

    s_i(alpha) = max(a_i^alpha, 1e-4) / sqrt(max_j max(a_j^alpha, 1e-4) x min_j max(a_j^alpha, 1e-4))
    W_hat(alpha) = diag(1/s) rtn(diag(s) W)
    alpha* = argmin_alpha  tr((W - W_hat)^T H (W - W_hat))      (= ||X W - X W_hat||^2 / n with H = X^T X / n)

and the result is diag(1/s*) Q(diag(s*) W), Q round to nearest (grid.py) or GPTQ (gptq.py) on the scaled problem,
whose inputs are x / s*: H' = diag(1/s*) H diag(1/s*). diag(1/s*) is folded into the stored weights, so a compressed
model runs with no extra operation.

Where this differs from the reference code: the error searched is the layer's own output (the reference measures a
block's output, e.g. attention's after q, k and v are all quantized), so each kernel gets its own scales where the
reference shares one set across the kernels that read one normalised input and folds 1/s into that norm; the
reference's second search, a clipping of each group's range, is not done.
"""

import functools

import jax
import jax.numpy as jnp

from experiments.compression import grid
from experiments.compression.gptq import gptq

SCALE_FLOOR = 1e-4


def scales(input_mean_abs, alpha):
    """s(alpha) [in] of the module doc."""
    s = jnp.maximum(jnp.asarray(input_mean_abs, jnp.float32) ** alpha, SCALE_FLOOR)
    return s / jnp.sqrt(s.max() * s.min())


def search(w, hessian, input_mean_abs, *, bits: int, group_size: int = -1, symmetric: bool = False,
           grid_points: int = 20):
    """(alpha*, s(alpha*) [in], the error tr(D^T H D) at every alpha [grid_points]) of the module doc."""
    grid.check(w.shape, bits, group_size)
    if jnp.shape(input_mean_abs) != (w.shape[0],):
        raise ValueError(f"input_mean_abs of shape {tuple(jnp.shape(input_mean_abs))}: one per input, ({w.shape[0]},)")
    if grid_points < 1:
        raise ValueError(f"grid_points={grid_points}: at least 1")
    alphas = jnp.arange(grid_points, dtype=jnp.float32) / grid_points
    errors = _errors(jnp.asarray(w, jnp.float32), jnp.asarray(hessian, jnp.float32),
                     jnp.asarray(input_mean_abs, jnp.float32), alphas, bits=bits, group_size=group_size,
                     symmetric=symmetric)
    best = jnp.argmin(errors)  # the first of equal errors, as the reference's strict `<` keeps it
    return float(alphas[best]), scales(input_mean_abs, alphas[best]), errors


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric"))
def _errors(w, hessian, input_mean_abs, alphas, *, bits, group_size, symmetric):
    def error(alpha):
        s = scales(input_mean_abs, alpha)[:, None]
        delta = w - grid.rtn(w * s, bits=bits, group_size=group_size, symmetric=symmetric) / s
        return jnp.sum(delta * (hessian @ delta))

    return jax.vmap(error)(alphas)


def awq(w, hessian, input_mean_abs, *, bits: int, group_size: int = -1, symmetric: bool = False,
        grid_points: int = 20, then: str = "rtn", act_order: bool = False, damp: float = 0.01,
        block_size: int = 128, with_grid: bool = False):
    """AWQ-quantized weights, dequantized with the scales folded in: float32 [in, out] (module doc); `then` is the
    quantizer of the scaled weights, "rtn" or "gptq" (with act_order, damp, block_size). with_grid: and that
    quantizer's grids with "input_scale": s* [in] (w_hat = the grid's values / s*)."""
    if then not in ("rtn", "gptq"):
        raise ValueError(f"then={then!r}: the quantizer after the scales, 'rtn' or 'gptq'")
    _, s, _ = search(w, hessian, input_mean_abs, bits=bits, group_size=group_size, symmetric=symmetric,
                     grid_points=grid_points)
    w = jnp.asarray(w, jnp.float32) * s[:, None]
    if then == "rtn":
        w_hat, grids = grid.rtn(w, bits=bits, group_size=group_size, symmetric=symmetric, with_grid=True)
    else:
        scaled_hessian = jnp.asarray(hessian, jnp.float32) / jnp.outer(s, s)
        w_hat, grids = gptq(w, scaled_hessian, bits=bits, group_size=group_size, act_order=act_order, damp=damp,
                            block_size=block_size, symmetric=symmetric, with_grid=True)
    w_hat = w_hat / s[:, None]
    return (w_hat, {**grids, "input_scale": s}) if with_grid else w_hat
