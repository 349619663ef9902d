"""Run a Pallas kernel once per shard of the active mesh.

`pallas_call` has no SPMD partitioning rule: under `jit` on a mesh, XLA would gather its sharded
inputs onto every device. Attention and the SSD are independent across batch rows and heads, so
the models call the kernels through `jax.shard_map`: batch split over the mesh's batch axes
(data, fsdp, expert) and, for attention, heads over `tensor`, each shard running the kernel on its
own slice. Without a mesh (or on one device) the kernel runs directly.
"""

import math

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp", "expert")
HEAD_AXIS = "tensor"


def _divides(mesh, axes, size):
    return size % math.prod(mesh.shape[a] for a in axes) == 0


def per_shard(kernel, *arrays, split_heads=False, num_outputs=1):
    """kernel(*arrays), each array [B, ...] split over batch per shard.

    split_heads: every array and output is [B, L, H, ...]; heads are split over `tensor` too when
    every array's head count divides by its size (else they stay whole on each shard).
    num_outputs: how many arrays the kernel returns (a tuple when more than one).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*arrays)
    batch = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    batch = batch if batch and _divides(mesh, batch, arrays[0].shape[0]) else None
    heads = None
    if split_heads and mesh.shape.get(HEAD_AXIS, 1) > 1 and all(_divides(mesh, (HEAD_AXIS,), t.shape[2]) for t in arrays):
        heads = HEAD_AXIS
    spec = P(batch, None, heads) if heads else P(batch)
    out_specs = spec if num_outputs == 1 else (spec,) * num_outputs
    return jax.shard_map(kernel, in_specs=(spec,) * len(arrays), out_specs=out_specs, check_vma=False)(*arrays)
