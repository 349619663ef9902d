"""Multi-head latent attention (`model.attention = "mla"`; DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

Keys and values of every head come from one joint latent per token; a small rotary key is shared by the heads:

    c_q   = RMSNorm(x W_dq)                [B, T, r_q]     (q_lora_rank > 0; else q = x W_q)
    q     = c_q W_uq = [q_nope, q_rope]     [B, T, H, d_n + d_r]
    c_kv  = RMSNorm(x W_dkv)               [B, T, r]       (kv_lora_rank)
    k_rope = RoPE(x W_kr)                  [B, T, d_r]     one key for all heads (decoupled RoPE)
    k_h   = [c_kv W_uk,h, k_rope],  v_h = c_kv W_uv,h      (expanded form: the reference)
    o_h   = softmax(q_h k_h^T / sqrt(d_n + d_r) + causal) v_h;   out = [o_1 .. o_H] W_o

The decoding cache holds only c_kv and k_rope: r + d_r numbers per token per layer. Decoding uses the
**absorbed** form (`mla_absorb`), which never expands the cache: since q_nope,h . (c_kv W_uk,h) =
(q_nope,h W_uk,h^T) . c_kv and o_h W_o = (P_h c_kv) W_uv,h W_o,h, attention runs as multi-query attention
in the latent space,

    q'_h = [q_nope,h W_uk,h^T, q_rope,h]   [r + d_r],   k' = [c_kv, k_rope],   v' = c_kv
    o_h  = (softmax(q'_h k'^T / sqrt(d_n + d_r)) c_kv) W_uv,h

which gives the expanded form's outputs (tests/models/test_mla.py). The latent norms use epsilon 1e-6 as
DeepSeek's checkpoints do; RoPE rotates (x_i, x_{i + d_r/2}) pairs (DeepSeek's interleaved pairs are a
permutation of the projection columns: experiments/import_hf.py applies it).
"""

import flax.linen as nn
import jax.numpy as jnp

from models import attention, kv_cache, layers, packing, positions
from models.lm_config import LMConfig

LATENT_NORM_EPS = 1e-6


def widths(cfg) -> dict:
    """The MLA widths of a config, with 0s derived (DeepSeek-V2's d_c = 4 d_h, d_h^R = d_h / 2)."""
    head = cfg.head_dim or cfg.d_model // max(cfg.num_heads, 1)
    return {"kv_lora_rank": cfg.kv_lora_rank or 4 * head, "qk_nope_head_dim": cfg.qk_nope_head_dim or head,
            "qk_rope_head_dim": cfg.qk_rope_head_dim or head // 2, "v_head_dim": cfg.v_head_dim or head}


def cache_numbers_per_token(cfg) -> int:
    """Numbers one layer caches per token: r + d_r."""
    w = widths(cfg)
    return w["kv_lora_rank"] + w["qk_rope_head_dim"]


def expanded_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, mask, impl="xla", segment_ids=None, **dropout):
    """The reference: keys and values expanded per head from the latent. q_nope [B, T, H, d_n], q_rope
    [B, T, H, d_r], latent [B, S, r], rope_key [B, S, d_r], w_uk [r, H, d_n], w_uv [r, H, d_v];
    mask: bool [T, S] / [B, T, S], or None for causal over T = S (within each segment of a packed row when
    segment_ids int[B, T] are given). Returns [B, T, H, d_v]."""
    k_nope = jnp.einsum("bsr,rhd->bshd", latent, w_uk)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(rope_key[:, :, None], (*k_nope.shape[:3], rope_key.shape[-1]))], -1)
    v = jnp.einsum("bsr,rhd->bshd", latent, w_uv)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    sm_scale = q.shape[-1]**-0.5
    if mask is None:
        return attention.causal_attention(q, k, v, impl, sm_scale=sm_scale, segment_ids=segment_ids, **dropout)
    return attention.attend(q, k, v, mask, sm_scale=sm_scale, **dropout)


