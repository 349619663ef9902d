"""Structured state space duality (Mamba-2, Dao & Gu 2024): one recurrence, three algorithms.

Per head (docs/interfaces.md; x already multiplied by dt, a = A * dt <= 0, head h reads group h // (H/G)):

    H_t = exp(a_t) * H_{t-1} + outer(x_t, b_t)          H: [P, N], H_{-1} = initial_state
    y_t = H_t @ c_t

Unrolled, y = M x with the lower-triangular "attention-like" matrix

    M[t, s] = (c_t . b_s) * exp(a_{s+1} + ... + a_t)      (s <= t)

- `ssd_sequential`: the recurrence, one `lax.scan` step per position (O(L) work, L serial steps).
- `ssd_associative_scan`: the same recurrence as a parallel prefix over pairs (decay, state) with
  (a1, S1) . (a2, S2) = (a1 + a2, exp(a2) S1 + S2)  (O(L log L) work, log L depth, [L, P, N] states).
- `ssd_chunked`: the paper's block decomposition of M into chunks of T positions, as a scan over
  chunks (like the Triton kernels' sequential state passing), each step:
    1. diagonal block: within the chunk, y = (C B^T * exp(segsum(a))) x   (quadratic, matmuls)
    2. chunk state: the state the chunk's inputs leave at its end
    3. state passing: H_leaving = exp(sum of the chunk's a) H_entering + chunk state
    4. state to output: each position reads H_entering, decayed to it
  (O(L T) work, L/T serial steps of matmuls; the working set is one chunk, which keeps it in
  cache where a fully vectorised form over all chunks falls out of it at a few thousand positions.)

All three take [B, L, ...] arrays of any length (the chunked form pads inside) and return
(y [B, L, H, P], final state [B, H, P, N]), computed in float32.
"""

import jax
import jax.numpy as jnp


def _heads_per_group(x, b):
    heads, groups = x.shape[2], b.shape[2]
    if heads % groups:
        raise ValueError(f"heads={heads} is not a multiple of groups={groups}")
    return heads // groups


def _expand_groups(b, heads):
    """[B, L, G, N] -> [B, L, H, N]: head h reads group h // (H / G)."""
    return jnp.repeat(b, heads // b.shape[2], axis=2)


def _compute_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 under jax_enable_x64


def _initial(x, b, initial_state):
    batch, _, heads, head_dim = x.shape
    if initial_state is None:
        return jnp.zeros((batch, heads, head_dim, b.shape[-1]), _compute_dtype(x))
    return initial_state.astype(_compute_dtype(x))


def _f32(*arrays):
    return [t.astype(_compute_dtype(arrays[0])) for t in arrays]


def ssd_sequential(x, a, b, c, *, initial_state=None):
    """The recurrence as a `lax.scan` over positions."""
    _heads_per_group(x, b)
    state0 = _initial(x, b, initial_state)
    x, a, b, c = _f32(x, a, b, c)
    b, c = _expand_groups(b, x.shape[2]), _expand_groups(c, x.shape[2])

    def step(state, inputs):  # state [B, H, P, N]
        x_t, a_t, b_t, c_t = inputs  # [B, H, P], [B, H], [B, H, N], [B, H, N]
        state = jnp.exp(a_t)[..., None, None] * state + x_t[..., :, None] * b_t[..., None, :]
        return state, jnp.einsum("bhpn,bhn->bhp", state, c_t)

    time_major = [jnp.moveaxis(t, 1, 0) for t in (x, a, b, c)]
    final, y = jax.lax.scan(step, state0, time_major)
    return jnp.moveaxis(y, 0, 1), final


def ssd_associative_scan(x, a, b, c, *, initial_state=None):
    """The recurrence as a parallel prefix over (log decay, state) pairs."""
    _heads_per_group(x, b)
    state0 = _initial(x, b, initial_state)
    x, a, b, c = _f32(x, a, b, c)
    b, c = _expand_groups(b, x.shape[2]), _expand_groups(c, x.shape[2])
    inputs = x[..., :, None] * b[..., None, :]  # [B, L, H, P, N]: outer(x_t, b_t)
    inputs = inputs.at[:, 0].add(jnp.exp(a[:, 0])[..., None, None] * state0)  # fold in H_{-1}

    def combine(earlier, later):
        (a1, s1), (a2, s2) = earlier, later
        return a1 + a2, jnp.exp(a2)[..., None, None] * s1 + s2

    _, states = jax.lax.associative_scan(combine, (a, inputs), axis=1)
    return jnp.einsum("blhpn,blhn->blhp", states, c), states[:, -1]


def segsum(a):
    """[..., T] -> [..., T, T]: out[i, j] = a_{j+1} + ... + a_i for j <= i, -inf above the diagonal.

    Built as a masked cumulative sum down each column, never as a difference of prefix sums (which
    cancels catastrophically for long chunks or strong decay). The cumulative sum is a product with
    a lower-triangular matrix of ones, which XLA runs as a matmul: every term it adds is one of the
    a_k of the segment (the others are multiplied by exactly 0), so nothing cancels."""
    length = a.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((length, length), bool), -1)
    column_terms = jnp.where(strictly_lower, a[..., :, None], 0.0)  # [i, j] = a_i where i > j
    sums = jnp.matmul(jnp.tril(jnp.ones((length, length), a.dtype)), column_terms,
                      precision=jax.lax.Precision.HIGHEST)  # cumsum down the columns
    return jnp.where(jnp.tril(jnp.ones((length, length), bool)), sums, -jnp.inf)


