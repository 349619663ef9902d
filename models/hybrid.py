"""Language models of Mamba-2 layers, alone (`ssd`) or interleaved with attention (`hybrid`, as Jamba).

    x_0 = E[tokens]
    S layer:  x += Mamba2(norm(x))                               (models/mamba2.py)
    A layer:  x += Attn(norm(x)); x += Mlp(norm(x))              (models/transformer.Block, RoPE)
    C layer:  x += conv_W(norm(x)) W_o                           (short depthwise causal conv, width conv_width)
    logits = norm(x_L) U

The C layer is the short convolution Zoology (Arora et al. 2023) puts in front of every mixer on MQAR:
it hands each position its few predecessors, the "previous token" half of an induction circuit that a
pure attention stack must otherwise discover by itself (pattern "CA" = attention with it).

`layer_pattern` ("S", "SSSA", ...) is one period of layers, repeated num_layers / len(pattern)
times with `nn.scan`. Decoding keeps, per layer, a constant-size state for S layers (conv inputs and
the SSM state) and a KV cache for A layers; `decode` equals the full pass at the same positions.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from models import layers, mamba2, transformer


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Every `config.model` key of `hybrid`; 0 means "derive it" where noted."""

    name: str = "hybrid"
    vocab_size: int = 0  # 0: the dataset's vocabulary size
    max_len: int = 0  # 0: the dataset's sequence length (bounds the KV cache of attention layers)
    d_model: int = 128
    num_layers: int = 4
    layer_pattern: str = "SSSA"  # S: Mamba-2, A: attention + MLP block, C: short conv; one period, repeated
    # Mamba-2 layers (paper defaults: expand 2, head_dim 64, state 128, conv 4)
    expand: int = 2
    ssm_head_dim: int = 64
    ssm_state: int = 128
    ssm_groups: int = 1
    conv_width: int = 4
    chunk_size: int = 0  # 0: the backend's best measured (models/mamba2.CHUNK_SIZES)
    ssd_impl: str = "chunked"  # chunked | associative_scan | sequential | pallas (kernels_pallas.ssd_chunked)
    # attention layers
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: num_heads
    d_mlp: int = 512
    activation: str = "swiglu"  # relu | gelu | swiglu
    rope_theta: float = 10000.0
    attention_impl: str = "xla"  # xla | pallas (kernels_pallas flash attention)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    tie_embeddings: bool = False
    dtype: str = "float32"
    remat: str = "none"  # none | full | dots

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def mamba(self) -> mamba2.Mamba2Config:
        return mamba2.Mamba2Config(d_model=self.d_model, expand=self.expand, head_dim=self.ssm_head_dim,
                                   state=self.ssm_state, groups=self.ssm_groups, conv_width=self.conv_width,
                                   chunk_size=self.chunk_size, ssd_impl=self.ssd_impl, dtype=self.dtype)

    def attention(self) -> transformer.TransformerConfig:
        return transformer.TransformerConfig(
            vocab_size=self.vocab_size, max_len=self.max_len, d_model=self.d_model, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, d_mlp=self.d_mlp, activation=self.activation, norm=self.norm,
            positional="rope", rope_theta=self.rope_theta, dtype=self.dtype, attention_impl=self.attention_impl)


@dataclasses.dataclass(frozen=True)
class SSDConfig(HybridConfig):
    """`ssd`: a pure Mamba-2 stack (the hybrid with every layer S)."""

    name: str = "ssd"
    layer_pattern: str = "S"


class MambaLayer(nn.Module):
    """x += Mamba2(norm(x)), with the (conv, ssm) state in and out; None in means a fresh start."""

    cfg: HybridConfig

    @nn.compact
    def __call__(self, x, state, start):
        del start  # the state carries position
        fresh = state is None
        if fresh:
            state = mamba2.init_state(self.cfg.mamba(), x.shape[0])
        h, state = mamba2.Mamba2(self.cfg.mamba(), name="mixer")(layers.Norm(self.cfg.norm, x.dtype, "norm")(x), state)
        x = nn.with_logical_constraint(x + h, ("activation_batch", "activation_length", "activation_embed"))
        return x, None if fresh else state


