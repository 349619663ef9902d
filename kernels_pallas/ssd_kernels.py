"""Mamba-2's chunked SSD with Pallas kernels for the per-chunk steps (docs/interfaces.md).

Same arguments and result as `models.ssd.ssd_chunked`: x [B, L, H, P] (already times dt),
a [B, L, H] (A * dt <= 0), b, c [B, L, G, N] (head h reads group h // (H / G)); returns
(y [B, L, H, P], final state [B, H, P, N]) in float32. Within chunk k of T positions, with
A_t = a_0 + ... + a_t the cumulative decay inside the chunk (t, s in the chunk):

    1. chunk state (Pallas):   S_k = sum_s exp(A_{T-1} - A_s) outer(x_s, b_s)                   [P, N]
    2. state passing (a scan): H_{k+1} = exp(A_{T-1}) H_k + S_k,   H_0 = initial_state
    3. chunk output (Pallas):  y_t = sum_{s<=t} (c_t . b_s) exp(A_t - A_s) x_s + exp(A_t) H_k c_t

Each Pallas program handles one (chunk, batch, head): two [T, T]-sized matmuls and two with the
state, all in one chunk's working set. Step 2 stays a `lax.scan` over chunks (L / T sequential
steps of elementwise work), as its interface allows. The kernels are differentiable: each has a custom
VJP that recomputes its chunk-local step in plain JAX and differentiates that (memory per chunk,
no [L, L] matrices).

The within-chunk decays are differences of cumulative sums, as in the Triton kernels of
state-spaces/mamba; inside one chunk the sums stay small enough that float32 keeps them to
about 1e-6 (models/ssd.py's segsum, which avoids the difference, is the reference).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class _Plan:
    chunk: int
    heads_per_group: int
    interpret: bool


def _call(kernel, plan: _Plan, grid, in_specs, out_spec, out_shape, name):
    compiler_params = None
    if not plan.interpret and jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        compiler_params = pl_triton.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), out_shape=out_shape, grid=grid, in_specs=in_specs,
        out_specs=out_spec, interpret=plan.interpret, compiler_params=compiler_params, name=name)


def _specs(plan: _Plan, head_dim, state_dim):
    """Blocks of one (chunk i, batch b, head h): x [T, P], b or c [T, N], a row [T], a state [P, N]."""
    chunk, per_group = plan.chunk, plan.heads_per_group
    return {
        "x": pl.BlockSpec((None, chunk, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        "bc": pl.BlockSpec((None, chunk, None, state_dim), lambda i, b, h: (b, i, h // per_group, 0)),
        "row": pl.BlockSpec((None, None, chunk), lambda i, b, h: (b, h, i)),
        "state": pl.BlockSpec((None, None, None, head_dim, state_dim), lambda i, b, h: (b, i, h, 0, 0)),
    }


# ----------------------------------------------------------------------------------------------
# 1. Chunk states.


def _chunk_state_kernel(x_ref, decay_to_end_ref, b_ref, state_ref, *, plan: _Plan):
    del plan
    weighted = x_ref[...] * decay_to_end_ref[...][:, None]  # [T, P]
    state_ref[...] = jnp.dot(weighted.T, b_ref[...], preferred_element_type=jnp.float32)


def _chunk_states_reference(x, decay_to_end, b, plan: _Plan):
    """Plain JAX of the kernel: [B, Lp, H, P], [B, H, Lp], [B, Lp, G, N] -> [B, chunks, H, P, N]."""
    batch, length, heads, head_dim = x.shape
    chunks = length // plan.chunk
    x = x.reshape(batch, chunks, plan.chunk, heads, head_dim)
    decay = decay_to_end.reshape(batch, heads, chunks, plan.chunk)
    b = jnp.repeat(b, plan.heads_per_group, axis=2).reshape(batch, chunks, plan.chunk, heads, -1)
    return jnp.einsum("bcthp,bhct,bcthn->bchpn", x, decay, b, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunk_states(x, decay_to_end, b, plan: _Plan):
    batch, length, heads, head_dim = x.shape
    state_dim, chunks = b.shape[-1], length // plan.chunk
    specs = _specs(plan, head_dim, state_dim)
    out_shape = jax.ShapeDtypeStruct((batch, chunks, heads, head_dim, state_dim), jnp.float32)
    return _call(_chunk_state_kernel, plan, (chunks, batch, heads), [specs["x"], specs["row"], specs["bc"]],
                 specs["state"], out_shape, "ssd_chunk_state")(x, decay_to_end, b)


def _chunk_states_fwd(x, decay_to_end, b, plan):
    return _chunk_states(x, decay_to_end, b, plan), (x, decay_to_end, b)


def _chunk_states_bwd(plan, residuals, d_states):
    return jax.vjp(lambda *args: _chunk_states_reference(*args, plan), *residuals)[1](d_states)


_chunk_states.defvjp(_chunk_states_fwd, _chunk_states_bwd)


# ----------------------------------------------------------------------------------------------
# 3. Chunk outputs.


def _chunk_output_kernel(x_ref, cum_ref, b_ref, c_ref, state_ref, y_ref, *, plan: _Plan):
    cum = cum_ref[...]  # [T]: A_t
    c = c_ref[...]
    shape = (plan.chunk, plan.chunk)
    causal = jax.lax.broadcasted_iota(jnp.int32, shape, 0) >= jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    decay = jnp.exp(jnp.where(causal, cum[:, None] - cum[None, :], -jnp.inf))  # exp(A_t - A_s), s <= t
    scores = jnp.dot(c, b_ref[...].T, preferred_element_type=jnp.float32) * decay  # [T, T]
    within = jnp.dot(scores, x_ref[...], preferred_element_type=jnp.float32)  # [T, P]
    entering = jnp.dot(c, state_ref[...].T, preferred_element_type=jnp.float32)  # [T, P]: H_k c_t
    y_ref[...] = within + jnp.exp(cum)[:, None] * entering


def _chunk_outputs_reference(x, cum, b, c, entering, plan: _Plan):
    """Plain JAX of the kernel: -> y [B, Lp, H, P]."""
    batch, length, heads, head_dim = x.shape
    chunks, chunk = length // plan.chunk, plan.chunk
    x = x.reshape(batch, chunks, chunk, heads, head_dim)
    cum = cum.reshape(batch, heads, chunks, chunk)
    b, c = (jnp.repeat(t, plan.heads_per_group, axis=2).reshape(batch, chunks, chunk, heads, -1) for t in (b, c))
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))  # [B, H, C, T, S]
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bcthn,bcshn->bhcts", c, b, precision=hi) * decay
    within = jnp.einsum("bhcts,bcshp->bcthp", scores, x, precision=hi)
    from_state = jnp.einsum("bcthn,bchpn,bhct->bcthp", c, entering, jnp.exp(cum), precision=hi)
    return (within + from_state).reshape(batch, length, heads, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunk_outputs(x, cum, b, c, entering, plan: _Plan):
    batch, length, heads, head_dim = x.shape
    specs = _specs(plan, head_dim, b.shape[-1])
    out_shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    in_specs = [specs["x"], specs["row"], specs["bc"], specs["bc"], specs["state"]]
    return _call(_chunk_output_kernel, plan, (length // plan.chunk, batch, heads), in_specs, specs["x"],
                 out_shape, "ssd_chunk_output")(x, cum, b, c, entering)


def _chunk_outputs_fwd(x, cum, b, c, entering, plan):
    return _chunk_outputs(x, cum, b, c, entering, plan), (x, cum, b, c, entering)


def _chunk_outputs_bwd(plan, residuals, d_y):
    return jax.vjp(lambda *args: _chunk_outputs_reference(*args, plan), *residuals)[1](d_y)


_chunk_outputs.defvjp(_chunk_outputs_fwd, _chunk_outputs_bwd)


# ----------------------------------------------------------------------------------------------
# 2. State passing, and the whole algorithm.


def _pass_states(chunk_states, chunk_decay, initial_state):
    """H_{k+1} = chunk_decay_k H_k + S_k over chunks: (states entering each chunk, final state)."""

    def step(state, inputs):
        chunk_state, decay = inputs
        return decay[..., None, None] * state + chunk_state, state

    final, entering = jax.lax.scan(step, initial_state, (jnp.moveaxis(chunk_states, 1, 0),
                                                         jnp.moveaxis(chunk_decay, 1, 0)))
    return jnp.moveaxis(entering, 0, 1), final


def ssd_chunked(x, a, b, c, *, chunk_size=64, initial_state=None, interpret=None):
    """The chunked SSD with Pallas chunk kernels: (y [B, L, H, P], final state [B, H, P, N]), float32.

    chunk_size: positions per chunk (a power of two >= 16, as the GPU lowering needs).
    interpret: None runs the kernels in interpret mode on CPU and compiled elsewhere.
    """
    batch, length, heads, head_dim = x.shape
    groups, state_dim = b.shape[2], b.shape[3]
    if heads % groups:
        raise ValueError(f"heads={heads} is not a multiple of groups={groups}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size} must be a power of two >= 16")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    plan = _Plan(chunk=chunk_size, heads_per_group=heads // groups, interpret=bool(interpret))
    x, a, b, c = (t.astype(jnp.float32) for t in (x, a, b, c))
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, head_dim, state_dim), jnp.float32)
    # Pad to whole chunks with a = 0 and x = b = c = 0: the padding leaves the state unchanged.
    pad = -length % chunk_size
    x, a, b, c = (jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (x, a, b, c))
    chunks = (length + pad) // chunk_size
    cum = jnp.cumsum(a.reshape(batch, chunks, chunk_size, heads), axis=2)  # A_t within each chunk
    chunk_total = cum[:, :, -1]  # [B, chunks, H]
    cum_rows = cum.transpose(0, 3, 1, 2).reshape(batch, heads, chunks * chunk_size)  # [B, H, Lp]
    decay_to_end = jnp.exp(chunk_total.transpose(0, 2, 1)[..., None] -
                           cum.transpose(0, 3, 1, 2)).reshape(cum_rows.shape)
    chunk_states = _chunk_states(x, decay_to_end, b, plan)
    entering, final = _pass_states(chunk_states, jnp.exp(chunk_total), initial_state.astype(jnp.float32))
    y = _chunk_outputs(x, cum_rows, b, c, entering, plan)
    return y[:, :length], final