def ssd_chunked(x, a, b, c, *, chunk_size=64, initial_state=None):
    """Mamba-2's chunked SSD: a scan over chunks, each doing the paper's four steps with matmuls."""
    heads_per_group = _heads_per_group(x, b)
    state0 = _initial(x, b, initial_state)
    x, a, b, c = _f32(x, a, b, c)
    batch, length, heads, head_dim = x.shape
    groups, state_dim = b.shape[2], b.shape[3]
    # Pad to whole chunks with a = 0 (no decay) and x = b = c = 0 (no input): the state passes unchanged.
    pad = -length % chunk_size
    if pad:
        x, a, b, c = (jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (x, a, b, c))
    chunks = (length + pad) // chunk_size
    # Chunk-major [chunks, B, T, G, ...]; R = H / G heads share each group's b and c.
    x = x.reshape(batch, chunks, chunk_size, groups, heads_per_group, head_dim)
    a = a.reshape(batch, chunks, chunk_size, groups, heads_per_group)
    b = b.reshape(batch, chunks, chunk_size, groups, state_dim)
    c = c.reshape(batch, chunks, chunk_size, groups, state_dim)

    def chunk(state, inputs):  # state [B, G, R, P, N]: entering this chunk
        x, a, b, c = inputs  # [B, T, G, R, P], [B, T, G, R], [B, T, G, N], [B, T, G, N]
        a = jnp.moveaxis(a, 1, -1)  # [B, G, R, T]
        decay = jnp.exp(segsum(a))  # [B, G, R, T, T]: exp(a_{s+1} + ... + a_t)
        # 1. Diagonal block: y_t = sum_{s <= t in the chunk} (c_t . b_s) decay[t, s] x_s.
        scores = jnp.einsum("blgn,bsgn->bgls", c, b)
        y = jnp.einsum("bgrls,bsgrp->blgrp", scores[:, :, None] * decay, x)
        # 2. Chunk state: the state the chunk's own inputs leave at its end.
        chunk_state = jnp.einsum("bsgn,bgrs,bsgrp->bgrpn", b, decay[..., -1, :], x)
        # 3. State passing: the state leaving this chunk, H_end = exp(sum of a) H_entering + chunk state.
        leaving = jnp.exp(jnp.sum(a, axis=-1))[..., None, None] * state + chunk_state
        # 4. State to output: y_t += c_t . (exp(a_0 + ... + a_t) H_entering).
        decay_from_start = jnp.exp(jnp.cumsum(a, axis=-1))  # [B, G, R, T]
        y = y + jnp.einsum("blgn,bgrpn,bgrl->blgrp", c, state, decay_from_start)
        return leaving, y

    state0 = state0.reshape(batch, groups, heads_per_group, head_dim, state_dim)
    final, y = jax.lax.scan(chunk, state0, tuple(jnp.moveaxis(t, 1, 0) for t in (x, a, b, c)))
    y = jnp.moveaxis(y, 0, 1).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    return y, final.reshape(batch, heads, head_dim, state_dim)