def absorbed_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, mask):
    """The same outputs computed in the latent space (multi-query attention over [c_kv, k_rope])."""
    sm_scale = (q_nope.shape[-1] + q_rope.shape[-1])**-0.5
    q = jnp.concatenate([jnp.einsum("bthd,rhd->bthr", q_nope, w_uk), q_rope], axis=-1)  # [B, T, H, r + d_r]
    k = jnp.concatenate([latent, rope_key], axis=-1)[:, :, None]  # [B, S, 1, r + d_r]
    out_latent = attention.attend(q, k, latent[:, :, None], mask, sm_scale=sm_scale)  # [B, T, H, r]
    return jnp.einsum("bthr,rhd->bthd", out_latent, w_uv)


class MultiHeadLatentAttention(nn.Module):
    cfg: LMConfig
    positions_per_row = reuses_cache = sows_pattern = lora_dropout = False  # (models/gqa.py names them)

    def weight(self, name, shape, axes, in_axis=0, out_axis=-1):
        return self.param(name, nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis), axes), shape).astype(self.cfg.compute_dtype)

    def record_inputs(self, names, x):
        """Compression's calibration (models/layers.record_input): x [N, in] is the input of every kernel in `names`."""
        for name in names:
            layers.record_input(self, (name,), x)

    @nn.compact
    def __call__(self, x, start, cache=None, key_mask=None, segments=None):  # x [B, T, D]; start: positions cached
        cfg, (batch, length, d_model) = self.cfg, x.shape
        w = widths(cfg)
        heads, d_nope, d_rope, d_v, rank = (cfg.num_heads, w["qk_nope_head_dim"], w["qk_rope_head_dim"],
                                            w["v_head_dim"], w["kv_lora_rank"])
        tokens = x.reshape(-1, d_model)  # [B*T, D]: 2-D matmuls
        latent_norm = lambda name, axis: layers.Norm("rmsnorm", cfg.compute_dtype, name, LATENT_NORM_EPS, axis)  # noqa: E731
        if cfg.q_lora_rank:
            c_q = latent_norm("query_norm", "q_lora")(tokens @ self.weight("query_down", (d_model, cfg.q_lora_rank),
                                                                           ("embed", "q_lora")))
            q = c_q @ self.weight("query_up", (cfg.q_lora_rank, heads, d_nope + d_rope), ("q_lora", "heads", "head_dim"),
                                  out_axis=(1, 2)).reshape(cfg.q_lora_rank, -1)
            self.record_inputs(("query_down", "kv_down", "key_rope"), tokens)
            self.record_inputs(("query_up",), c_q)
        else:
            q = tokens @ self.weight("query", (d_model, heads, d_nope + d_rope), ("embed", "heads", "head_dim"),
                                     out_axis=(1, 2)).reshape(d_model, -1)
            self.record_inputs(("query", "kv_down", "key_rope"), tokens)
        q_nope, q_rope = jnp.split(q.reshape(batch, length, heads, d_nope + d_rope), [d_nope], axis=-1)
        latent = latent_norm("kv_norm", "kv_lora")(tokens @ self.weight("kv_down", (d_model, rank), ("embed", "kv_lora")))
        rope_key = tokens @ self.weight("key_rope", (d_model, d_rope), ("embed", "head_dim"))
        self.record_inputs(("key_up", "value_up"), latent)  # [B*T, r]: keys and values are per-head products of the latent
        latent, rope_key = latent.reshape(batch, length, rank), rope_key.reshape(batch, length, 1, d_rope)
        token_positions = start + jnp.arange(length) if segments is None else segments.positions  # packed: per document
        inv_freq = positions.inverse_frequencies(d_rope, cfg.rope_theta)
        q_rope = positions.rotate(q_rope, token_positions, inv_freq)
        rope_key = positions.rotate(rope_key, token_positions, inv_freq)[:, :, 0]  # [B, T, d_r]
        w_uk = self.weight("key_up", (rank, heads, d_nope), ("kv_lora", "heads", "head_dim"), out_axis=(1, 2))
        w_uv = self.weight("value_up", (rank, heads, d_v), ("kv_lora", "heads", "head_dim"), out_axis=(1, 2))

        mask = None if key_mask is None else attention.causal_mask(length, length)[None] & key_mask[:, None, :]
        if segments is not None and key_mask is not None:
            mask = mask & packing.same_segment(segments)
        if cache is not None:
            cache = {"latent": kv_cache.write(cache["latent"], latent, start),
                     "rope_key": kv_cache.write(cache["rope_key"], rope_key, start)}
            latent, rope_key = kv_cache.read(cache["latent"], cfg.compute_dtype), kv_cache.read(cache["rope_key"],
                                                                                                cfg.compute_dtype)
            mask = attention.causal_mask(length, latent.shape[1], q_offset=start)
            mask = mask if key_mask is None else mask[None] & key_mask[:, None, :]
        if cache is not None and cfg.mla_absorb:
            out = absorbed_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, mask)
        else:
            rng = self.make_rng("dropout") if cfg.attention_dropout and self.has_rng("dropout") else None
            out = expanded_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, mask, cfg.attention_impl,
                                     None if segments is None else segments.ids, dropout_rate=cfg.attention_dropout,
                                     dropout_rng=rng)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        w_out = self.weight("out", (heads, d_v, d_model), ("heads", "head_dim", "embed"), in_axis=(0, 1), out_axis=2)
        heads_out = out.reshape(-1, heads * d_v)
        self.record_inputs(("out",), heads_out)
        return (heads_out @ w_out.reshape(-1, d_model)).reshape(x.shape), cache

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """An empty cache: {"latent": [B, max_len, r], "rope_key": [B, max_len, d_r]} (int8 with per-token scales
        when `kv_cache_dtype` is "int8")."""
        w = widths(cfg)
        return {"latent": kv_cache.empty((batch, max_len, w["kv_lora_rank"]), dtype, cfg.kv_cache_dtype),
                "rope_key": kv_cache.empty((batch, max_len, w["qk_rope_head_dim"]), dtype, cfg.kv_cache_dtype)}

    @staticmethod
    def validate(m) -> list[str]:
        """Cross-field problems of the MLA keys."""
        p = []
        if m.attention_bias != "none":
            p.append(f"model.attention_bias={m.attention_bias!r} is for attention 'gqa' / 'qk_norm'; "
                     "model.attention='mla' has none: set 'none'")
        if not m.head_dim and m.d_model % m.num_heads and not (m.qk_nope_head_dim and m.qk_rope_head_dim and m.v_head_dim
                                                               and m.kv_lora_rank):
            p.append(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; set model.head_dim "
                     "or every MLA width (qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank)")
        rope = widths(m)["qk_rope_head_dim"]
        if rope < 2 or rope % 2:
            p.append(f"model.qk_rope_head_dim={rope} must be even and >= 2 (it is rotated in pairs)")
        if m.positional != "rope":
            p.append(f"model.attention='mla' has its own decoupled RoPE; model.positional={m.positional!r} must be 'rope'")
        if m.rope_scaling != "none" or m.rope_fraction != 1:
            p.append(f"model.attention='mla' rotates its whole decoupled key unscaled; model.rope_scaling="
                     f"{m.rope_scaling!r} / model.rope_fraction={m.rope_fraction} must be 'none' / 1")
        if m.bitnet:
            p.append("model.bitnet=True is not supported by model.attention='mla'; use 'gqa'")
        if m.attention_pattern != "causal":
            p.append(f"model.attention_pattern={m.attention_pattern!r} is not supported by model.attention='mla' "
                     "(its latent cache holds every position); use 'gqa'")
        if m.attention_dropout and m.attention_impl != "xla":
            p.append(f"model.attention_dropout={m.attention_dropout} needs model.attention_impl='xla'")
        return p
