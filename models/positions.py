"""Positional encodings (`model.positional`) and RoPE's context-extension scalings (`model.rope_scaling`).

Absolute, added to the token embeddings (models/lm.py):

    learned      x_0 = E[t] + P[pos]                     P: a [max_len, D] table (no position beyond it)
    sinusoidal   x_0 = E[t] + PE[pos] / sqrt(D),  PE[pos, 2i] = sin(pos w_i),  PE[pos, 2i + 1] = cos(pos w_i),
                 w_i = 10000^(-2i / D)   (Vaswani et al. 2017, who scale E by sqrt(D) instead: our E has
                 entries of size 1 / sqrt(D), so this keeps their ratio)

Relative, inside attention (models/gqa.py):

    rope         q, k rotated by angle pos * f_i in pairs (x_i, x_{i + R/2}) of their first R = rope_fraction * Dh
                 columns (partial rotary, GPT-NeoX's layout), f_i = theta^(-2i / R); the rest pass through
    alibi        S_h[i, j] -= m_h (i - j),  m_h = 2^(-8 (h + 1) / H) for H a power of two, else Press et al.'s
                 interleave of the next powers' slopes (Press et al. 2022); no position embedding at all
    t5           S_h[i, j] += b_h[bucket(i - j)]: i - j exactly below B/2, then log-spaced up to `t5_max_distance`,
                 B = `t5_buckets` learned scalars per head (Raffel et al. 2020, causal buckets); one table per layer
                 (T5 shares layer 0's across layers)
    none         NoPE: causal masking alone carries position (Kazemnejad et al. 2023)

RoPE scalings (context extension to s = `rope_factor` times the original context L = `rope_original_max_len`),
each equal to `transformers`' `ROPE_INIT_FUNCTIONS` for the same settings (tests/models/test_positions.py):

    linear       f_i / s                                         position interpolation (Chen et al. 2023)
    ntk          f_i computed with theta' = theta s^(R / (R - 2))  NTK-aware (bloc97), static
    dynamic      theta' = theta (s n / L - (s - 1))^(R / (R - 2)) at sequence length n = max(n, L)  (dynamic NTK:
                 unchanged within L; while decoding, each key keeps the frequencies of the step that wrote it,
                 as in `transformers`)
    yarn         f_i' = f_i ((1 - r_i) + r_i / s), r_i = clip((i - lo) / (hi - lo), 0, 1) over the dimensions
                 lo..hi whose wavelengths fit beta_fast..beta_slow rotations in L (floor / ceil): the fast
                 dimensions (i <= lo, r_i = 0) keep f_i, the slow ones (i >= hi) are interpolated to f_i / s; cos and sin
                 times the attention factor 0.1 ln s + 1 (so scores scale by its square)  (Peng et al. 2023)
"""

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

POSITIONALS = ("rope", "learned", "sinusoidal", "alibi", "t5", "none")
ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn")
ABSOLUTE = ("learned", "sinusoidal")  # added to the embeddings
SCORE_BIASES = ("alibi", "t5")  # added to the attention scores


# Absolute ----------------------------------------------------------------------------------------------------

def sinusoidal(positions, width: int):
    """float32[..., T, width] table of Vaswani et al.'s encoding at integer positions [..., T] (interleaved sin, cos)."""
    inv_freq = jnp.asarray(10000.0 ** (-np.arange(0, width, 2) / width), jnp.float32)  # [ceil(width / 2)]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, -1)
    return table[..., :width]


# RoPE --------------------------------------------------------------------------------------------------------

