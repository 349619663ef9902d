"""Scaled dot-product attention: the plain-JAX reference and the masked core it is built on.

For one query head h (kv head g = h // (heads_q // heads_kv)):

    S = sm_scale * Q_h K_g^T                 [Lq, Lk]
    P = softmax(S + log(mask)) over keys     (mask: which keys a query may see)
    O_h = P V_g                              [Lq, D]

Causal masking with Lq != Lk is bottom-right aligned: query i sees keys j <= i + Lk - Lq.
A query that sees no key at all outputs zeros. Tensors are BLHD (CONTRACTS §2).
"""

import jax
import jax.numpy as jnp


def causal_mask(len_q: int, len_k: int, *, q_offset=None) -> jax.Array:
    """bool[len_q, len_k]: query i sees key j iff j <= i + q_offset (default len_k - len_q)."""
    if q_offset is None:
        q_offset = len_k - len_q
    return jnp.arange(len_k)[None, :] <= jnp.arange(len_q)[:, None] + q_offset


def attend(q, k, v, mask, *, sm_scale=None):
    """Softmax attention of q [B, Lq, Hq, D] over k, v [B, Lk, Hkv, D] with bool mask [Lq, Lk] or None."""
    batch, len_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    # Heads-major [B, Hkv, G, L, D]: batch dimensions lead, which XLA:CPU's dot needs to be fast.
    q = q.reshape(batch, len_q, heads_kv, heads_q // heads_kv, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, D]
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32) * sm_scale
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # rows that see no key
    probs = jnp.exp(scores - row_max)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, len_q, heads_q, head_dim).astype(q.dtype)


def dot_product_attention(q, k, v, *, causal=True, sm_scale=None):
    """Reference attention, [B, Lq, Hq, D] (CONTRACTS §3); the float32 softmax is kept whole."""
    mask = causal_mask(q.shape[1], k.shape[1]) if causal else None
    return attend(q, k, v, mask, sm_scale=sm_scale)
