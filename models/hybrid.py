"""Language models of Mamba-2 layers, alone (`ssd`) or interleaved with attention (`hybrid`, as Jamba),
over the LM skeleton (models/lm.py): a period of layers, repeated num_layers / len(pattern) times.

    S layer:  x += Mamba2(norm(x))                               (models/mamba2.py)
    M layer:  x += Mamba1(norm(x))                               (models/mamba1.py: the selective scan S6)
    A layer:  x += Attn(norm(x)); x += Mlp(norm(x))              (models/blocks.Block)
    E layer:  x += Attn(norm(x)); x += MoE(norm(x))              (the Block with the MoE FFN, models/moe.py)
    C layer:  x += conv_W(norm(x)) W_o                           (short depthwise causal conv, width conv_width)
    L layer:  x += LinAttn(norm(x)); x += Mlp(norm(x))           (linear attention, models/linear_attention.py)

The C layer is the short convolution Zoology (Arora et al. 2023) puts in front of every mixer on MQAR:
it hands each position its few predecessors, the "previous token" half of an induction circuit that a
pure attention stack must otherwise discover by itself (pattern "CA" = attention with it).

Attention layers take every attention / MLP key of the LM config (models/lm_config.py), MoE layers the
MoE keys (models/moe.MoEOptions). Decoding keeps, per layer, a constant-size state for S, C and L layers
(conv inputs and the SSM state) and the attention kind's cache for A and E layers; `decode` equals the
full pass at the same positions.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from models import blocks, layers, lm, mamba1, mamba2, moe, quantization
from data.config_fields import field
from models.layers import ACTIVATIONS
from models.lm_config import LMConfig

LAYER_KINDS = "SMAECL"


@dataclasses.dataclass(frozen=True)
class HybridConfig(moe.MoEOptions, mamba1.Mamba1Options, mamba2.Mamba2Options, LMConfig):
    """The LM keys, Mamba-2's and Mamba-1's, the MoE FFN's (for E layers) and the layer pattern."""

    name: str = "hybrid"
    num_layers: int = field(4, min=1)
    layer_pattern: str = "SSSA"  # S: Mamba-2, M: Mamba-1, A: attention + MLP, E: attention + MoE, C: short conv, L: linear attention
    activation: str = field("swiglu", choices=ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class SSDConfig(HybridConfig):
    """`ssd`: a pure Mamba-2 stack (the hybrid with every layer S)."""

    name: str = "ssd"
    layer_pattern: str = "S"


@dataclasses.dataclass(frozen=True)
class MambaConfig(HybridConfig):
    """`mamba`: a pure Mamba-1 stack (the hybrid with every layer M; the paper's expand 2, state 16)."""

    name: str = "mamba"
    layer_pattern: str = "M"
    ssm_state: int = field(16, min=1)


def _no_key_mask(key_mask):
    if key_mask is not None:
        raise ValueError("key masks (left padding) need attention layers; Mamba-2 and conv layers have none")


class MambaLayer(nn.Module):
    """x += Mamba(norm(x)) (version 2: Mamba-2, 1: Mamba-1), with the (conv, ssm) state in and out; None in means a
    fresh start."""

    cfg: HybridConfig
    version: int = 2

    @nn.compact
    def __call__(self, x, state, start, key_mask=None, segments=None):
        del start  # the state carries position
        _no_key_mask(key_mask)
        fresh = state is None
        if fresh:
            state = self.init_cache(self.cfg, x.shape[0], 0, version=self.version)
        mixer = mamba2.Mamba2 if self.version == 2 else mamba1.Mamba1
        h, state = mixer(self.cfg, name="mixer")(layers.Norm(self.cfg.norm, x.dtype, "norm", self.cfg.norm_eps)(x), state,
                                                 segments)
        if self.is_mutable_collection("intermediates"):  # capture only: the state after the sequence
            layers.sow_site(self, "ssm_state", state["ssm"])
        h = layers.sow_site(self, "mixer_out", h)
        x = nn.with_logical_constraint(x + layers.dropout(self, h, self.cfg.residual_dropout), blocks.ACTIVATION)
        x = layers.sow_site(self, "residual", x)
        return x, None if fresh else state

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32, version: int = 2) -> dict:
        del max_len
        return (mamba2 if version == 2 else mamba1).init_state(cfg, batch, dtype)


