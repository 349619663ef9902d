"""Scaled dot-product attention: the plain-JAX reference and the masked core it is built on.

For one query head h (kv head g = h // (heads_q // heads_kv)):

    S = sm_scale * Q_h K_g^T + bias_h        [Lq, Lk]   (bias: ALiBi / T5 relative positions, or none)
    P = softmax(S + log(mask)) over keys     (mask: which keys a query may see)
    O_h = P V_g                              [Lq, D]

Causal masking with Lq != Lk is bottom-right aligned: query i sees keys j <= i + Lk - Lq.
A query that sees no key at all outputs zeros. Tensors are BLHD (docs/interfaces.md).

`causal_attention(q, k, v, impl)` is what the models call: impl "xla" is the reference below,
"pallas" the flash-attention kernels of kernels_pallas, run per shard of the active mesh.
"""

import functools

import jax
import jax.numpy as jnp

import kernels_pallas
from kernels_pallas import on_mesh
from models import positions

_MASKED = -1e30  # a finite "minus infinity": exp(_MASKED - row max) underflows to 0, never NaN


def causal_mask(len_q: int, len_k: int, *, q_offset=None, window: int = 0) -> jax.Array:
    """bool[len_q, len_k]: query i sees key j iff j <= i + q_offset (default len_k - len_q), and, with a sliding
    window W > 0, i + q_offset - j < W."""
    if q_offset is None:
        q_offset = len_k - len_q
    distance = jnp.arange(len_q)[:, None] + q_offset - jnp.arange(len_k)[None, :]
    return (distance >= 0) & (distance < window) if window else distance >= 0


def _grouped_bias(bias, heads_kv: int):
    """float [Hq, Lq, Lk] -> [1, Hkv, G*Lq, Lk], the layout of `attend`'s scores (query head h = g_kv * G + g)."""
    heads_q, len_q, len_k = bias.shape
    return bias.reshape(1, heads_kv, heads_q // heads_kv * len_q, len_k)


def attend(q, k, v, mask, *, bias=None, sm_scale=None, dropout_rate: float = 0.0, dropout_rng=None):
    """Softmax attention of q [B, Lq, Hq, D] over k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv] with a bool mask [Lq, Lk] (the same
    for every row), [B, Lq, Lk] (e.g. causal and a key-padding mask), or None, and an optional float score bias
    [Hq, Lq, Lk] added before the softmax. With `dropout_rng`, each
    probability is kept with chance 1 - dropout_rate and scaled by 1 / (1 - dropout_rate) (after the softmax:
    the kept weights no longer sum to 1)."""
    batch, len_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    groups = heads_q // heads_kv
    # Heads-major [B, Hkv, G*Lq, D]: one batch of dots per kv head, with the G query heads that
    # share it stacked along the query axis (XLA:CPU's dot is fastest with leading batch dims).
    q = q.reshape(batch, len_q, heads_kv, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, heads_kv, groups * len_q, head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, D]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * sm_scale
    if bias is not None:
        scores = scores + _grouped_bias(bias.astype(jnp.float32), heads_kv)
    if mask is not None:
        mask = jnp.tile(mask.reshape(-1, len_q, mask.shape[-1]), (1, groups, 1))  # [1 or B, G*Lq, Lk]
        scores = jnp.where(mask[:, None], scores, _MASKED)
    # The row max only shifts the exponent, so no gradient flows through it; normalising the
    # [.., Lq, D] output instead of the [.., Lq, Lk] probabilities saves a pass over the scores.
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    unnormalised = jnp.exp(scores - row_max)
    denom = jnp.sum(unnormalised, axis=-1, keepdims=True)
    if dropout_rng is not None and dropout_rate:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, unnormalised.shape)
        unnormalised = jnp.where(keep, unnormalised / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhqk,bhkd->bhqd", unnormalised.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / denom
    if mask is not None:  # a query that sees no key outputs zeros
        out = jnp.where(jnp.any(mask, axis=-1)[:, None, :, None], out, 0.0)
    value_dim = v.shape[-1]  # may differ from the query/key width (multi-head latent attention)
    out = out.reshape(batch, heads_kv, groups, len_q, value_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, len_q, heads_q, value_dim).astype(q.dtype)


def log_probabilities(q, k, mask, *, bias=None, sm_scale=None):
    """log P [B, Hq, Lq, Lk], the attention pattern: log softmax over keys of the scaled scores (+ bias, masked).
    mask: bool [Lq, Lk] or [B, Lq, Lk] or None, bias: float [Hq, Lq, Lk] or None, as in `attend`."""
    heads_q, heads_kv = q.shape[2], k.shape[2]
    k = jnp.repeat(k, heads_q // heads_kv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (
        q.shape[-1]**-0.5 if sm_scale is None else sm_scale)
    if bias is not None:
        scores = scores + bias[None]
    if mask is not None:
        scores = jnp.where(mask.reshape(-1, 1, *mask.shape[-2:]), scores, _MASKED)
    return jax.nn.log_softmax(scores, axis=-1)


def entropy(q, k, mask, *, bias=None, sm_scale=None):
    """Attention entropy per query head, -sum_j P_ij log P_ij averaged over batch and queries: [Hq] (nats)."""
    log_p = log_probabilities(q, k, mask, bias=bias, sm_scale=sm_scale)
    return jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1), axis=(0, 2))


