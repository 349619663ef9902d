"""Three ways to send tokens to their experts and back; all compute the same function.

    y_t = sum_{j < k} g_{t,j} FFN_{e_{t,j}}(x_t)        FFN_e(x) = (silu(x Wg_e) * (x Wi_e)) Wo_e

for tokens x [T, D], chosen experts e [T, k] (distinct per token), gates g [T, k] and stacked expert
weights Wg, Wi [E, D, F], Wo [E, F, D].

- `dense`: every expert on every token, combined with the gates (the reference; E times the FLOPs).
- `capacity` (expert parallelism, GShard / Switch style): on each shard, the assignments fill
  per-expert buckets of `capacity` slots, in priority order (all first choices, then all second
  choices, ..., tokens in order); assignments past the capacity are dropped (their output is 0)
  and counted. `all_to_all` over the `expert` mesh axis sends each bucket to the shard holding its
  expert, the experts run on what they received, and a second `all_to_all` brings the results home.
  Capacity `tokens per shard` drops nothing: an expert is chosen at most once per token.
- `ragged` (dropless): assignments sorted by expert, the experts as grouped matmuls
  (`jax.lax.ragged_dot`) over contiguous groups, results scattered back. With experts split over
  the `expert` axis, each shard sends each other shard exactly the rows for its experts with
  `jax.lax.ragged_all_to_all` (sizes exchanged first with an all-gather), runs its experts on what
  it received, and sends the results back the same way. XLA:CPU does not implement
  ragged_all_to_all (`check_ragged_supported` says so before anything compiles); the tests run
  this path on CPU with an emulation of the collective built from all-gathers
  (`exchange=` argument).

Under a mesh and the logical axis rules (`experiments.training.sharding.use_mesh`), `capacity` and `ragged` run
inside `jax.shard_map` with tokens split like the `activation_batch` logical axis and experts like
`expert`; without them they run on the whole batch as one shard.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels_pallas import on_mesh

DISPATCHES = ("dense", "capacity", "ragged")


def expert_matmul(x, w):
    """x [E, N, K] @ w [E, K, M] per expert, as a batched dot_general (the form models/quantization.py's qwix rules
    round; the routing's einsums, activations only, stay as they are)."""
    return jax.lax.dot_general(x, w, (((2,), (1,)), ((0,), (0,))))


def expert_hidden(x, w_gate, w_in):
    """The SwiGLU experts' hidden activations silu(x W_gate) * x W_in: x [E, N, D] -> [E, N, F]."""
    return jax.nn.silu(expert_matmul(x, w_gate)) * expert_matmul(x, w_in)


def expert_ffn(x, w_gate, w_in, w_out):
    """SwiGLU experts batched over a leading expert axis: x [E, N, D] -> [E, N, D]."""
    return expert_matmul(expert_hidden(x, w_gate, w_in), w_out)


def dense(x, experts, gates, weights):
    """Reference: every expert on every token. Returns (y [T, D], dropped assignments = 0)."""
    num_experts = weights[0].shape[0]
    out = expert_ffn(jnp.broadcast_to(x, (num_experts, *x.shape)), *weights)  # [E, T, D]
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=x.dtype) * gates[..., None], axis=1)  # [T, E]
    return jnp.einsum("te,etd->td", combine, out), jnp.zeros((), jnp.int32)


def bucket_positions(experts, num_experts: int):
    """Slot of each assignment in its expert's bucket, in priority order (choice-major, then token):
    experts [T, k] -> positions [T, k]."""
    flat = experts.T.reshape(-1)  # [k*T]: all first choices, then all second choices, ...
    one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    positions = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0) - 1, flat[:, None], axis=1)[:, 0]
    return positions.reshape(experts.shape[::-1]).T


