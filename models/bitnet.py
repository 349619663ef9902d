"""BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits"):
every matmul of the blocks (attention projections, MLP) with ternary weights and 8-bit activations; the
embeddings and the output head stay in float. `model.bitnet = True`.

    s = mean |W| (+ eps)                       W_q = s * clip(round(W / s), -1, 1)      one scale per matrix
    x~ = x / sqrt(mean_j x_j^2 + 1e-6)         the recipe's RMSNorm inside BitLinear (no gain), per token
    m = max_j |x~_j| per token (+ eps)         x_q = clip(round(127 x~ / m), -128, 127) * m / 127
    y = x_q W_q

The RMSNorm is the training recipe's ("The Era of 1-bit LLMs: Training Tips, Code and FAQ": BitLinear normalises
its input, with a fresh unit-gain LlamaRMSNorm, before the 8-bit quantiser), so every quantised product, the
attention output projection and the MLP's `wo` included, quantises a unit-RMS input. Training keeps float master
weights: both quantisers pass gradients straight through (y's gradients are those of x~ W at x_q, W_q, then
through the norm: q(x) = stop_gradient(q(x)) + x - stop_gradient(x), whose value is q(x) exactly).
At inference a matrix is its ternary codes (log2(3) = 1.58 bits each, 2 bits packed) and one float scale.
"""

import jax
import jax.numpy as jnp

EPS = 1e-5
NORM_EPS = 1e-6  # the RMSNorm's (LlamaRMSNorm's default)


def _straight_through(x, quantised):
    """The value of `quantised` exactly (x - x is 0 in floating point), the gradient of x."""
    return jax.lax.stop_gradient(quantised) + (x - jax.lax.stop_gradient(x))


def ternary(w):
    """W -> s * clip(round(W / s), -1, 1), s = mean |W|: three values per matrix; straight-through gradients."""
    w32 = w.astype(jnp.float32)
    scale = jnp.mean(jnp.abs(w32)) + EPS
    return _straight_through(w32, jnp.clip(jnp.round(w32 / scale), -1, 1) * scale).astype(w.dtype)


def absmax_int8(x):
    """Per-token (last axis) absmax quantisation to the 8-bit grid; straight-through gradients."""
    x32 = x.astype(jnp.float32)
    scale = 127.0 / (jnp.max(jnp.abs(x32), axis=-1, keepdims=True) + EPS)
    return _straight_through(x32, jnp.clip(jnp.round(x32 * scale), -128, 127) / scale).astype(x.dtype)


def rms_normalised(x):
    """x / sqrt(mean(x^2) + 1e-6) over the last axis, in float32: BitLinear's input norm (no gain)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + NORM_EPS)).astype(x.dtype)


def matmul(x, w, enabled: bool):
    """x [N, K] @ w [K, M]: BitLinear's normalised, quantised product when `enabled`, else the plain one (a
    dot_general, which models/quantization.py's qwix rules round when `model.quantization` is set)."""
    if enabled:
        return absmax_int8(rms_normalised(x)) @ ternary(w)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`jax.lax.dot_general` with BitLinear's norm and quantisers, for `nn.Dense(dot_general=...)` (lhs:
    activations [..., K], rhs: the kernel [K, M])."""
    return jax.lax.dot_general(absmax_int8(rms_normalised(lhs)), ternary(rhs), dimension_numbers,
                               precision=precision, preferred_element_type=preferred_element_type)


def packed_bytes(num_weights: int) -> int:
    """Inference storage of a ternary matrix: 2 bits per weight, packed."""
    return -(-num_weights * 2 // 8)