def dot_product_attention(q, k, v, *, causal=True, sm_scale=None):
    """Reference attention, [B, Lq, Hq, D] (docs/interfaces.md); the float32 softmax is kept whole."""
    mask = causal_mask(q.shape[1], k.shape[1]) if causal else None
    return attend(q, k, v, mask, sm_scale=sm_scale)


IMPLS = ("xla", "pallas")


def causal_attention(q, k, v, impl: str = "xla", *, bias=None, window: int = 0, alibi_slopes=None, segment_ids=None,
                     sm_scale=None, dropout_rate: float = 0.0, dropout_rng=None):
    """Causal self-attention (within a sliding window of `window` keys when > 0; within each query's segment when
    `segment_ids` int[B, L] are given: packed rows, models/packing.py) with the named implementation
    (`model.attention_impl`); attention dropout (training) and general score biases run in the XLA reference only;
    the flash kernels compute ALiBi's from its slopes [Hq] (the XLA path takes the bias). The flash kernels take one
    head width: a value width Dv different from the query/key width D is zero-padded to the larger
    of the two and cut back after."""
    if impl == "xla" or dropout_rng is not None:
        if alibi_slopes is not None and bias is None:
            bias = positions.alibi_bias(q.shape[2], jnp.arange(q.shape[1]) + k.shape[1] - q.shape[1], jnp.arange(k.shape[1]))
        mask = causal_mask(q.shape[1], k.shape[1], window=window)
        if segment_ids is not None:
            mask = mask[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
        return attend(q, k, v, mask, bias=bias, sm_scale=sm_scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if impl == "pallas":
        if bias is not None:
            raise ValueError("the flash kernels take no score bias (ALiBi, T5): use attention impl 'xla'")
        sm_scale = q.shape[-1]**-0.5 if sm_scale is None else sm_scale
        width = max(q.shape[-1], v.shape[-1])
        pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])  # noqa: E731 (zeros change no score)
        flash = functools.partial(kernels_pallas.flash_attention, causal=True, window=window, sm_scale=sm_scale)
        extras = {}  # per-shard inputs beside q, k, v: slopes [B, 1, Hq] split over heads like q, segment ids [B, L]
        if alibi_slopes is not None:
            extras["alibi_slopes"] = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32), (q.shape[0], 1, q.shape[2]))
        if segment_ids is not None:
            extras["segment_ids"] = jnp.asarray(segment_ids, jnp.int32)

        def flash_shard(q, k, v, *shard_extras):
            options = dict(zip(extras, shard_extras))
            if "alibi_slopes" in options:
                options["alibi_slopes"] = options["alibi_slopes"][0, 0]  # this shard's heads
            return flash(q, k, v, **options)
        return on_mesh.per_shard(flash_shard, pad(q), pad(k), pad(v), *extras.values(),
                                 split_heads=True)[..., :v.shape[-1]]
    raise ValueError(f"attention impl {impl!r} is not one of {list(IMPLS)}")
