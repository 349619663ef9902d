"""Grouped-query attention (`model.attention = "gqa"`), the attention kind of every family by default.

    q = x W_q [B, T, H, Dh],  k = x W_k, v = x W_v [B, T, Hkv, Dh]      (Hkv = H: MHA; Hkv = 1: MQA;
                                                                          + b_q, b_k, b_v with attention_bias)
    q, k = RoPE(q), RoPE(k)                                               (positional = "rope")
    out = Attn(q, k, v; bias) W_o (+ b_o)                                 (models/attention.py; bias: ALiBi / T5)

Positions (RoPE and its scalings, ALiBi, T5 buckets) are models/positions.py's.

Query head h reads kv head h // (H / Hkv). Decoding keeps a cache {"k", "v"}: [B, max_len, Hkv, Dh],
filled `start` positions deep; new tokens write their keys and values at start.. and attend to the
whole cache (masked causally), which gives the logits of the full pass. `attention_impl` picks the full
pass's attention (the XLA reference or the Pallas flash kernels); cached decoding and passes with a
key mask (bool[B, keys]: False hides a key, e.g. left padding) use the reference's masked core.

An attention kind is a module `(cfg)` with `__call__(x, start, cache, key_mask, segments=None) -> (out, cache)`,
`init_cache(cfg, batch, max_len, dtype)` and `validate(m)`; `queries_and_keys` is the seam that
variants override (models/qk_norm.py).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models import attention, attention_patterns, bitnet, kv_cache, layers, packing, positions
from models.lm_config import LMConfig


def head_problems(m) -> list[str]:
    """Head counts and sizes that do not divide (every attention kind with query and key/value heads)."""
    p = []
    if m.num_heads >= 1 and m.num_kv_heads and m.num_heads % m.num_kv_heads:
        p.append(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    if m.num_heads >= 1 and not m.head_dim and m.d_model % m.num_heads:
        p.append(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; set model.head_dim")
    return p


class GroupedQueryAttention(nn.Module):
    """Capabilities the callers read (class attributes of every attention kind in models/blocks.ATTENTIONS):
    `positions_per_row`: takes `positions` int[B, T] of a gathered subsequence (MoD, MoR); `reuses_cache`: attends
    to a cache's keys and values without writing (`reuse_cache`: MoR's recursive KV sharing); `sows_pattern`:
    records its attention pattern through `pattern_site`; `lora_dropout`: its projections read the unmerged
    LoRA collection (adapter dropout, experiments/posttrain/lora.py)."""

    cfg: LMConfig
    pattern_site: Any = None  # P -> P: the block's sow_site for "attention_pattern" [B, H, T, T] (full passes only)
    positions_per_row = reuses_cache = sows_pattern = lora_dropout = True

    def queries_and_keys(self, q, k, q_positions):
        """q [B, T, H, Dh], k [B, T, Hkv, Dh] at integer positions [T] or [B, T] -> as attention sees them (RoPE)."""
        cfg = self.cfg
        if cfg.positional == "rope":  # the sequence so far ends at the last position (dynamic NTK reads it)
            seq_len = jnp.max(q_positions) + 1
            return positions.apply_rope(cfg, q, q_positions, seq_len), positions.apply_rope(cfg, k, q_positions, seq_len)
        return q, k

    def score_bias(self, q_positions, k_positions):
        """float32[H, Tq, Tk] added to the attention scores (ALiBi, T5 buckets), or None."""
        cfg = self.cfg
        if cfg.positional == "alibi":
            return positions.alibi_bias(cfg.num_heads, q_positions, k_positions)
        if cfg.positional == "t5":
            return positions.T5Bias(cfg.t5_buckets, cfg.t5_max_distance, cfg.num_heads, name="t5_bias")(
                q_positions, k_positions)
        return None

    def full_pass(self, q, k, v, q_positions, key_mask, dropout, segments=None):
        """Attention of a whole sequence to itself, masked by the pattern (and key_mask), within each document of a
        packed row (segments: the pattern reads the documents' own positions; ALiBi and T5 are relative, so the
        row's positions give each document's biases)."""
        cfg = self.cfg
        bias = self.score_bias(q_positions, q_positions)
        if segments is None:
            mask = attention_patterns.visible(cfg, q_positions, q_positions)
        else:
            mask = attention_patterns.visible(cfg, segments.positions, segments.positions) & packing.same_segment(segments)
        if key_mask is not None:
            mask = mask & key_mask[:, None, :]
        if self.is_mutable_collection("monitors"):
            self.sow("monitors", "entropy", attention.entropy(q, k, mask, bias=bias))
        if self.pattern_site is not None and self.is_mutable_collection("intermediates"):  # capture only
            self.pattern_site(jnp.exp(attention.log_probabilities(q, k, mask, bias=bias)))
        if key_mask is None and cfg.attention_pattern in ("causal", "sliding"):  # the kernels' patterns
            packed = {} if segments is None else {"segment_ids": segments.ids}
            if cfg.positional == "alibi":  # the kernels compute ALiBi's bias from the slopes
                return attention.causal_attention(q, k, v, cfg.attention_impl, window=cfg.attention_window,
                                                  alibi_slopes=positions.alibi_slopes(cfg.num_heads), **packed, **dropout)
            return attention.causal_attention(q, k, v, cfg.attention_impl, bias=bias, window=cfg.attention_window,
                                              **packed, **dropout)
        return attention.attend(q, k, v, mask, bias=bias, **dropout)

    def cached_pass(self, q, k, v, q_positions, cache, start, key_mask, reuse_cache=False, segments=None):
        """New tokens written to the cache, attending to it: every position's slot, or the sliding window's ring
        (attending to the ring as it was and to themselves, then overwriting the oldest slots). reuse_cache: the
        cache already holds keys and values for these positions (another pass wrote them: Mixture-of-Recursions'
        recursive KV sharing, models/mor.py); the queries attend to it as it is and nothing is written. segments:
        packed rows of a full pass through a cache of the pass's own length (MoR's shared keys and values)."""
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        if reuse_cache:
            k_all, v_all = kv_cache.read(cache["k"], dtype), kv_cache.read(cache["v"], dtype)
            k_positions = jnp.arange(k_all.shape[1])
        elif attention_patterns.uses_ring(cfg):
            k_positions = jnp.concatenate([attention_patterns.ring_positions(start, kv_cache.length(cache["k"])),
                                           q_positions])
            k_all = jnp.concatenate([kv_cache.read(cache["k"], dtype), k.astype(dtype)], axis=1)
            v_all = jnp.concatenate([kv_cache.read(cache["v"], dtype), v.astype(dtype)], axis=1)
            cache = {"k": kv_cache.write_ring(cache["k"], k, start), "v": kv_cache.write_ring(cache["v"], v, start)}
        else:
            cache = {"k": kv_cache.write(cache["k"], k, start), "v": kv_cache.write(cache["v"], v, start)}
            k_all, v_all = kv_cache.read(cache["k"], dtype), kv_cache.read(cache["v"], dtype)
            k_positions = jnp.arange(k_all.shape[1])
        mask = attention_patterns.visible(cfg, q_positions, k_positions)
        if key_mask is not None:  # indexed by absolute position
            mask = mask[None] & key_mask[:, jnp.maximum(k_positions, 0)][:, None, :]
        if segments is not None:
            if k_all.shape[1] != q.shape[1] or attention_patterns.uses_ring(cfg):
                raise ValueError("packed rows (segment_ids) reach a cache only in a full pass through a cache of its own "
                                 "length (Mixture-of-Recursions' shared keys and values), not a sliding window's ring")
            mask = mask & packing.same_segment(segments)
        return attention.attend(q, k_all, v_all, mask, bias=self.score_bias(q_positions, k_positions)), cache

    @nn.compact
    def __call__(self, x, start, cache=None, key_mask=None, positions=None, reuse_cache=False, segments=None):
        """x [B, T, D]; start: positions already cached. positions: None (x's rows are start..start+T-1), or
        int[B, T], increasing along T (a gathered subsequence: models/mod.py; full passes with the causal pattern):
        RoPE rotates by them, and causal masking by row order is then masking by position. reuse_cache: attend to
        the cache's keys and values as they are, without writing this pass's (`cached_pass`). segments: packed rows
        of a full pass (models/packing.py): RoPE rotates by each document's positions, attention stays inside it."""
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        tokens = x.reshape(-1, x.shape[-1])  # [B*T, D]: 2-D matmuls are XLA:CPU's fastest

        def project(name, heads, axes):  # [B, T, D] @ [D, heads, Dh] -> [B, T, heads, Dh]
            w = self.param(name, nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), axes), (x.shape[-1], heads, cfg.head_size))
            projected = bitnet.matmul(tokens, w.reshape(x.shape[-1], -1).astype(dtype), cfg.bitnet)
            projected = projected + layers.lora_delta(self, (name,), tokens, projected.shape)
            layers.record_input(self, (name,), tokens)
            projected = projected.reshape(*x.shape[:2], heads, cfg.head_size)
            if cfg.attention_bias == "none":
                return projected
            b = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                           (heads, cfg.head_size))
            return projected + b.astype(dtype)

        q = project("query", cfg.num_heads, ("embed", "heads", "head_dim"))  # [B, T, H, Dh]
        k = project("key", cfg.kv_heads, ("embed", "kv_heads", "head_dim"))  # [B, T, Hkv, Dh]
        v = project("value", cfg.kv_heads, ("embed", "kv_heads", "head_dim"))
        q_positions = start + jnp.arange(x.shape[1])
        if positions is None and segments is not None:
            positions = segments.positions
        q, k = self.queries_and_keys(q, k, q_positions if positions is None else positions)
        dropout = {"dropout_rate": cfg.attention_dropout, "dropout_rng": (
            self.make_rng("dropout") if cfg.attention_dropout and self.has_rng("dropout") else None)}
        if cache is None:
            out = self.full_pass(q, k, v, q_positions, key_mask, dropout, segments)
        else:
            out, cache = self.cached_pass(q, k, v, q_positions, cache, start, key_mask, reuse_cache, segments)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        w_out = self.param("out", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "head_dim", "embed")),
            (cfg.num_heads, cfg.head_size, x.shape[-1]))
        heads_out = out.reshape(-1, cfg.num_heads * cfg.head_size)
        out = bitnet.matmul(heads_out, w_out.reshape(-1, x.shape[-1]).astype(dtype), cfg.bitnet)
        out = out + layers.lora_delta(self, ("out",), heads_out, out.shape)
        layers.record_input(self, ("out",), heads_out)
        if cfg.attention_bias == "all":
            out = out + self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                                   (x.shape[-1],)).astype(dtype)
        return out.reshape(x.shape), cache

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """An empty KV cache: {"k", "v"}: [B, max_len, Hkv, Dh], or a ring of [B, window, Hkv, Dh] for a sliding window
        (int8 with per-token, per-head scales when `kv_cache_dtype` is "int8": models/kv_cache.py)."""
        shape = (batch, attention_patterns.cache_length(cfg, max_len), cfg.kv_heads, cfg.head_size)
        return {name: kv_cache.empty(shape, dtype, cfg.kv_cache_dtype) for name in ("k", "v")}

    @staticmethod
    def validate(m) -> list[str]:
        """Cross-field problems of the attention keys (head counts and sizes)."""
        p = head_problems(m)
        p += positions.validate(m)
        p += attention_patterns.validate(m)
        if m.attention_dropout and m.attention_impl != "xla":
            p.append(f"model.attention_dropout={m.attention_dropout} needs model.attention_impl='xla' (the Pallas "
                     "kernels have no dropout)")
        return p
