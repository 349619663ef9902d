"""Flash attention in Pallas: tiled online-softmax forward and backward kernels (FlashAttention-2).

Same arguments and result as `models.attention.dot_product_attention` (docs/interfaces.md): q [B, Lq, Hq, D],
k, v [B, Lk, Hkv, D], query head h reads kv head h // (Hq / Hkv); causal masking is bottom-right
aligned (query i sees keys j <= i + Lk - Lq; with a sliding window W also i + Lk - Lq - j < W) and a query
that sees no key outputs zeros. With ALiBi slopes m [Hq] (causal only), head h's scores gain
-m_h (i + Lk - Lq - j), computed in the kernels from the block's positions (no [L, L] bias in memory; the
backward needs no change but recomputing the same scores).

Forward, one program per (query block, batch, head), looping over key blocks j (base-2 exponent,
s = log2(e) * sm_scale * q k^T):

    m_new = max(m, rowmax(s_j));   l = 2^(m - m_new) l + rowsum(2^(s_j - m_new))
    acc   = 2^(m - m_new) acc + 2^(s_j - m_new) V_j;   m = m_new
    O = acc / l,   lse = m + log2(l)          (lse saved for the backward, O(L) memory)

Backward, with P = 2^(s - lse) recomputed block by block and delta = rowsum(dO * O):

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = sm_scale dS K,   dK = sm_scale dS^T Q

in two kernels: one per key block (looping over query blocks, accumulating dK, dV) and one per
query block (looping over key blocks, accumulating dQ), so no kernel writes another's output.
Grouped-query heads: dK, dV are computed per query head in float32 and summed over each group.

Blocks that need no mask (fully visible, no padding) run a loop without one; only the blocks on
the causal diagonal, on the window's far edge and the last, partial key block are masked, and blocks
wholly outside the window are never visited (a window of W keys costs O(L W), not O(L^2)). Lengths are padded to whole blocks
outside the kernels (the padded keys are masked, the padded queries sliced off), matmuls accumulate
in float32 whatever the input dtype.

Lowerings: interpret mode on CPU (`interpret=None` picks it there), Triton on GPU (selected with
`pallas.triton.CompilerParams`; head dim padded to a power of two; measured on an H100 in
docs/benchmarks.md), and on TPU the same kernels on heads-major [B, H, L, D] blocks with lse / delta as
[B, H, L, 1] (Mosaic wants the last two block dims to be multiples of (8, 128) or whole); the TPU
path passes Pallas' Mosaic lowering (tested) but has not run on TPU hardware.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_MASKED = -1e30  # finite: a fully masked block gives 2^0 = 1, wiped later by a 2^(-1e30 - m) = 0 correction
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: lengths (real and padded), blocks, and the lowering."""

    causal: bool
    window: int  # > 0: query i sees only keys with i + offset - j < window (sliding-window attention)
    alibi: bool  # scores gain -slope_h (i + offset - j); the slopes follow the kernels' inputs
    segments: bool  # packed rows: query i sees key j only if their segment ids agree (every block is masked)
    sm_scale: float
    len_q: int
    len_k: int
    block_q: int
    block_k: int
    padded_q: int
    padded_k: int
    padded_dim: int  # head dim inside the kernels
    groups: int  # query heads per kv head
    interpret: bool
    heads_major: bool  # TPU: kernels see [B, H, L, D]
    num_warps: int | None
    num_stages: int | None
    backward_launch: tuple  # (block_q, block_k, num_warps, num_stages) of the backward kernels

    def for_backward(self):
        block_q, block_k, num_warps, num_stages = self.backward_launch
        return dataclasses.replace(self, block_q=block_q, block_k=block_k, num_warps=num_warps,
                                   num_stages=num_stages)

    def query_block(self, i):
        """Query block of grid step i: causal runs the longest rows (the last blocks) first, so the
        short ones fill the tail of the schedule."""
        return self.q_blocks - 1 - i if self.causal else i

    @property
    def offset(self):  # query i sees key j <= i + offset
        return self.len_k - self.len_q

    @property
    def q_blocks(self):
        return self.padded_q // self.block_q

    @property
    def k_blocks(self):
        return self.padded_k // self.block_k


