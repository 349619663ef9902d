"""Run a Pallas kernel once per shard of the active mesh.

`pallas_call` has no SPMD partitioning rule: under `jit` on a mesh, XLA would gather its sharded
inputs onto every device. Attention and the SSD are independent across batch rows and heads, so
the models call the kernels through `jax.shard_map`: batch rows split like the `activation_batch`
logical axis and, for attention, heads like `activation_heads`, each shard running the kernel on its
own slice. Mesh axes are derived from those logical names through the active logical axis rules
(experiments/training/sharding.py owns them and `sharding.use_mesh` activates them); without a mesh, on one
device, or without rules, the kernel runs directly on the whole arrays.
"""

import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P


def mesh_axes(logical: str, mesh) -> tuple[str, ...]:
    """The axes of `mesh` (of size > 1) that the active logical axis rules map `logical` to."""
    spec = nn.logical_to_mesh_axes((logical,))[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def _divides(mesh, axes, size):
    return size % math.prod(mesh.shape[a] for a in axes) == 0


def per_shard(kernel, *arrays, split_heads=False, num_outputs=1):
    """kernel(*arrays), each array [B, ...] split over batch per shard.

    split_heads: every array of 3 or more dimensions and every output is [B, L, H, ...]; heads are split too when
    each such array's head count divides by the head axes' size (else they stay whole on each shard); arrays of
    fewer dimensions ([B, L]: segment ids) split over batch only.
    num_outputs: how many arrays the kernel returns (a tuple when more than one).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*arrays)
    batch = mesh_axes("activation_batch", mesh)
    batch = batch if batch and _divides(mesh, batch, arrays[0].shape[0]) else None
    heads = mesh_axes("activation_heads", mesh) if split_heads else ()
    heads = heads if heads and all(_divides(mesh, heads, t.shape[2]) for t in arrays if t.ndim >= 3) else None
    spec = P(batch, None, heads) if heads else P(batch)
    in_specs = tuple(spec if t.ndim >= 3 else P(batch) for t in arrays)
    out_specs = spec if num_outputs == 1 else (spec,) * num_outputs
    return jax.shard_map(kernel, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*arrays)
