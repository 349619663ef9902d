"""Linear attention (`model.attention = "linear"`; Katharopoulos et al. 2020), plain or gated, trained as a chunked
scan and decoded as a recurrence with a constant state.

Per head, with the positive feature map phi(x) = elu(x) + 1:

    S_t = g_t S_{t-1} + phi(k_t) v_t^T        [Dh, Dh]      g_t = 1 (plain), or per head and token (gated):
    z_t = g_t z_{t-1} + phi(k_t)              [Dh]                 g_t = sigmoid(x_t w_h + b_h)^(1/16)   (GLA's 1/16)
    out_t = S_t^T phi(q_t) / (z_t . phi(q_t))

Unrolled, out = (A V) / (A 1) with A[t, s] = (phi(q_t) . phi(k_s)) * g_{s+1} ... g_t for s <= t: softmax attention with
exp(q.k) replaced by a kernel, which makes it causal attention's linear-time dual.

This is SSD's recurrence (models/ssd.py, H_t = exp(a_t) H_{t-1} + x_t b_t^T, y_t = H_t c_t) with x = [v, 1] (the ones
column carries the normaliser z), b = phi(k), c = phi(q) and a = log g (a = 0: plain linear attention), so a full pass
runs `ssd.ssd_chunked` (chunks of `linear_chunk` positions: quadratic inside, a state passed between) and decoding
carries H: [B, H, Dh + 1, Dh] per layer, whatever the length. Keys and values are shared by query-head groups as in
GQA (repeated to every query head inside).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import bitnet, gqa, layers, packing, positions, ssd

GATE_TEMPERATURE = 16.0  # Yang et al.'s GLA: g = sigmoid(.)^(1/16) keeps the decays near 1 at initialisation
EPSILON = 1e-6  # added to the normaliser (it is positive: phi > 0)


def feature_map(x):
    return jax.nn.elu(x) + 1.0


class LinearAttention(nn.Module):
    cfg: object
    positions_per_row = reuses_cache = sows_pattern = lora_dropout = False  # (models/gqa.py names them)

    @nn.compact
    def __call__(self, x, start, cache=None, key_mask=None, segments=None):  # x [B, T, D]; segments: packed rows
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        batch, length, width = x.shape
        tokens = x.reshape(-1, width)

        def project(name, heads, axes):
            w = self.param(name, nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), axes), (width, heads, cfg.head_size))
            return bitnet.matmul(tokens, w.reshape(width, -1).astype(dtype), cfg.bitnet).reshape(
                batch, length, heads, cfg.head_size)

        q = project("query", cfg.num_heads, ("embed", "heads", "head_dim"))
        k = project("key", cfg.kv_heads, ("embed", "kv_heads", "head_dim"))
        v = project("value", cfg.kv_heads, ("embed", "kv_heads", "head_dim"))
        q_positions = start + jnp.arange(length) if segments is None else segments.positions
        if cfg.positional == "rope":  # rotated before the feature map (phi stays positive)
            q, k = (positions.apply_rope(cfg, t, q_positions, jnp.max(q_positions) + 1) for t in (q, k))
        groups = cfg.num_heads // cfg.kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # [B, T, H, Dh]
        phi_q, phi_k = feature_map(q.astype(jnp.float32)), feature_map(k.astype(jnp.float32))
        values = jnp.concatenate([v.astype(jnp.float32), jnp.ones((batch, length, cfg.num_heads, 1))], axis=-1)
        if key_mask is not None:  # a hidden key adds nothing to S or z
            visible = key_mask if cache is None else jax.lax.dynamic_slice_in_dim(key_mask, start, length, axis=1)
            phi_k, values = (t * visible[:, :, None, None] for t in (phi_k, values))
        log_gate = self.log_gate(tokens).reshape(batch, length, cfg.num_heads) if cfg.linear_gate else (
            jnp.zeros((batch, length, cfg.num_heads)))
        log_gate = packing.reset_decay(log_gate, segments)  # packed rows: S and z restart at each document
        y, state = ssd.ssd_chunked(values, log_gate, phi_k, phi_q, chunk_size=min(cfg.linear_chunk, length),
                                   initial_state=None if cache is None else cache["state"])
        out = (y[..., :-1] / (y[..., -1:] + EPSILON)).astype(dtype)  # [B, T, H, Dh]
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        w_out = self.param("out", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "head_dim", "embed")),
            (cfg.num_heads, cfg.head_size, width))
        out = bitnet.matmul(out.reshape(-1, cfg.num_heads * cfg.head_size), w_out.reshape(-1, width).astype(dtype),
                            cfg.bitnet)
        return out.reshape(x.shape), None if cache is None else {"state": state}

    def log_gate(self, tokens):
        """log g = log sigmoid(x w + b) / 16 per head, [B*T, H] (bias 4: decays ~0.999 at initialisation)."""
        cfg = self.cfg
        w = self.param("gate", layers.dense_init("embed", "heads"), (tokens.shape[-1], cfg.num_heads))
        b = self.param("gate_bias", nn.with_logical_partitioning(nn.initializers.constant(4.0), ("heads",)),
                       (cfg.num_heads,))
        return jax.nn.log_sigmoid(tokens.astype(jnp.float32) @ w + b) / GATE_TEMPERATURE

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """{"state": float32 [B, H, Dh + 1, Dh]}: S and z, the same size for any max_len."""
        del max_len, dtype
        return {"state": jnp.zeros((batch, cfg.num_heads, cfg.head_size + 1, cfg.head_size), jnp.float32)}

    @staticmethod
    def validate(m) -> list[str]:
        p = gqa.head_problems(m)
        if m.attention_bias != "none":
            p.append(f"model.attention_bias={m.attention_bias!r} is for attention 'gqa' / 'qk_norm'; "
                     "model.attention='linear' has none: set 'none'")
        if m.positional in positions.SCORE_BIASES:
            p.append(f"model.attention='linear' has no score matrix to bias; model.positional={m.positional!r} must be "
                     "'rope', 'learned', 'sinusoidal' or 'none'")
        if m.attention_pattern != "causal":
            p.append(f"model.attention='linear' attends causally to every key; model.attention_pattern="
                     f"{m.attention_pattern!r} must be 'causal'")
        if m.attention_dropout:
            p.append(f"model.attention_dropout={m.attention_dropout} has no probabilities to drop in linear attention")
        if m.kv_cache_dtype != "float":
            p.append(f"model.kv_cache_dtype={m.kv_cache_dtype!r}: linear attention decodes from a running sum S, z, not a "
                     "cache of keys and values; it must be 'float'")
        if m.positional == "rope":
            p += positions.validate(m)
        return p
