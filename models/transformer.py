"""Decoder-only transformer: pre-norm blocks, GQA attention with RoPE, scanned layers, KV-cache decoding.

    x_0 = E[tokens] (+ P[positions] for learned positions)
    x_{l+1} = x_l + Attn(norm(x_l)) ;  x_{l+1} += Mlp(norm(x_{l+1}))     (layers stacked with nn.scan)
    logits = norm(x_L) U           (U = E^T when embeddings are tied)

Attention has `num_heads` query heads and `num_kv_heads` key/value heads (grouped-query attention);
query head h reads kv head h // (num_heads // num_kv_heads). Decoding keeps a cache of keys and
values, [layers, B, max_len, Hkv, Dh], filled `start` positions deep; `decode` runs T new tokens
against it and returns the same logits the full forward pass gives at those positions.
`attention_impl` picks the full pass's attention: the XLA reference or the Pallas flash kernels;
cached decoding always uses the reference's masked core (a few queries against the cache), and so does
a pass with a key mask (bool[B, keys]: False hides a key, e.g. left padding, from every query).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention, layers


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Every `config.model` key of the transformer; 0 means "derive it" where noted."""

    name: str = "transformer"
    vocab_size: int = 0  # 0: the dataset's vocabulary size
    max_len: int = 0  # 0: the dataset's sequence length (bounds learned positions and the KV cache)
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: num_heads (plain multi-head attention)
    head_dim: int = 0  # 0: d_model // num_heads
    d_mlp: int = 512
    activation: str = "gelu"  # relu | gelu | swiglu
    norm: str = "rmsnorm"  # rmsnorm | layernorm | none
    positional: str = "rope"  # rope | learned | none
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: str = "none"  # none | full | dots
    scan_unroll: int = 1  # layers per scan iteration; num_layers unrolls the stack (faster on CPU, slower compile)
    attention_impl: str = "xla"  # xla (models/attention.py) | pallas (kernels_pallas flash attention)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


class Attention(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, start, layer_cache, key_mask=None):  # x [B, T, D]; start: positions already cached
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        tokens = x.reshape(-1, x.shape[-1])  # [B*T, D]: 2-D matmuls are XLA:CPU's fastest

        def project(name, heads, axes):  # [B, T, D] @ [D, heads, Dh] -> [B, T, heads, Dh]
            w = self.param(name, nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), axes), (x.shape[-1], heads, cfg.head_size))
            return (tokens @ w.reshape(x.shape[-1], -1).astype(dtype)).reshape(*x.shape[:2], heads, cfg.head_size)

        q = project("query", cfg.num_heads, ("embed", "heads", "head_dim"))  # [B, T, H, Dh]
        k = project("key", cfg.kv_heads, ("embed", "kv_heads", "head_dim"))  # [B, T, Hkv, Dh]
        v = project("value", cfg.kv_heads, ("embed", "kv_heads", "head_dim"))
        positions = start + jnp.arange(x.shape[1])
        if cfg.positional == "rope":
            q, k = layers.apply_rope(q, positions, cfg.rope_theta), layers.apply_rope(k, positions, cfg.rope_theta)
        if layer_cache is None and key_mask is None:
            out = attention.causal_attention(q, k, v, cfg.attention_impl)
        elif layer_cache is None:
            mask = attention.causal_mask(x.shape[1], x.shape[1])[None] & key_mask[:, None, :]
            out = attention.attend(q, k, v, mask)
        else:
            k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), start, 1)
            v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), start, 1)
            layer_cache = {"k": k_all, "v": v_all}
            mask = attention.causal_mask(x.shape[1], k_all.shape[1], q_offset=start)
            if key_mask is not None:
                mask = mask[None] & key_mask[:, None, :]
            out = attention.attend(q, k_all.astype(dtype), v_all.astype(dtype), mask)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        w_out = self.param("out", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "head_dim", "embed")),
            (cfg.num_heads, cfg.head_size, x.shape[-1]))
        out = out.reshape(-1, cfg.num_heads * cfg.head_size) @ w_out.reshape(-1, x.shape[-1]).astype(dtype)
        return out.reshape(x.shape), layer_cache