class ShortConvLayer(nn.Module):
    """x += conv_W(norm(x)) W_o, with the last W-1 normed inputs as its state; None in means a fresh start."""

    cfg: HybridConfig

    @nn.compact
    def __call__(self, x, state, start):
        del start
        cfg, dtype = self.cfg, x.dtype
        fresh = state is None
        if fresh:
            state = init_short_conv_state(cfg, x.shape[0], dtype)
        kernel = self.param("conv_kernel", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.conv_width**-0.5), (None, "embed")), (cfg.conv_width, cfg.d_model))
        bias = self.param("conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (cfg.d_model,))
        h, conv_state = mamba2.causal_conv(layers.Norm(cfg.norm, dtype, "norm")(x), state["conv"],
                                           kernel.astype(dtype), bias.astype(dtype))
        w_out = self.param("out_proj", layers.dense_init(None, "embed"), (cfg.d_model, cfg.d_model))
        x = x + (h.reshape(-1, cfg.d_model) @ w_out.astype(dtype)).reshape(x.shape)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None if fresh else {"conv": conv_state.astype(state["conv"].dtype)}


def init_short_conv_state(cfg: HybridConfig, batch: int, dtype=jnp.float32) -> dict:
    return {"conv": jnp.zeros((batch, cfg.conv_width - 1, cfg.d_model), dtype)}


class Period(nn.Module):
    """One period of the layer pattern; the signature fits nn.scan: (x, per-period caches, start)."""

    cfg: HybridConfig

    @nn.compact
    def __call__(self, x, caches, start):
        new_caches = {}
        for i, kind in enumerate(self.cfg.layer_pattern):
            cache = None if caches is None else caches[str(i)]
            if kind == "S":
                x, cache = MambaLayer(self.cfg, name=f"layer_{i}_ssm")(x, cache, start)
            elif kind == "C":
                x, cache = ShortConvLayer(self.cfg, name=f"layer_{i}_conv")(x, cache, start)
            else:
                x, cache = transformer.Block(self.cfg.attention(), name=f"layer_{i}_attention")(x, cache, start)
            new_caches[str(i)] = cache
        return x, None if caches is None else new_caches


class HybridLM(nn.Module):
    cfg: HybridConfig

    def setup(self):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        self.embed = layers.token_embedding(cfg.vocab_size, cfg.d_model, dtype)
        period = Period
        if cfg.remat != "none":
            period = nn.remat(Period, policy=layers.remat_policy(cfg.remat), prevent_cse=False)
        self.periods = nn.scan(
            period, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(0, nn.broadcast),
            length=cfg.num_layers // len(cfg.layer_pattern), metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="periods")
        self.final_norm = layers.Norm(cfg.norm, dtype, "final_norm")
        self.unembed = None if cfg.tie_embeddings else layers.unembedding(cfg.vocab_size, dtype)

    def hidden(self, tokens, cache=None, start=0):
        x = nn.with_logical_constraint(self.embed(tokens), ("activation_batch", "activation_length", "activation_embed"))
        x, cache = self.periods(x, cache, start)
        return self.final_norm(x), cache

    def logits(self, h):
        return layers.vocab_logits(h, self.embed, self.unembed)

    def __call__(self, tokens):
        """int32[B, L] -> float32 logits [B, L, V]."""
        return self.logits(self.hidden(tokens)[0])

    def decode(self, tokens, cache, start):
        """Runs tokens int32[B, T] at positions start.. after `cache`; returns (logits, new cache)."""
        h, cache = self.hidden(tokens, cache, start)
        return self.logits(h), cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return init_cache(self.cfg, batch, max_len, dtype)


def init_cache(cfg: HybridConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Per pattern position i, stacked over periods: Mamba state for S, the last inputs for C, a KV cache for A."""
    periods = cfg.num_layers // len(cfg.layer_pattern)
    attention = cfg.attention()
    cache = {}
    for i, kind in enumerate(cfg.layer_pattern):
        if kind == "S":
            one = mamba2.init_state(cfg.mamba(), batch, dtype)
        elif kind == "C":
            one = init_short_conv_state(cfg, batch, dtype)
        else:
            shape = (batch, max_len, attention.kv_heads, attention.head_size)
            one = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        cache[str(i)] = {k: jnp.broadcast_to(v, (periods, *v.shape)) for k, v in one.items()}
    return cache


def validate(m) -> list[str]:
    """Problems with a `ssd` / `hybrid` config.model, as one-line messages."""
    p = []
    pattern = m.layer_pattern
    if not pattern or set(pattern) - {"S", "A", "C"}:
        p.append(f"model.layer_pattern={pattern!r} must be a non-empty string of S (Mamba-2), A (attention) "
                 "and C (short conv)")
    elif m.num_layers % len(pattern):
        p.append(f"model.num_layers={m.num_layers} must be a multiple of len(model.layer_pattern={pattern!r})")
    for key in ("d_model", "num_layers", "expand", "ssm_head_dim", "ssm_state", "ssm_groups", "conv_width",
                "num_heads", "d_mlp"):
        if m[key] < 1:
            p.append(f"model.{key}={m[key]} must be >= 1")
    if m.d_model >= 1 and m.expand >= 1 and m.ssm_head_dim >= 1 and (m.expand * m.d_model) % m.ssm_head_dim:
        p.append(f"model.expand * model.d_model = {m.expand * m.d_model} is not divisible by "
                 f"model.ssm_head_dim={m.ssm_head_dim}")
    elif m.ssm_groups >= 1 and m.ssm_head_dim >= 1 and (m.expand * m.d_model // m.ssm_head_dim) % m.ssm_groups:
        p.append(f"model.ssm_groups={m.ssm_groups} must divide the {m.expand * m.d_model // m.ssm_head_dim} SSM heads")
    if m.chunk_size < 0:
        p.append(f"model.chunk_size={m.chunk_size} must be >= 1, or 0 for the backend's best")
    if m.ssd_impl not in mamba2.SSD_IMPLS:
        p.append(f"model.ssd_impl={m.ssd_impl!r} is not one of {list(mamba2.SSD_IMPLS)}")
    elif m.ssd_impl == "pallas" and m.chunk_size and (m.chunk_size < 16 or m.chunk_size & (m.chunk_size - 1)):
        p.append(f"model.chunk_size={m.chunk_size} must be a power of two >= 16 for model.ssd_impl='pallas'")
    if "A" in pattern:
        p += transformer.validate_attention(m)
    for key, choices in (("activation", layers.ACTIVATIONS), ("norm", ("rmsnorm", "layernorm")),
                         ("dtype", ("float32", "bfloat16")), ("remat", layers.REMAT_POLICIES)):
        if m[key] not in choices:
            p.append(f"model.{key}={m[key]!r} is not one of {list(choices)}")
    return p