def _capacity_local(x, experts, gates, w_gate, w_in, w_out, *, capacity: int, num_experts: int, axis):
    """One shard's part of `capacity`: x [T, D] local tokens, experts' weights [E_local, ...]."""
    tokens, k = experts.shape
    shards = num_experts // w_in.shape[0]
    positions = bucket_positions(experts, num_experts)  # [T, k]
    kept = positions < capacity
    source = jnp.broadcast_to(jnp.arange(tokens)[:, None], experts.shape)
    buckets = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
    buckets = buckets.at[experts, positions].set(x[source], mode="drop")  # slots past capacity: dropped
    if axis is not None:  # [shards, E_local, C, D]: bucket group s goes to shard s, which sends its own back
        buckets = jax.lax.all_to_all(buckets.reshape(shards, -1, capacity, x.shape[-1]), axis, 0, 0, tiled=True)
    received = buckets.reshape(shards, -1, capacity, x.shape[-1]).transpose(1, 0, 2, 3)  # [E_local, shards, C, D]
    out = expert_ffn(received.reshape(received.shape[0], -1, x.shape[-1]), w_gate, w_in, w_out)
    out = out.reshape(received.shape).transpose(1, 0, 2, 3)  # [shards, E_local, C, D]
    if axis is not None:
        out = jax.lax.all_to_all(out, axis, 0, 0, tiled=True)
    out = out.reshape(num_experts, capacity, x.shape[-1])
    per_assignment = out.at[experts, positions].get(mode="fill", fill_value=0)  # [T, k, D]; dropped: 0
    y = jnp.einsum("tk,tkd->td", gates * kept, per_assignment)
    return y, jnp.sum(~kept).astype(jnp.int32)


def _ragged_local(x, experts, gates, w_gate, w_in, w_out):
    """One shard's dropless grouped matmuls over assignments sorted by expert."""
    tokens, k = experts.shape
    num_experts = w_in.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    source = order // k  # token of each sorted assignment
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[source]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_in, sizes)
    ys = jax.lax.ragged_dot(h, w_out, sizes) * gates.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[source].add(ys), jnp.zeros((), jnp.int32)


def _mesh_axes():
    """(mesh, the mesh axes tokens split over, the expert mesh axis or None); mesh None when unset."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, (), None
    experts = on_mesh.mesh_axes("expert", mesh)
    return mesh, on_mesh.mesh_axes("activation_batch", mesh), experts[0] if experts else None


def capacity_for(tokens_per_shard: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert and shard: ceil(factor * T k / E); factor 0 means T (nothing can drop)."""
    if capacity_factor <= 0:
        return tokens_per_shard
    return max(1, math.ceil(capacity_factor * tokens_per_shard * top_k / num_experts))


