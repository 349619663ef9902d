"""Where arrays live: the device mesh, and the one table mapping logical axis names to mesh axes.

Parameters carry logical names (models/*.py); `LOGICAL_AXIS_RULES` maps each to a mesh axis or to
None (replicated). FSDP shards parameters' `embed` dimension over `fsdp`; tensor parallelism splits
heads, MLP and vocabulary over `tensor`; batches split over (`data`, `fsdp`, `expert`); experts over
`expert`, so an expert-parallel mesh is also data-parallel outside the MoE layers.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from experiments.validation import MESH_AXES, ConfigError

LOGICAL_AXIS_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("head_dim", None),
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
)

BATCH_AXES = ("data", "fsdp", "expert")  # expert shards hold different tokens too (expert parallelism)


def make_mesh(shape: tuple[int, ...], devices) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert) of the given sizes over `devices`."""
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data, fsdp and expert; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many slices a global batch is split into."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh: Mesh):
    """NamedShardings for a tree of (abstract) values boxed with logical names, in its unboxed structure."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def check_divisible(abstract_tree, shardings) -> None:
    """ConfigError naming the first array whose dimension the mesh axes sharding it do not divide."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat, flat_shardings):
        for dim, axes in zip(leaf.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            size = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % size:
                raise ConfigError(
                    f"{jax.tree_util.keystr(path)} has shape {leaf.shape}: dimension {dim} does not divide over "
                    f"mesh axes {axes} of total size {size}; pick mesh sizes that divide it")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes (an explicit transfer)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
