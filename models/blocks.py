"""Blocks and periods: what the LM skeleton (models/lm.py) scans, and the tables of token mixers and FFNs.

    Block:   x += Drop(Attn(norm(x)));  x += Drop(FFN(norm(x)))   Attn from ATTENTIONS[cfg.attention],
                                                                 FFN from FFNS[ffn or cfg.ffn] ("mlp", "moe"),
                                                                 Drop: residual dropout (training)
             with model.short_conv = w: Attn(ShortConv(norm(x)))  (models/short_conv.py; the block's cache is
                                                                 then {"mixer": Attn's, "conv": the conv's})
    Period:  its layers in order, e.g. (block_0, block_1) or (Mamba-2, Mamba-2, Mamba-2, attention block)

A unit's signature fits nn.scan: `(x, cache, start, key_mask, segments) -> (x, cache)`; `cache` is None for a
full pass (nothing cached), else the unit's decoding cache (`init_cache`), which a period keys by the
names of its layers; `segments` is None, or a full pass's packed rows (models/packing.py), which every mixer
keeps apart. Adding an attention kind is a module file and one entry in ATTENTIONS; adding an
FFN, one entry in FFNS.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import gqa, layers, linear_attention, mla, moe, qk_norm, short_conv

ATTENTIONS = {
    "gqa": gqa.GroupedQueryAttention,  # MHA / GQA / MQA by num_kv_heads
    "qk_norm": qk_norm.QKNormAttention,
    "mla": mla.MultiHeadLatentAttention,  # DeepSeek's multi-head latent attention: a latent KV cache
    "linear": linear_attention.LinearAttention,  # Katharopoulos et al.'s, plain or gated: a constant-size state
}

FFNS = {  # name -> (cfg, the block -> the FFN module; the config keys it needs beyond LMConfig's)
    "mlp": (lambda cfg, block: layers.Mlp(cfg.d_mlp, cfg.activation, cfg.mlp_bias, cfg.compute_dtype, cfg.bitnet,
                                          functools.partial(layers.sow_site, block, "mlp_hidden"), name="mlp"), ()),
    "moe": (lambda cfg, block: moe.MoEFfn(cfg.d_model, cfg.d_expert or cfg.d_mlp, cfg, cfg.compute_dtype, name="moe"),
            ("num_experts", "top_k")),  # the MoEOptions keys (models/moe.py): families that mix them in
}

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


def validate_ffn(m) -> list[str]:
    """Problems with config.model.ffn, the FFN of the blocks that do not name their own."""
    if m.ffn not in FFNS:
        return [f"model.ffn={m.ffn!r} is not one of {list(FFNS)}"]
    missing = [k for k in FFNS[m.ffn][1] if k not in m]
    if missing:
        return [f"model.ffn={m.ffn!r} needs the keys {missing}, which model.name={m.name!r} does not have; use a family "
                "that has them (model.name='moe')"]
    return []


def validate_attention(m, kind: str = "") -> list[str]:
    """Problems with config.model's attention kind (or `kind`) and its keys."""
    kind = kind or m.attention
    if kind not in ATTENTIONS:
        return [f"model.attention={kind!r} is not one of {list(ATTENTIONS)}"]
    return ATTENTIONS[kind].validate(m)


class Block(nn.Module):
    """x += Attn(norm(x)); x += FFN(norm(x))."""

    cfg: object  # an LMConfig (with the MoE keys when the FFN is "moe")
    ffn: str = ""  # the FFN kind (FFNS); "": cfg.ffn
    attention: str = ""  # the attention kind; "": cfg.attention (a hybrid's L layers set "linear")

    @nn.compact
    def __call__(self, x, cache, start, key_mask=None, segments=None, positions=None, reuse_cache=False):
        """segments: None, or packed rows (models/packing.py); positions: None, or int[B, T] of a gathered
        subsequence; reuse_cache: attend to the cache's keys and values without writing (gqa / qk_norm attention:
        models/gqa.py)."""
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        kind = ATTENTIONS[self.attention or cfg.attention]
        pattern = {"pattern_site": functools.partial(layers.sow_site, self, "attention_pattern")} if (
            kind.sows_pattern) else {}
        attention = kind(cfg, name="attention", **pattern)
        h = layers.Norm(cfg.norm, dtype, "attention_norm", cfg.norm_eps)(x)
        if cfg.short_conv:
            valid = None if key_mask is None else jax.lax.dynamic_slice_in_dim(key_mask, start, h.shape[1], axis=1)
            h, conv_state = short_conv.ShortConv(cfg.short_conv, name="short_conv")(
                h, None if cache is None else cache["conv"], valid, segments)
            h, mixer_cache = attention(h, start, None if cache is None else cache["mixer"], key_mask, segments=segments)
            cache = None if cache is None else {"mixer": mixer_cache, "conv": conv_state}
        else:
            options = {} if positions is None else {"positions": positions}
            h, cache = attention(h, start, cache, key_mask, segments=segments, **options,
                                 **({"reuse_cache": True} if reuse_cache else {}))
        h = layers.sow_site(self, "mixer_out", h)
        x = x + layers.dropout(self, h, cfg.residual_dropout)
        h = FFNS[self.ffn or cfg.ffn][0](cfg, self)(layers.Norm(cfg.norm, dtype, "mlp_norm", cfg.norm_eps)(x))
        h = layers.sow_site(self, "ffn_out", h)
        x = x + layers.dropout(self, h, cfg.residual_dropout)
        x = layers.sow_site(self, "residual", x)
        if self.is_mutable_collection("monitors"):
            self.sow("monitors", "residual_rms", jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))
        return nn.with_logical_constraint(x, ACTIVATION), cache

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype, ffn: str = "", attention: str = ""):
        del ffn
        mixer = ATTENTIONS[attention or cfg.attention].init_cache(cfg, batch, max_len, dtype)
        if cfg.short_conv:
            return {"mixer": mixer, "conv": short_conv.ShortConv.init_cache(batch, cfg.short_conv, cfg.d_model, dtype)}
        return mixer


class Period(nn.Module):
    """Layers run in order; `members` = ((name, unit class, ((keyword, value), ...)), ...)."""

    cfg: object
    members: tuple

    @nn.compact
    def __call__(self, x, caches, start, key_mask=None, segments=None):
        new_caches = {}
        for name, unit, kwargs in self.members:
            cache = None if caches is None else caches[name]
            x, new_caches[name] = unit(self.cfg, **dict(kwargs), name=name)(x, cache, start, key_mask, segments)
        return x, None if caches is None else new_caches

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype, members: tuple):
        return {name: unit.init_cache(cfg, batch, max_len, dtype, **dict(kwargs)) for name, unit, kwargs in members}