def rotary_width(cfg, head_size: int) -> int:
    """R: how many leading columns of each head rotate (even)."""
    return 2 * (int(head_size * cfg.rope_fraction) // 2)


def original_length(cfg) -> int:
    return cfg.rope_original_max_len or cfg.max_len


def yarn_attention_factor(cfg) -> float:
    if cfg.rope_attention_factor:
        return cfg.rope_attention_factor
    return 0.1 * math.log(cfg.rope_factor) + 1.0 if cfg.rope_factor > 1 else 1.0


def _yarn_inv_freq(cfg, width: int) -> np.ndarray:
    base, s, length = cfg.rope_theta, cfg.rope_factor, original_length(cfg)
    extrapolation = base ** (-np.arange(0, width, 2) / width)

    def dimension(rotations):  # the dimension whose wavelength fits `rotations` turns in the original context
        return width * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dimension(cfg.rope_beta_fast)), 0), min(math.ceil(dimension(cfg.rope_beta_slow)), width - 1)
    ramp = np.clip((np.arange(width // 2) - low) / ((high - low) or 0.001), 0, 1)  # 0: extrapolate, 1: interpolate
    return extrapolation * (1 - ramp) + extrapolation / s * ramp


def inverse_frequencies(width: int, theta: float):
    """float32[width / 2]: f_i = theta^(-2i / width), plain RoPE's (computed in float64)."""
    return jnp.asarray(theta ** (-np.arange(0, width, 2) / width), jnp.float32)


def rope_frequencies(cfg, head_size: int, seq_len=None):
    """(inverse frequencies float32[R / 2], cos/sin factor) of the configured RoPE and scaling. `seq_len` (the
    sequence length so far; may be traced) matters only to the dynamic scaling."""
    width, theta, s = rotary_width(cfg, head_size), cfg.rope_theta, cfg.rope_factor
    exponents = np.arange(0, width, 2) / width
    if cfg.rope_scaling == "linear":
        return inverse_frequencies(width, theta) / s, 1.0
    if cfg.rope_scaling == "ntk":
        return inverse_frequencies(width, theta * s ** (width / (width - 2))), 1.0
    if cfg.rope_scaling == "dynamic":
        length = original_length(cfg)
        n = jnp.maximum(jnp.asarray(length if seq_len is None else seq_len, jnp.float32), length)
        scaled_theta = theta * (s * n / length - (s - 1)) ** (width / (width - 2))
        return scaled_theta ** -jnp.asarray(exponents, jnp.float32), 1.0
    if cfg.rope_scaling == "yarn":
        return jnp.asarray(_yarn_inv_freq(cfg, width), jnp.float32), yarn_attention_factor(cfg)
    return inverse_frequencies(width, theta), 1.0


def rotate(x, positions, inv_freq, factor: float = 1.0):
    """x [B, T, H, Dh] at integer positions [T] (or [B, T]: each row its own, as Mixture-of-Depths' gathered
    tokens): its first R = 2 len(inv_freq) columns rotated in pairs (x_i, x_{i + R/2}) by angle pos * inv_freq_i
    (cos and sin times `factor`); the others unchanged."""
    width = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(B,) T, R/2]
    angles = angles[:, :, None, :] if angles.ndim == 3 else angles[None, :, None, :]  # [B or 1, T, 1, R/2]
    cos, sin = factor * jnp.cos(angles), factor * jnp.sin(angles)
    x1, x2 = jnp.split(x[..., :width].astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([rotated, x[..., width:]], axis=-1) if width < x.shape[-1] else rotated


def apply_rope(cfg, x, positions, seq_len=None):
    """x [B, T, H, Dh] rotated as `cfg` says (fraction, theta, scaling)."""
    inv_freq, factor = rope_frequencies(cfg, x.shape[-1], seq_len)
    return rotate(x, positions, inv_freq, factor)


# Score biases ------------------------------------------------------------------------------------------------

def alibi_slopes(heads: int) -> np.ndarray:
    """Press et al.'s per-head slopes: 2^(-8/H), its powers, for H a power of two; otherwise those of the power
    of two below H, then every other slope of the power above."""
    def geometric(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    below = 2 ** int(math.floor(math.log2(heads)))
    slopes = geometric(below) + geometric(2 * below)[0::2][:heads - below]
    return np.asarray(slopes, np.float32)


def alibi_bias(heads: int, q_positions, k_positions):
    """float32[H, Tq, Tk]: -m_h (i - j) (future keys, masked anyway, get a positive bias)."""
    distance = (q_positions[:, None] - k_positions[None, :]).astype(jnp.float32)
    return -jnp.asarray(alibi_slopes(heads))[:, None, None] * distance


def t5_bucket(distance, num_buckets: int, max_distance: int):
    """Causal T5 bucket of distance = i - j >= 0 (negative distances clip to 0): exact below num_buckets / 2,
    then logarithmic up to max_distance, the last bucket beyond."""
    n = jnp.maximum(distance, 0)
    exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    large = jnp.minimum(exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32), num_buckets - 1)
    return jnp.where(n < exact, n, large)


class T5Bias(nn.Module):
    """b_h[bucket(i - j)]: a learned [buckets, H] table (zero-initialised: attention starts position-blind)."""

    num_buckets: int
    max_distance: int
    heads: int

    @nn.compact
    def __call__(self, q_positions, k_positions):  # -> float32[H, Tq, Tk]
        table = self.param("table", nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads")),
                           (self.num_buckets, self.heads))
        buckets = t5_bucket(q_positions[:, None] - k_positions[None, :], self.num_buckets, self.max_distance)
        return jnp.transpose(table[buckets], (2, 0, 1))


def validate(m) -> list[str]:
    """Cross-field problems of the position keys."""
    p = []
    head_size = m.head_dim or m.d_model // max(m.num_heads, 1)
    rotated = head_size * m.rope_fraction
    if m.positional == "rope" and (rotated != int(rotated) or int(rotated) % 2 or rotated < 2):
        p.append(f"model.rope_fraction={m.rope_fraction} of a {head_size}-wide head rotates {rotated:g} columns; "
                 "RoPE needs an even number >= 2")
    elif m.positional == "rope" and m.rope_scaling in ("ntk", "dynamic") and rotated <= 2:
        p.append(f"model.rope_scaling={m.rope_scaling!r} needs at least 4 rotated columns per head")
    if m.rope_scaling != "none" and m.positional != "rope":
        p.append(f"model.rope_scaling={m.rope_scaling!r} scales RoPE; model.positional={m.positional!r} must be 'rope'")
    if m.positional == "sinusoidal" and m.d_model % 2:
        p.append(f"model.positional='sinusoidal' needs an even model.d_model, got {m.d_model}")
    if m.positional == "t5" and m.t5_max_distance <= m.t5_buckets // 2:
        p.append(f"model.t5_max_distance={m.t5_max_distance} must exceed model.t5_buckets // 2 = {m.t5_buckets // 2} "
                 "(the exact buckets end there and the logarithmic ones run up to it)")
    if m.positional == "t5" and m.attention_impl != "xla":
        p.append(f"model.positional={m.positional!r} needs model.attention_impl='xla' (the flash kernels take no "
                 "learned score bias; ALiBi's they compute)")
    return p