class ShortConvLayer(nn.Module):
    """x += conv_W(norm(x)) W_o, with the last W-1 normed inputs as its state; None in means a fresh start."""

    cfg: HybridConfig

    @nn.compact
    def __call__(self, x, state, start, key_mask=None, segments=None):
        del start
        _no_key_mask(key_mask)
        cfg, dtype = self.cfg, x.dtype
        fresh = state is None
        if fresh:
            state = self.init_cache(cfg, x.shape[0], 0, dtype)
        kernel = self.param("conv_kernel", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.conv_width**-0.5), (None, "embed")), (cfg.conv_width, cfg.d_model))
        bias = self.param("conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (cfg.d_model,))
        h, conv_state = mamba2.causal_conv(layers.Norm(cfg.norm, dtype, "norm", cfg.norm_eps)(x), state["conv"],
                                           kernel.astype(dtype), bias.astype(dtype), segments)
        w_out = self.param("out_proj", layers.dense_init(None, "embed"), (cfg.d_model, cfg.d_model))
        h = (h.reshape(-1, cfg.d_model) @ w_out.astype(dtype)).reshape(x.shape)
        h = layers.sow_site(self, "mixer_out", h)
        x = nn.with_logical_constraint(x + h, blocks.ACTIVATION)
        x = layers.sow_site(self, "residual", x)
        return x, None if fresh else {"conv": conv_state.astype(state["conv"].dtype)}

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        del max_len
        return {"conv": jnp.zeros((batch, cfg.conv_width - 1, cfg.d_model), dtype)}


LAYERS = {  # pattern letter -> (name suffix, unit, keyword arguments)
    "S": ("ssm", MambaLayer, ()),
    "M": ("mamba1", MambaLayer, (("version", 1),)),
    "A": ("attention", blocks.Block, ()),
    "E": ("moe", blocks.Block, (("ffn", "moe"),)),
    "C": ("conv", ShortConvLayer, ()),
    "L": ("linear_attention", blocks.Block, (("attention", "linear"),)),
}


class HybridLM(lm.LM):
    cfg: HybridConfig

    stack_name = "periods"

    def unit(self):
        members = tuple((f"layer_{i}_{LAYERS[kind][0]}", *LAYERS[kind][1:])
                        for i, kind in enumerate(self.cfg.layer_pattern))
        return blocks.Period, {"members": members}

    @property
    def num_units(self) -> int:
        return self.cfg.num_layers // len(self.cfg.layer_pattern)


def validate(m) -> list[str]:
    """Cross-field problems of a `ssd` / `hybrid` config.model (each key's range is declared with it)."""
    p = []
    pattern = m.layer_pattern
    if not pattern or set(pattern) - set(LAYER_KINDS):
        p.append(f"model.layer_pattern={pattern!r} must be a non-empty string of S (Mamba-2), M (Mamba-1), A (attention), "
                 "E (attention + MoE), C (short conv) and L (linear attention)")
    elif m.num_layers % len(pattern):
        p.append(f"model.num_layers={m.num_layers} must be a multiple of len(model.layer_pattern={pattern!r})")
    if m.bitnet and set(pattern) - {"A"}:
        p.append(f"model.bitnet=True quantises attention blocks only; model.layer_pattern={pattern!r} has other "
                 "layers (use 'A' layers, or model.name='transformer')")
    quantized = quantization.validate(m)
    p += quantized
    if m.quantization and not quantized and set(pattern) - set("SAE"):
        p.append(f"model.quantization={m.quantization!r} covers Mamba-2, attention and MoE layers (S, A, E); "
                 f"model.layer_pattern={pattern!r} has others")
    if "S" not in pattern:  # the Mamba-2 keys below are read by S layers only
        pass
    elif (m.expand * m.d_model) % m.ssm_head_dim:
        p.append(f"model.expand * model.d_model = {m.expand * m.d_model} is not divisible by "
                 f"model.ssm_head_dim={m.ssm_head_dim}")
    elif (m.expand * m.d_model // m.ssm_head_dim) % m.ssm_groups:
        p.append(f"model.ssm_groups={m.ssm_groups} must divide the {m.expand * m.d_model // m.ssm_head_dim} SSM heads")
    if m.ssd_impl == "pallas" and m.chunk_size and (m.chunk_size < 16 or m.chunk_size & (m.chunk_size - 1)):
        p.append(f"model.chunk_size={m.chunk_size} must be a power of two >= 16 for model.ssd_impl='pallas'")
    if set(pattern) & set("AE"):
        p += blocks.validate_attention(m) + blocks.validate_ffn(m)
    if "L" in pattern:
        p += blocks.validate_attention(m, "linear")
    if "E" in pattern:
        p += moe.validate(m)
    return p