def _gpu_launch(head_dim, itemsize, backward):
    """(block_q, block_k, num_warps, num_stages) for Triton on an H100-class GPU.

    Shared memory (~227 KiB per block) bounds tiles x pipeline stages; the backward keeps two
    accumulators and loads four tiles per step, so its tiles are smaller. Tuned with
    scripts/benchmarks/bench_kernels.py --tune (docs/benchmarks.md)."""
    if itemsize > 2:  # float32 tiles are twice the bytes
        return (32, 32, 4, 2) if backward else (64, 32, 4, 2)
    del head_dim  # tuned at 4,096 x 128 and used at head dim 64 too (0.78-0.87x cuDNN there: docs/benchmarks.md)
    return (64, 64, 4, 2) if backward else (128, 64, 8, 3)


def _default_launch(backend, head_dim, itemsize, backward):
    if backend == "gpu":
        return _gpu_launch(head_dim, itemsize, backward)
    return 128, 128, None, None  # TPU tiles; on CPU (interpret) fewer, larger blocks mean fewer grid steps


def _fit_block(block, length):
    """The block, shrunk to the smallest power of two >= 16 that covers a short sequence."""
    return min(block, max(16, pl.next_power_of_2(length)))


def _validate(q, k, v, block_q, block_k):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads_q={q.shape[2]} is not a multiple of heads_kv={k.shape[2]}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"{name}={block} must be a power of two >= 16")


# ----------------------------------------------------------------------------------------------
# Which blocks a program visits. Traced int32 arithmetic (lax.div truncates; every dividend that
# matters is >= 0, the others are clipped to 0).


def _key_block_range(q_block, plan: Plan):
    """(first visited, first unmasked, end of unmasked, end of visited) key blocks of one query block: the
    blocks between the first two (the window's far edge) and the last two (the diagonal, padding) are masked."""
    full_blocks = plan.len_k // plan.block_k  # key blocks with no padding
    if not plan.causal:
        return 0, 0, full_blocks, plan.k_blocks
    first_row = q_block * plan.block_q
    last_row = jnp.minimum(first_row + plan.block_q, plan.len_q) - 1
    unmasked_end = jnp.clip(lax.div(first_row + plan.offset + 1, plan.block_k), 0, full_blocks)
    visible_end = jnp.maximum(jnp.clip(lax.div(last_row + plan.offset + plan.block_k, plan.block_k), 0, plan.k_blocks),
                              unmasked_end)
    if not plan.window:
        return 0, 0, unmasked_end, visible_end
    # Keys j >= row + offset - window + 1: the first row's earliest key, and the key every row of the block sees.
    first = jnp.clip(lax.div(first_row + plan.offset - plan.window + 1, plan.block_k), 0, visible_end)
    unmasked_first = jnp.clip(lax.div(last_row + plan.offset - plan.window + plan.block_k, plan.block_k), first,
                              visible_end)
    return first, unmasked_first, jnp.maximum(unmasked_end, unmasked_first), visible_end


def _query_block_range(k_block, plan: Plan):
    """(first visited, first unmasked, end of unmasked, end of visited) query blocks of one key block.

    Padded keys need no mask here: a key's dK, dV rows depend on no other key, and the padded rows
    are sliced off."""
    if not plan.causal:
        return 0, 0, plan.q_blocks, plan.q_blocks
    first_seeing = jnp.maximum(k_block * plan.block_k - plan.offset, 0)  # first row that sees the block
    start = jnp.minimum(lax.div(first_seeing, plan.block_q), plan.q_blocks)
    all_seeing = jnp.maximum((k_block + 1) * plan.block_k - 1 - plan.offset, 0)  # first row that sees all of it
    unmasked_start = jnp.clip(lax.div(all_seeing + plan.block_q - 1, plan.block_q), start, plan.q_blocks)
    if not plan.window:
        return start, unmasked_start, plan.q_blocks, plan.q_blocks
    # Row i sees key j iff i + offset - j < window: the last row seeing the block's first / last key.
    sees_first_end = jnp.maximum(k_block * plan.block_k + plan.window - plan.offset, 0)  # rows < this see all of it
    sees_any_end = jnp.maximum((k_block + 1) * plan.block_k - 1 + plan.window - plan.offset, 0)
    end = jnp.clip(lax.div(sees_any_end + plan.block_q - 1, plan.block_q), unmasked_start, plan.q_blocks)
    unmasked_end = jnp.clip(lax.div(sees_first_end, plan.block_q), unmasked_start, end)
    return start, unmasked_start, unmasked_end, end


