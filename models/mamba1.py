"""The Mamba-1 mixer (Gu & Dao 2023): the selective scan S6, gated and convolved, with constant-state decoding.

    x, z   = in_proj(u)                                   d_inner = expand * d_model each
    x      = silu(causal_conv1d(x))                       depthwise, width conv_width
    dt_r, B, C = x_proj(x)                                dt_r [dt_rank], B, C [N]: input-dependent
    dt     = softplus(dt_proj(dt_r))                      [B, L, d_inner]: a step per channel
    A      = -exp(A_log)                                  [d_inner, N]: diagonal, per channel (S4D-real init A_n = -(n+1))
    h_t    = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t       h: [d_inner, N] (zero-order hold for A, Euler for B)
    y_t    = h_t C_t + D * x_t
    out    = out_proj(y * silu(z))

Unlike Mamba-2's scalar decay per head (models/ssd.py), each (channel, state) pair decays at its own rate, so the
training form is a parallel prefix over (log decay, state) pairs, (a1, h1) . (a2, h2) = (a1 + a2, exp(a2) h1 + h2),
with [B, L, d_inner, N] states; decoding one token is the recurrence itself. `mamba1_scan="sequential"` trains
through that recurrence instead (a `lax.scan` over positions, [B, d_inner, N] per step): 2.2-3.5x faster forward +
backward than the parallel prefix on a 2-core CPU (scripts/benchmarks/bench_mixers.py, docs/benchmarks.md), where the prefix's
log L passes over [B, L, d_inner, N] arrays are memory-bound. `__call__(u, state)` runs new positions
after a state {"conv": [B, W-1, d_inner], "ssm": [B, d_inner, N]} and returns the new one: its size does not grow with
the length. The parameter names and layouts are `transformers`' MambaMixer's (experiments/import_hf.py).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from data.config_fields import field
from models import layers, mamba2, packing
from models.mamba2 import causal_conv


@dataclasses.dataclass(frozen=True)
class Mamba1Options:
    """Mamba-1's own keys (it shares expand, ssm_state, conv_width, dt_min / dt_max / dt_floor with Mamba-2's)."""
    dt_rank: int = field(0, min=0)  # 0: ceil(d_model / 16), the paper's
    mamba1_bias: bool = False  # biases on in_proj and out_proj (transformers' use_bias)
    mamba1_scan: str = field("associative_scan", choices=("associative_scan", "sequential"))  # the training form

    @property
    def mamba1_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)


def init_state(cfg, batch: int, dtype=jnp.float32) -> dict:
    return {"conv": jnp.zeros((batch, cfg.conv_width - 1, cfg.d_inner), dtype),
            "ssm": jnp.zeros((batch, cfg.d_inner, cfg.ssm_state), jnp.float32)}


def selective_scan(x, dt, a, b, c, initial_state, opens=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = h_t C_t as a parallel prefix: x, dt [B, L, Di], a [Di, N],
    b, c [B, L, N], initial_state [B, Di, N] -> (y [B, L, Di], final state). opens: None, or bool [B, L]: the state
    is forgotten there (a packed document's first token, models/packing.py)."""
    log_decay = dt[..., None] * a  # [B, L, Di, N]
    if opens is not None:
        log_decay = jnp.where(opens[..., None, None], packing.RESET, log_decay)
    inputs = (dt * x)[..., None] * b[:, :, None, :]
    inputs = inputs.at[:, 0].add(jnp.exp(log_decay[:, 0]) * initial_state)

    def combine(earlier, later):
        (a1, h1), (a2, h2) = earlier, later
        return a1 + a2, jnp.exp(a2) * h1 + h2

    _, states = jax.lax.associative_scan(combine, (log_decay, inputs), axis=1)
    return jnp.einsum("bldn,bln->bld", states, c), states[:, -1]