class Block(nn.Module):
    """x += Attn(norm(x)); x += Mlp(norm(x)). Signature fits nn.scan: (carry, per-layer xs, broadcasts)."""

    cfg: TransformerConfig

    def feed_forward(self):
        """The block's FFN module (models/moe_transformer.py swaps in a mixture of experts)."""
        cfg = self.cfg
        return layers.Mlp(cfg.d_mlp, cfg.activation, cfg.mlp_bias, cfg.compute_dtype, name="mlp")

    @nn.compact
    def __call__(self, x, layer_cache, start, key_mask=None):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        h, layer_cache = Attention(cfg, name="attention")(layers.Norm(cfg.norm, dtype, "attention_norm")(x),
                                                          start, layer_cache, key_mask)
        x = x + h
        x = x + self.feed_forward()(layers.Norm(cfg.norm, dtype, "mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, layer_cache


class Transformer(nn.Module):
    cfg: TransformerConfig

    def setup(self):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        self.embed = layers.token_embedding(cfg.vocab_size, cfg.d_model, dtype)
        if cfg.positional == "learned":
            self.position_embedding = layers.learned_positions(self, cfg.max_len, cfg.d_model)
        self.layers = self.stack(Block, cfg.num_layers, variable_axes={"params": 0})
        self.final_norm = layers.Norm(cfg.norm, dtype, "final_norm")
        self.unembed = None if cfg.tie_embeddings else layers.unembedding(cfg.vocab_size, dtype)

    def stack(self, unit, length: int, variable_axes):
        """`length` copies of `unit` (a block, or a period of blocks) scanned with nn.scan, under remat if set."""
        cfg = self.cfg
        if cfg.remat != "none":
            unit = nn.remat(unit, policy=layers.remat_policy(cfg.remat), prevent_cse=False)
        return nn.scan(unit, variable_axes=variable_axes, split_rngs={"params": True},
                       in_axes=(0, nn.broadcast, nn.broadcast), length=length, unroll=cfg.scan_unroll,
                       metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")

    def embed_tokens(self, tokens, start=0):
        """int32[B, T] -> [B, T, D] input embeddings of tokens at positions start..start+T-1."""
        x = self.embed(tokens)
        if self.cfg.positional == "learned":
            x = layers.add_positions(x, self.position_embedding, start)
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    def hidden(self, x, cache=None, start=0, key_mask=None):
        """Runs the stack over embeddings x [B, T, D]; returns (final-norm hidden [B, T, D], cache).
        key_mask: None, or bool[B, keys] (T keys, or the cache's length when decoding)."""
        x, cache = self.layers(x, cache, start, key_mask)
        return self.final_norm(x), cache

    def logits(self, h):
        """[B, T, D] -> float32 logits [B, T, V]."""
        return layers.vocab_logits(h, self.embed, self.unembed)

    def __call__(self, tokens):
        """int32[B, L] -> float32 logits [B, L, V] of the next token at every position."""
        h, _ = self.hidden(self.embed_tokens(tokens))
        return self.logits(h)

    def decode(self, tokens, cache, start):
        """Runs tokens int32[B, T] at positions start.. against a KV cache; returns (logits, new cache)."""
        h, cache = self.hidden(self.embed_tokens(tokens, start), cache, start)
        return self.logits(h), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return init_cache(self.cfg, batch, max_len, dtype)


def init_cache(cfg: TransformerConfig, batch: int, max_len: int, dtype=jnp.float32):
    """An empty KV cache: {"k", "v"}: [layers, B, max_len, Hkv, Dh]."""
    shape = (cfg.num_layers, batch, max_len, cfg.kv_heads, cfg.head_size)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def validate_attention(m) -> list[str]:
    """Problems with the attention keys of a config.model (num_heads, num_kv_heads, head sizes)."""
    p = []
    if m.num_heads >= 1 and m.num_kv_heads and m.num_heads % m.num_kv_heads:
        p.append(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    head_dim = m.get("head_dim", 0)
    if m.num_heads >= 1 and not head_dim and m.d_model % m.num_heads:
        p.append(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; set model.head_dim")
    head_size = head_dim or m.d_model // max(m.num_heads, 1)
    if m.get("positional", "rope") == "rope" and head_size % 2:
        p.append(f"rotary embeddings need an even head size, got {head_size}")
    if m.get("attention_impl", "xla") not in attention.IMPLS:
        p.append(f"model.attention_impl={m.attention_impl!r} is not one of {list(attention.IMPLS)}")
    return p


def validate(m) -> list[str]:
    """Problems with a transformer config.model, as one-line messages (empty when fine)."""
    p = []
    for key in ("d_model", "num_layers", "num_heads", "d_mlp", "scan_unroll"):
        if m[key] < 1:
            p.append(f"model.{key}={m[key]} must be >= 1")
    for key in ("vocab_size", "max_len", "num_kv_heads", "head_dim"):
        if m[key] < 0:
            p.append(f"model.{key}={m[key]} must be >= 0")
    for key, choices in (("activation", layers.ACTIVATIONS), ("norm", layers.NORMS),
                         ("positional", ("rope", "learned", "none")), ("dtype", ("float32", "bfloat16")),
                         ("remat", layers.REMAT_POLICIES)):
        if m[key] not in choices:
            p.append(f"model.{key}={m[key]!r} is not one of {list(choices)}")
    return p + validate_attention(m)