def _in_three_loops(bounds, step, carry, plan: Plan):
    """Blocks [b0, b1) masked, [b1, b2) unmasked (masked too with segment ids), [b2, b3) masked."""
    b0, b1, b2, b3 = bounds
    carry = lax.fori_loop(b0, b1, step(True), carry)
    carry = lax.fori_loop(b1, b2, step(plan.segments), carry)
    return lax.fori_loop(b2, b3, step(True), carry)


def _visible(q_start, k_start, plan: Plan, segments=None):
    """bool[block_q, block_k]: which (query, key) pairs of a block pair are attended; segments: the block's
    (query segment ids [block_q], key segment ids [block_k]) when plan.segments."""
    shape = (plan.block_q, plan.block_k)
    cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    visible = cols < plan.len_k
    if plan.causal:
        rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
        visible = visible & (cols <= rows + plan.offset)
        if plan.window:
            visible = visible & (rows + plan.offset - cols < plan.window)
    if plan.segments:
        q_ids, k_ids = segments
        visible = visible & (_column(q_ids) == k_ids.reshape(1, -1))
    return visible


def _column(rows):
    """Per-query rows as a [block, 1] column ([block] refs on GPU / CPU, [block, 1] on TPU)."""
    return rows[:, None] if rows.ndim == 1 else rows