def selective_scan_sequential(x, dt, a, b, c, initial_state, opens=None):
    """selective_scan's arguments and results, one position at a time (`lax.scan` of selective_step)."""
    keep = jnp.ones(x.shape[:2], x.dtype) if opens is None else 1.0 - opens.astype(x.dtype)

    def step(state, inputs):
        *inputs, keep_t = inputs
        y, state = selective_step(*inputs[:2], a, *inputs[2:], state * keep_t[:, None, None])
        return state, y

    final, ys = jax.lax.scan(step, initial_state, tuple(t.swapaxes(0, 1) for t in (x, dt, b, c, keep)))
    return ys.swapaxes(0, 1), final


def selective_step(x, dt, a, b, c, state):
    """One position of the recurrence (decoding): x, dt [B, Di], b, c [B, N], state [B, Di, N]."""
    state = jnp.exp(dt[..., None] * a) * state + (dt * x)[..., None] * b[:, None, :]
    return jnp.einsum("bdn,bn->bd", state, c), state


def _a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real: A_n = -(n + 1) for every channel, the diagonal HiPPO-LegS approximation."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=dtype)), shape)


class Mamba1(nn.Module):
    cfg: object  # Mamba1Options with the Mamba-2 keys and d_model

    @nn.compact
    def __call__(self, u, state, segments=None):  # u [B, L, D]; state: init_state(...) or the previous call's
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        batch, length, width = u.shape
        inner, rank, n = cfg.d_inner, cfg.mamba1_dt_rank, cfg.ssm_state
        dense = lambda name, shape, axes: self.param(name, layers.dense_init(*axes), shape).astype(dtype)  # noqa: E731
        bias = lambda name, size: (self.param(name, nn.with_logical_partitioning(  # noqa: E731
            nn.initializers.zeros, (None,)), (size,)).astype(dtype) if cfg.mamba1_bias else 0.0)
        projected = (u.reshape(-1, width) @ dense("in_proj", (width, 2 * inner), ("embed", None))
                     + bias("in_proj_bias", 2 * inner)).reshape(batch, length, -1)
        x, z = jnp.split(projected, 2, axis=-1)

        conv_kernel = self.param("conv_kernel", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.conv_width**-0.5), (None, None)), (cfg.conv_width, inner))
        conv_bias = self.param("conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (inner,))
        x, conv_state = causal_conv(x, state["conv"], conv_kernel.astype(dtype), conv_bias.astype(dtype), segments)
        x = nn.silu(x)

        dt_low, b, c = jnp.split(x.reshape(-1, inner) @ dense("x_proj", (inner, rank + 2 * n), (None, None)),
                                 [rank, rank + n], axis=-1)
        dt_proj = self.param("dt_proj", nn.with_logical_partitioning(
            _uniform(rank**-0.5), (None, None)), (rank, inner))
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(mamba2.dt_bias_init(cfg), (None,)), (inner,))
        dt = jax.nn.softplus((dt_low @ dt_proj.astype(dtype)).astype(jnp.float32) + dt_bias).reshape(batch, length, inner)
        a = -jnp.exp(self.param("A_log", nn.with_logical_partitioning(_a_log_init, (None, None)), (inner, n)))
        skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (inner,))

        x32 = x.astype(jnp.float32)
        b, c = (t.reshape(batch, length, n).astype(jnp.float32) for t in (b, c))
        if length == 1:
            y, ssm_state = selective_step(x32[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], state["ssm"])
            y = y[:, None]
        else:
            scan = selective_scan_sequential if cfg.mamba1_scan == "sequential" else selective_scan
            y, ssm_state = scan(x32, dt, a, b, c, state["ssm"], None if segments is None else packing.starts(segments))
        y = ((y + skip * x32).astype(dtype) * nn.silu(z)).reshape(-1, inner)
        out = y @ dense("out_proj", (inner, width), (None, "embed")) + bias("out_proj_bias", width)
        return out.reshape(batch, length, width), {"conv": conv_state.astype(state["conv"].dtype), "ssm": ssm_state}


def _uniform(limit: float):
    """U(-limit, limit) (Mamba's dt_proj init at dt_scale 1)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    return init

