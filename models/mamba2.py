"""The Mamba-2 mixer (Dao & Gu 2024): a gated, convolved SSD layer, and its constant-state decoding.

    z, xBC, dt = in_proj(u)                          d_inner = expand * d_model, heads = d_inner / P
    x, B, C    = split(silu(causal_conv1d(xBC)))     depthwise, width 4, over x, B and C together
    dt         = clip(softplus(dt + dt_bias), dt_limit)       [B, L, H]
    A          = -exp(A_log)                                  [H]
    y, H_L     = SSD(x * dt, A * dt, B, C; H_0)               (models/ssd.py)
    out        = out_proj(rmsnorm_G((y + D * x) * silu(z)) * w)   (the gated RMSNorm, per group of channels)

`__call__(u, state)` runs any number of new positions after a state
{"conv": the last width-1 conv inputs [B, W-1, conv_dim], "ssm": H [B, heads, P, N]} and returns the
new state, so the full pass is `state = zeros` and decoding one token is the same call with L = 1
(the state's size does not grow with the sequence).

Parameters shard their `embed` dimension over `fsdp`; the mixer's inner dimensions stay replicated
over `tensor` (tensor parallelism of Mamba layers is not implemented).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels_pallas
from kernels_pallas import on_mesh
from models import layers, packing, ssd
from data.config_fields import field


def _pallas_chunked(x, a, b, c, *, chunk_size, initial_state):
    """kernels_pallas.ssd_chunked, run per batch shard of the active mesh."""
    kernel = functools.partial(kernels_pallas.ssd_chunked, chunk_size=chunk_size)
    return on_mesh.per_shard(lambda x, a, b, c, h: kernel(x, a, b, c, initial_state=h), x, a, b, c, initial_state,
                             num_outputs=2)


SSD_IMPLS = {
    "chunked": ssd.ssd_chunked,
    "pallas": _pallas_chunked,
    "associative_scan": ssd.ssd_associative_scan,
    "sequential": ssd.ssd_sequential,
}


# Chunk sizes by backend, from scripts/benchmarks/bench_ssd.py (docs/benchmarks.md): 32 was fastest on CPU forward
# and forward+backward at every length; GPU and TPU keep the paper's 64 until measured there.
CHUNK_SIZES = {"cpu": 32}


def chunk_size_for_backend() -> int:
    return CHUNK_SIZES.get(jax.default_backend(), 64)


@dataclasses.dataclass(frozen=True)
class Mamba2Options:
    """The Mamba-2 keys of a config.model (mixed into the families that have Mamba-2 layers, which
    supply d_model and dtype)."""

    expand: int = field(2, min=1)  # d_inner = expand * d_model
    ssm_head_dim: int = field(64, min=1)  # P
    ssm_state: int = field(128, min=1)  # N
    ssm_groups: int = field(1, min=1)  # G: heads share B and C within a group
    conv_width: int = field(4, min=1)
    chunk_size: int = field(0, min=0)  # 0: the backend's best measured (scripts/benchmarks/bench_ssd.py), CHUNK_SIZES
    ssd_impl: str = field("chunked", choices=tuple(SSD_IMPLS))  # chunked | associative_scan | sequential | pallas
    dt_min: float = field(1e-3, above=0)  # dt at initialisation is log-uniform in [dt_min, dt_max], >= dt_floor
    dt_max: float = field(0.1, above=0)
    dt_floor: float = field(1e-4, min=0)
    dt_limit_min: float = field(0.0, min=0)  # dt is clipped to [dt_limit_min, dt_limit_max] in every forward pass
    dt_limit_max: float = field(float("inf"), above=0)
    a_init_min: float = field(1.0, above=0)  # A = -exp(A_log) starts uniform in -[a_init_min, a_init_max]
    a_init_max: float = field(16.0, above=0)
    ssm_norm_eps: float = field(1e-5, above=0)  # the gated RMSNorm's epsilon (mamba_ssm's default)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def ssm_heads(self) -> int:
        return self.d_inner // self.ssm_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ssm_groups * self.ssm_state


def init_state(cfg: Mamba2Options, batch: int, dtype=jnp.float32) -> dict:
    return {"conv": jnp.zeros((batch, cfg.conv_width - 1, cfg.conv_dim), dtype),
            "ssm": jnp.zeros((batch, cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_state), jnp.float32)}


def dt_bias_init(cfg: Mamba2Options):
    """softplus^{-1}(dt), dt log-uniform in [dt_min, dt_max] and at least dt_floor (Mamba-1's dt_proj bias too)."""
    def init(key, shape, dtype=jnp.float32):
        log_dt = jax.random.uniform(key, shape, dtype, math.log(cfg.dt_min), math.log(cfg.dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), cfg.dt_floor)
        return dt + jnp.log(-jnp.expm1(-dt))  # softplus^{-1}(dt)
    return init


def _a_log_init(cfg: Mamba2Options):
    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, dtype, cfg.a_init_min, cfg.a_init_max))
    return init