def _scores(q, k, plan: Plan, q_start, k_start, slope):
    """log2(e) * (sm_scale * q k^T - slope (row + offset - col)) in float32, [block_q, block_k]."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * (plan.sm_scale * _LOG2E)
    if not plan.alibi:
        return s
    rows = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return s - (slope * _LOG2E) * (rows + plan.offset - cols).astype(jnp.float32)


def _split_extras(refs, plan: Plan):
    """(this head's ALiBi slope or None, (query, key) segment-id refs or None, the remaining refs): the slopes ref
    follows the inputs when plan.alibi, then the two segment-id refs when plan.segments."""
    slope, refs = (refs[0][0], refs[1:]) if plan.alibi else (None, refs)
    segment_refs, refs = (refs[:2], refs[2:]) if plan.segments else (None, refs)
    return slope, segment_refs, refs


# ----------------------------------------------------------------------------------------------
# Kernels. Refs are 2-D blocks ([rows, D]) or 1-D rows ([block_q]); the grid is
# (block index, batch, head) with the block index fastest, so neighbouring programs share K, V.


def _q_block(plan: Plan):
    """This program's query block (see `Plan.query_block`)."""
    return plan.query_block(pl.program_id(0))


def _forward_kernel(q_ref, k_ref, v_ref, *refs, plan: Plan):
    slope, segment_refs, (o_ref, lse_ref) = _split_extras(refs, plan)
    q_block = _q_block(plan)
    q_start = q_block * plan.block_q
    q = q_ref[...]
    head_dim = q.shape[-1]
    q_ids = segment_refs[0][...] if plan.segments else None

    def step(masked):
        def body(k_block, carry):
            acc, row_max, row_sum = carry
            k_start = pl.multiple_of(k_block * plan.block_k, plan.block_k)
            k = k_ref[pl.ds(k_start, plan.block_k), :]
            v = v_ref[pl.ds(k_start, plan.block_k), :]
            s = _scores(q, k, plan, q_start, k_start, slope)
            if masked:
                ids = (q_ids, segment_refs[1][pl.ds(k_start, plan.block_k)]) if plan.segments else None
                s = jnp.where(_visible(q_start, k_start, plan, ids), s, _MASKED)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
            correction = jnp.exp2(row_max - new_max)
            p = jnp.exp2(s - new_max[:, None])
            row_sum = correction * row_sum + jnp.sum(p, axis=1)
            acc = correction[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return acc, new_max, row_sum

        return body

    carry = (jnp.zeros((plan.block_q, head_dim), jnp.float32),
             jnp.full((plan.block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((plan.block_q,), jnp.float32))
    acc, row_max, row_sum = _in_three_loops(_key_block_range(q_block, plan), step, carry, plan)

    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    if plan.causal and plan.offset < 0:  # the first -offset queries see no key: zeros
        rows = q_start + lax.broadcasted_iota(jnp.int32, (plan.block_q, head_dim), 0)
        out = jnp.where(rows + plan.offset >= 0, out, 0.0)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, row_max + jnp.log2(safe_sum), 0.0).reshape(lse_ref.shape)


def _key_value_grad_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: Plan):
    slope, segment_refs, (dk_ref, dv_ref) = _split_extras(refs, plan)
    k_block = pl.program_id(0)
    k_start = k_block * plan.block_k
    k, v = k_ref[...], v_ref[...]
    k_ids = segment_refs[1][...] if plan.segments else None

    def step(masked):
        def body(q_block, carry):
            dk, dv = carry
            q_start = pl.multiple_of(q_block * plan.block_q, plan.block_q)
            rows = pl.ds(q_start, plan.block_q)
            q, do = q_ref[rows, :], do_ref[rows, :]
            p = jnp.exp2(_scores(q, k, plan, q_start, k_start, slope) - _column(lse_ref[rows]))
            if masked:
                ids = (segment_refs[0][rows], k_ids) if plan.segments else None
                p = jnp.where(_visible(q_start, k_start, plan, ids), p, 0.0)
            dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
            dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
            ds = p * (dp - _column(delta_ref[rows]))
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
            return dk, dv

        return body

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _in_three_loops(_query_block_range(k_block, plan), step, (zeros, zeros), plan)
    dk_ref[...] = (dk * plan.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_grad_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: Plan):
    slope, segment_refs, (dq_ref,) = _split_extras(refs, plan)
    q_block = _q_block(plan)
    q_start = q_block * plan.block_q
    q, do = q_ref[...], do_ref[...]
    q_ids = segment_refs[0][...] if plan.segments else None
    lse, delta = _column(lse_ref[...]), _column(delta_ref[...])

    def step(masked):
        def body(k_block, dq):
            k_start = pl.multiple_of(k_block * plan.block_k, plan.block_k)
            k = k_ref[pl.ds(k_start, plan.block_k), :]
            v = v_ref[pl.ds(k_start, plan.block_k), :]
            p = jnp.exp2(_scores(q, k, plan, q_start, k_start, slope) - lse)
            if masked:
                ids = (q_ids, segment_refs[1][pl.ds(k_start, plan.block_k)]) if plan.segments else None
                p = jnp.where(_visible(q_start, k_start, plan, ids), p, 0.0)
            dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
            ds = p * (dp - delta)
            return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

        return body

    dq = _in_three_loops(_key_block_range(q_block, plan), step, jnp.zeros(q.shape, jnp.float32), plan)
    dq_ref[...] = (dq * plan.sm_scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call plumbing: block specs for [B, L, H, D] (GPU, interpret) or [B, H, L, D] (TPU).


def _rows_spec(plan: Plan, rows: str, heads: str, head_dim):
    """BlockSpec of one [rows, D] slab of a [B, L, H, D] array (heads-major on TPU).

    rows: "query_tile" / "key_tile" (the tile of grid step i along queries / keys) or "all";
    heads: "q" (head h) or "kv" (the kv head that query head h reads)."""
    block = {"query_tile": plan.block_q, "key_tile": plan.block_k, "all": None}[rows]

    def index_map(i, b, h):
        head = h // plan.groups if heads == "kv" else h
        row = {"query_tile": plan.query_block(i), "key_tile": i, "all": 0}[rows]
        return (b, head, row, 0) if plan.heads_major else (b, row, head, 0)

    length = block or (plan.padded_k if heads == "kv" else plan.padded_q)
    shape = (None, None, length, head_dim) if plan.heads_major else (None, length, None, head_dim)
    return pl.BlockSpec(shape, index_map)


def _rows_of_queries_spec(plan: Plan, tiled: bool):
    """Spec of lse / delta, [B, H, Lq] (a trailing unit dim on TPU, whose blocks need a last dim of
    128 lanes or the array's own, and a second-to-last of 8 sublanes)."""
    block = plan.block_q if tiled else plan.padded_q
    index = (lambda i, b, h: (b, h, plan.query_block(i))) if tiled else (lambda i, b, h: (b, h, 0))
    if plan.heads_major:
        return pl.BlockSpec((None, None, block, 1), lambda i, b, h: (*index(i, b, h), 0))
    return pl.BlockSpec((None, None, block), index)


def _row_shape(plan: Plan, batch, heads):
    return (batch, heads, plan.padded_q) + ((1,) if plan.heads_major else ())


def _specs(plan: Plan, head_dim, *which):
    """Named specs: q_tile, q_all, kv_tile, kv_all, kgrad_tile (dK, dV per query head), and
    row_tile / row_all for the per-query rows (lse, delta: [B, H, Lq])."""
    slabs = {"q_tile": ("query_tile", "q"), "q_all": ("all", "q"), "kv_tile": ("key_tile", "kv"),
             "kv_all": ("all", "kv"), "kgrad_tile": ("key_tile", "q")}
    out = []
    for name in which:
        if name in ("row_tile", "row_all"):
            out.append(_rows_of_queries_spec(plan, tiled=name == "row_tile"))
        else:
            out.append(_rows_spec(plan, *slabs[name], head_dim))
    return out


def _call(kernel, plan: Plan, grid_blocks, in_specs, out_specs, out_shape, name):
    batch, heads = out_shape[0].shape[0], out_shape[0].shape[1 if plan.heads_major else 2]
    compiler_params = None
    if not plan.interpret and jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        compiler_params = pl_triton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        out_shape=out_shape,
        grid=(grid_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=plan.interpret,
        compiler_params=compiler_params,
        name=name,
    )


def _segment_spec(plan: Plan, rows: str):
    """BlockSpec of segment ids [B, padded L]: "q_tile" / "q_all" (queries), "kv_tile" / "kv_all" (keys)."""
    if rows == "q_tile":
        return pl.BlockSpec((None, plan.block_q), lambda i, b, h: (b, plan.query_block(i)))
    if rows == "kv_tile":
        return pl.BlockSpec((None, plan.block_k), lambda i, b, h: (b, i))
    return pl.BlockSpec((None, plan.padded_q if rows == "q_all" else plan.padded_k), lambda i, b, h: (b, 0))


def _with_extras(plan: Plan, specs, inputs, slopes, segment_ids, segment_rows):
    """Appends the [Hq] slopes (one per program's head) when plan.alibi, then the (query, key) segment ids
    [B, padded L] read as `segment_rows` = (query spec, key spec) when plan.segments, to a kernel's inputs."""
    if plan.alibi:
        specs, inputs = [*specs, pl.BlockSpec((1,), lambda i, b, h: (h,))], (*inputs, slopes)
    if plan.segments:
        specs, inputs = [*specs, *(_segment_spec(plan, rows) for rows in segment_rows)], (*inputs, *segment_ids)
    return specs, inputs


def forward(q, k, v, slopes, segment_ids, plan: Plan):
    """The forward kernel on padded inputs: (out, lse [B, H, padded Lq] in base 2)."""
    head_dim = q.shape[-1]
    batch, heads = q.shape[0], q.shape[1 if plan.heads_major else 2]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(_row_shape(plan, batch, heads), jnp.float32)]
    in_specs, inputs = _with_extras(plan, _specs(plan, head_dim, "q_tile", "kv_all", "kv_all"), (q, k, v), slopes,
                                    segment_ids, ("q_tile", "kv_all"))
    out_specs = _specs(plan, head_dim, "q_tile", "row_tile")
    return _call(_forward_kernel, plan, plan.q_blocks, in_specs, out_specs, out_shape, "flash_forward")(*inputs)


def backward(q, k, v, slopes, segment_ids, out, lse, d_out, plan: Plan):
    """The backward kernels on padded inputs: (dq, dk, dv)."""
    plan = plan.for_backward()
    head_dim = q.shape[-1]
    head_axis = 1 if plan.heads_major else 2
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # [B, L, H] or [B, H, L]
    delta = delta.reshape(lse.shape) if plan.heads_major else delta.transpose(0, 2, 1)
    # dK, dV per query head (float32 when a group sums them), then summed over each group.
    kv_grad_dtype = jnp.float32 if plan.groups > 1 else k.dtype
    per_head_shape = list(k.shape)
    per_head_shape[head_axis] = q.shape[head_axis]
    kv_grad_shape = jax.ShapeDtypeStruct(tuple(per_head_shape), kv_grad_dtype)
    in_specs, inputs = _with_extras(
        plan, _specs(plan, head_dim, "q_all", "kv_tile", "kv_tile", "q_all", "row_all", "row_all"),
        (q, k, v, d_out, lse, delta), slopes, segment_ids, ("q_all", "kv_tile"))
    dk, dv = _call(_key_value_grad_kernel, plan, plan.k_blocks, in_specs, _specs(plan, head_dim, "kgrad_tile", "kgrad_tile"),
                   [kv_grad_shape, kv_grad_shape], "flash_backward_kv")(*inputs)
    in_specs, inputs = _with_extras(
        plan, _specs(plan, head_dim, "q_tile", "kv_all", "kv_all", "q_tile", "row_tile", "row_tile"),
        (q, k, v, d_out, lse, delta), slopes, segment_ids, ("q_tile", "kv_all"))
    dq = _call(_query_grad_kernel, plan, plan.q_blocks, in_specs, _specs(plan, head_dim, "q_tile"),
               [jax.ShapeDtypeStruct(q.shape, q.dtype)], "flash_backward_q")(*inputs)[0]
    if plan.groups > 1:
        grouped = list(k.shape)
        grouped.insert(head_axis + 1, plan.groups)
        dk = dk.reshape(grouped).sum(axis=head_axis + 1)
        dv = dv.reshape(grouped).sum(axis=head_axis + 1)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, slopes, segment_ids, plan: Plan):
    return forward(q, k, v, slopes, segment_ids, plan)[0]


def _flash_fwd(q, k, v, slopes, segment_ids, plan: Plan):
    out, lse = forward(q, k, v, slopes, segment_ids, plan)
    return out, (q, k, v, slopes, segment_ids, out, lse)


def _flash_bwd(plan: Plan, residuals, d_out):
    slopes = residuals[3]
    return (*backward(*residuals, d_out, plan), jnp.zeros_like(slopes), None)  # slopes, segment ids: constants


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal=True, window=0, alibi_slopes=None, segment_ids=None, sm_scale=None, block_q=None,
                    block_k=None, interpret=None, num_warps=None, num_stages=None, backward_launch=None):
    """Flash attention, [B, Lq, Hq, D] (docs/interfaces.md); differentiable through its own Pallas backward.

    window: > 0 (with causal): each query sees only its `window` most recent keys, itself included.
    alibi_slopes: float [Hq] (with causal): ALiBi, scores - m_h (i - j) (Press et al.; models/positions.py's slopes).
    segment_ids: int [B, L] (Lq = Lk): packed rows, query i sees key j only when segment_ids[i] = segment_ids[j]
      (models/packing.py); every visited block is then masked.

    block_q / block_k: tile sizes (powers of two >= 16; default by backend, head dim and dtype;
      shrunk for short inputs); on GPU they set the forward's tiles only, the backward keeping the
      smaller tuned ones (it holds more tiles in shared memory) unless backward_launch says otherwise.
    interpret: None runs the kernels in interpret mode on CPU and compiled elsewhere.
    num_warps / num_stages: Triton launch parameters of the forward on GPU.
    backward_launch: (block_q, block_k, num_warps, num_stages) of the backward kernels.
    """
    plan = make_plan(q, k, v, causal=causal, window=window, alibi=alibi_slopes is not None,
                     segments=segment_ids is not None, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                     interpret=interpret, num_warps=num_warps, num_stages=num_stages, backward_launch=backward_launch)
    slopes = jnp.zeros((q.shape[2],), jnp.float32) if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
    if slopes.shape != (q.shape[2],):
        raise ValueError(f"alibi_slopes has shape {slopes.shape}; it needs one slope per query head, ({q.shape[2]},)")
    out = _flash(*pad_inputs(plan, q, k, v), slopes, pad_segment_ids(plan, segment_ids, q.shape), plan)
    if plan.heads_major:
        out = out.transpose(0, 2, 1, 3)
    return out[:, :plan.len_q, :, :q.shape[-1]]