def capacity(x, experts, gates, weights, *, capacity_factor: float = 0.0):
    """Expert-parallel dispatch with capacity-limited buckets; returns (y [T, D], dropped assignments)."""
    num_experts = weights[0].shape[0]
    if _mesh_axes()[0] is None:
        cap = capacity_for(x.shape[0], experts.shape[1], num_experts, capacity_factor)
        return _capacity_local(x, experts, gates, *weights, capacity=cap, num_experts=num_experts, axis=None)
    mesh, axes, axis = _mesh_axes()
    shards = math.prod(mesh.shape[a] for a in axes)
    cap = capacity_for(x.shape[0] // shards, experts.shape[1], num_experts, capacity_factor)

    def local(x, experts, gates, w_gate, w_in, w_out):
        y, dropped = _capacity_local(x, experts, gates, w_gate, w_in, w_out, capacity=cap,
                                     num_experts=num_experts, axis=axis)
        return y, jax.lax.psum(dropped, axes) if axes else dropped

    weight_spec = P(axis)  # experts split over the expert axis, whole on each of its shards
    return jax.shard_map(local, in_specs=(P(axes),) * 3 + (weight_spec,) * 3, out_specs=(P(axes), P()))(
        x, experts, gates, *weights)


def check_ragged_supported(expert_axis_size: int, backend: str) -> str | None:
    """Why `ragged` cannot run on this mesh and backend, or None when it can."""
    if expert_axis_size > 1 and backend == "cpu":
        return (f"model.dispatch='ragged' with mesh.expert={expert_axis_size} needs jax.lax.ragged_all_to_all, "
                f"which XLA:CPU does not implement; use model.dispatch='capacity' (model.capacity_factor=0 drops "
                f"nothing) or mesh.expert=1")
    return None


def _ragged_expert_parallel(x, experts, gates, w_gate, w_in, w_out, *, exchange, axis):
    """One shard's part of `ragged` with experts split over the expert axis (weights [E_local, ...])."""
    tokens, k = experts.shape
    shards, local_experts = jax.lax.axis_size(axis), w_in.shape[0]
    me = jax.lax.axis_index(axis)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # grouped by expert, hence by the shard holding it
    rows = x[order // k]
    send_sizes = jnp.bincount(flat // local_experts, length=shards).astype(jnp.int32)
    sizes = jax.lax.all_gather(send_sizes, axis)  # [source, destination]
    send_offsets = jnp.cumsum(sizes, axis=1) - sizes  # where each chunk starts in its source's rows
    land_offsets = jnp.cumsum(sizes, axis=0) - sizes  # where it lands in its destination's buffer
    capacity = tokens * k * shards  # static bound: every row of every shard to one shard
    received = exchange(rows, jnp.zeros((capacity, x.shape[-1]), x.dtype), send_offsets[me], sizes[me],
                        land_offsets[me], sizes[:, me], axis_name=axis)
    local_ids = exchange((flat[order] % local_experts)[:, None], jnp.full((capacity, 1), local_experts, jnp.int32),
                         send_offsets[me], sizes[me], land_offsets[me], sizes[:, me], axis_name=axis)[:, 0]
    by_expert = jnp.argsort(local_ids, stable=True)  # empty slots (id = local_experts) last
    group_sizes = jnp.bincount(local_ids, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    xs = received[by_expert]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes)) * jax.lax.ragged_dot(xs, w_in, group_sizes)
    out = jnp.zeros_like(received).at[by_expert].set(jax.lax.ragged_dot(h, w_out, group_sizes))
    returned = exchange(out, jnp.zeros_like(rows), land_offsets[:, me], sizes[:, me], send_offsets[:, me], sizes[me],
                        axis_name=axis)
    y = jnp.zeros_like(x).at[order // k].add(returned * gates.reshape(-1)[order][:, None])
    return y, jnp.zeros((), jnp.int32)


def ragged(x, experts, gates, weights, *, exchange=None):
    """Dropless grouped-matmul dispatch; returns (y [T, D], 0 dropped). `exchange` replaces
    jax.lax.ragged_all_to_all (the tests' CPU emulation)."""
    mesh, axes, axis = _mesh_axes()
    if mesh is None:
        return _ragged_local(x, experts, gates, *weights)
    if axis is None:
        return jax.shard_map(_ragged_local, in_specs=(P(axes),) * 3 + (P(),) * 3, out_specs=(P(axes), P()))(
            x, experts, gates, *weights)
    if exchange is None:
        problem = check_ragged_supported(mesh.shape[axis], jax.default_backend())
        if problem:
            raise ValueError(problem)
        exchange = jax.lax.ragged_all_to_all
    local = functools.partial(_ragged_expert_parallel, exchange=exchange, axis=axis)
    return jax.shard_map(local, in_specs=(P(axes),) * 3 + (P(axis),) * 3, out_specs=(P(axes), P()))(
        x, experts, gates, *weights)


def dispatch(name: str, x, experts, gates, weights, *, capacity_factor: float = 0.0):
    if name == "dense":
        return dense(x, experts, gates, weights)
    if name == "capacity":
        return capacity(x, experts, gates, weights, capacity_factor=capacity_factor)
    if name == "ragged":
        return ragged(x, experts, gates, weights)
    raise ValueError(f"dispatch={name!r} is not one of {list(DISPATCHES)}")