def causal_conv(inputs, previous, kernel, bias, segments=None):
    """Depthwise causal conv of inputs [B, L, C] after the W-1 previous inputs [B, W-1, C]:
    out_t = bias + sum_k kernel[k] * padded[t + k]; returns (out [B, L, C], the last W-1 inputs).
    With packed rows (models/packing.py) the tap at lag W-1-k reads only t's own document."""
    width = kernel.shape[0]
    padded = jnp.concatenate([previous.astype(inputs.dtype), inputs], axis=1)  # [B, L + W - 1, C]
    length = inputs.shape[1]

    def tap(k):
        term = kernel[k] * padded[:, k:k + length]
        if segments is None:
            return term
        return term * packing.same_segment_at_lag(segments, width - 1 - k)[..., None].astype(term.dtype)

    out = bias + sum(tap(k) for k in range(width))
    return out, padded[:, length:]


def gated_rms_norm(y, z, scale, groups: int, eps: float):
    """mamba_ssm's RMSNormGated (norm after the gate): g = y * silu(z), normalised over each of `groups`
    equal slices of the channels, g / sqrt(mean_slice(g^2) + eps) * scale; y, z [B, L, C], scale [C]."""
    gated = y * nn.silu(z)
    grouped = gated.reshape(*gated.shape[:-1], groups, -1)
    variance = jnp.mean(jnp.square(grouped.astype(jnp.float32)), axis=-1, keepdims=True)
    return (grouped * jax.lax.rsqrt(variance + eps).astype(gated.dtype)).reshape(gated.shape) * scale


class Mamba2(nn.Module):
    cfg: Mamba2Options

    @nn.compact
    def __call__(self, u, state, segments=None):  # u [B, L, D]; state: init_state(...) or the previous call's
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        batch, length, _ = u.shape
        groups_state = cfg.ssm_groups * cfg.ssm_state
        w_in = self.param("in_proj", layers.dense_init("embed", None), (u.shape[-1], 2 * cfg.d_inner + 2 * groups_state
                                                                    + cfg.ssm_heads))
        layers.record_input(self, ("in_proj",), u.reshape(-1, u.shape[-1]))
        projected = layers.matmul(u.reshape(-1, u.shape[-1]), w_in.astype(dtype)).reshape(batch, length, -1)
        z, xbc, dt = jnp.split(projected, [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)

        conv_kernel = self.param("conv_kernel", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.conv_width**-0.5), (None, None)), (cfg.conv_width, cfg.conv_dim))
        conv_bias = self.param("conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (cfg.conv_dim,))
        xbc, conv_state = causal_conv(xbc, state["conv"], conv_kernel.astype(dtype), conv_bias.astype(dtype), segments)
        x, b, c = jnp.split(nn.silu(xbc), [cfg.d_inner, cfg.d_inner + groups_state], axis=-1)

        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(dt_bias_init(cfg), (None,)), (cfg.ssm_heads,))
        a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init(cfg), (None,)), (cfg.ssm_heads,))
        skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (cfg.ssm_heads,))
        dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + dt_bias), cfg.dt_limit_min, cfg.dt_limit_max)
        a = -jnp.exp(a_log)  # [H]

        x = x.reshape(batch, length, cfg.ssm_heads, cfg.ssm_head_dim).astype(jnp.float32)
        b = b.reshape(batch, length, cfg.ssm_groups, cfg.ssm_state)
        c = c.reshape(batch, length, cfg.ssm_groups, cfg.ssm_state)
        impl = "sequential" if length == 1 else cfg.ssd_impl  # one decoding step: the recurrence itself
        if segments is not None and impl == "pallas":
            raise ValueError(packing.PALLAS_SSD)
        scan = SSD_IMPLS[impl]
        if impl in ("chunked", "pallas"):
            scan = functools.partial(scan, chunk_size=cfg.chunk_size or chunk_size_for_backend())
        y, ssm_state = scan(x * dt[..., None], packing.reset_decay(a * dt, segments), b, c, initial_state=state["ssm"])
        y = (y + skip[:, None] * x).reshape(batch, length, cfg.d_inner).astype(dtype)

        norm_scale = self.param("norm", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (cfg.d_inner,))
        normed = gated_rms_norm(y, z, norm_scale.astype(dtype), cfg.ssm_groups, cfg.ssm_norm_eps)

        w_out = self.param("out_proj", layers.dense_init(None, "embed"), (cfg.d_inner, u.shape[-1]))
        layers.record_input(self, ("out_proj",), normed.reshape(-1, cfg.d_inner))
        out = layers.matmul(normed.reshape(-1, cfg.d_inner), w_out.astype(dtype)).reshape(batch, length, -1)
        return out, {"conv": conv_state.astype(state["conv"].dtype), "ssm": ssm_state}