def make_plan(q, k, v, *, causal, window=0, alibi=False, segments=False, sm_scale, block_q, block_k, interpret,
              num_warps, num_stages, backward_launch):
    """The static plan of one call: validated shapes, tiles, padded lengths, lowering."""
    _validate(q, k, v, block_q, block_k)
    if window < 0 or (window and not causal):
        raise ValueError(f"window={window} must be >= 0, and > 0 only with causal=True")
    if alibi and not causal:
        raise ValueError("alibi_slopes need causal=True (the kernels' ALiBi is the causal, one-sided bias)")
    if backward_launch is not None:
        _validate(q, k, v, *backward_launch[:2])
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if alibi and backend == "tpu" and not interpret:
        raise ValueError("alibi_slopes run in interpret mode and on GPU; the TPU lowering has no per-head scalar input yet")
    if segments and backend == "tpu" and not interpret:
        raise ValueError("segment_ids run in interpret mode and on GPU; the TPU lowering has no [B, L] row input yet")
    if segments and q.shape[1] != k.shape[1]:
        raise ValueError(f"segment_ids need self-attention (Lq = Lk); got Lq={q.shape[1]}, Lk={k.shape[1]}")
    len_q, heads_q, head_dim = q.shape[1:]
    len_k, heads_kv = k.shape[1], k.shape[2]
    compiled_gpu = backend == "gpu" and not interpret
    padded_dim = pl.next_power_of_2(max(head_dim, 16)) if compiled_gpu else head_dim  # Triton: 2^n tiles
    itemsize = jnp.dtype(q.dtype).itemsize
    forward = _default_launch(backend, padded_dim, itemsize, backward=False)
    forward = (block_q or forward[0], block_k or forward[1], num_warps or forward[2], num_stages or forward[3])
    backward = backward_launch or _default_launch(backend, padded_dim, itemsize, backward=True)
    if backward_launch is None and not compiled_gpu:  # one tile choice for every kernel
        backward = (block_q or backward[0], block_k or backward[1], *backward[2:])
    # Tiles no longer than the (power-of-two-rounded) sequence; lengths padded to whole tiles of both.
    forward = (_fit_block(forward[0], len_q), _fit_block(forward[1], len_k), *forward[2:])
    backward = (_fit_block(backward[0], len_q), _fit_block(backward[1], len_k), *backward[2:])
    tile_q, tile_k = max(forward[0], backward[0]), max(forward[1], backward[1])
    return Plan(
        causal=bool(causal), window=int(window), alibi=bool(alibi), segments=bool(segments),
        sm_scale=float(head_dim**-0.5 if sm_scale is None else sm_scale), len_q=len_q,
        len_k=len_k, block_q=forward[0], block_k=forward[1], padded_q=pl.cdiv(len_q, tile_q) * tile_q,
        padded_k=pl.cdiv(len_k, tile_k) * tile_k, padded_dim=padded_dim, groups=heads_q // heads_kv,
        interpret=bool(interpret), heads_major=backend == "tpu" and not interpret, num_warps=forward[2],
        num_stages=forward[3], backward_launch=tuple(backward),
    )


def pad_inputs(plan: Plan, q, k, v):
    """q, k, v zero-padded to whole tiles (and a power-of-two head dim on GPU), in the kernels' layout."""

    def pad(t, length):
        t = jnp.pad(t, ((0, 0), (0, length - t.shape[1]), (0, 0), (0, plan.padded_dim - t.shape[3])))
        return t.transpose(0, 2, 1, 3) if plan.heads_major else t

    return pad(q, plan.padded_q), pad(k, plan.padded_k), pad(v, plan.padded_k)


def pad_segment_ids(plan: Plan, segment_ids, shape):
    """(query ids [B, padded Lq], key ids [B, padded Lk]) of int32 segment ids [B, L], or None without them (the
    padded positions are masked as padding already, whatever their id)."""
    if segment_ids is None:
        return None
    if segment_ids.shape != shape[:2]:
        raise ValueError(f"segment_ids has shape {segment_ids.shape}; it needs [batch, length] = {shape[:2]}")
    ids = jnp.asarray(segment_ids, jnp.int32)
    return tuple(jnp.pad(ids, ((0, 0), (0, length - ids.shape[1]))) for length in (plan.padded_q, plan.padded_k))
