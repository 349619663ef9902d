"""Where arrays live: the mesh axes, and the one table mapping logical axis names to them.

Every mesh-axis name lives in this file. Parameters and activations carry logical names (models/*.py);
`LOGICAL_AXIS_RULES` maps each to mesh axes or to None (replicated). FSDP shards parameters' `embed`
dimension over `fsdp`; tensor parallelism splits heads, MLP and vocabulary over `tensor`; batches split
over (`data`, `fsdp`, `expert`); experts over `expert`, so an expert-parallel mesh is also data-parallel
outside the MoE layers. Code that needs mesh axes inside a model or kernel (a `shard_map` spec) derives
them from logical names through these rules, which `use_mesh` makes active
(`nn.logical_to_mesh_axes`; kernels_pallas/on_mesh.py).
"""

import contextlib
import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from data.config_fields import ConfigError


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`config.mesh`: one size per axis; -1 takes all devices left over (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


MESH_AXES = tuple(f.name for f in dataclasses.fields(MeshConfig))
BATCH_AXES = ("data", "fsdp", "expert")  # expert shards hold different tokens too (expert parallelism)

LOGICAL_AXIS_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("head_dim", None),
    ("q_lora", None),  # MLA's query and key/value latents: small, replicated
    ("kv_lora", None),
    ("layers", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES with -1 resolved; ConfigError if they do not fit the devices."""
    sizes = [mesh_config[a] for a in MESH_AXES]
    spec = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f"mesh ({spec}) is invalid: sizes are >= 1, with at most one -1 (all devices left over)")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh ({spec}) does not fit {num_devices} devices: {fixed} does not divide {num_devices}")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"mesh ({spec}) has {fixed} devices but {num_devices} are available; "
                          f"make the product {num_devices} or set one axis to -1")
    return tuple(sizes)


def logical_axis_size(shape: tuple[int, ...], logical: str) -> int:
    """How many shards the rules split the logical axis `logical` into on a mesh of this shape."""
    axes = dict(LOGICAL_AXIS_RULES)[logical]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(size for axis, size in zip(MESH_AXES, shape) if axis in axes)


def make_mesh(shape: tuple[int, ...], devices) -> Mesh:
    """A mesh with MESH_AXES of the given sizes over `devices`."""
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """The mesh and the logical axis rules, active together (what models and kernels read)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes; the rest replicated."""
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


def replicate_misfits(boxed_tree, mesh: Mesh):
    """The tree with the boxes removed (so the values replicate) where a value cannot take its box's layout: its
    rank differs from the names, or a dimension does not divide over the mesh axes the names map to. For
    optimizer state, whose statistics inherit their parameter's box whatever their shape (Adafactor's factored
    rows and columns, its (1,) placeholders; the empty placeholders of masked-out groups, e.g. Muon's); a
    parameter that does not divide stays an error."""
    def fits(box) -> bool:
        shape = getattr(box.value, "shape", None)  # None: a placeholder (optax.MaskedNode of a masked-out group)
        if shape is None or len(box.names) != len(shape):
            return False
        spec = nn.logical_to_mesh_axes(box.names, LOGICAL_AXIS_RULES)
        for dim, axes in zip(box.value.shape, spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            if dim % math.prod(mesh.shape[a] for a in axes):
                return False
        return True

    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x if not is_boxed(x) or fits(x) else x.value, boxed_tree, is_leaf=is_boxed)


def check_divisible(abstract_tree, shardings) -> None:
    """ConfigError naming the first array whose dimension the mesh axes sharding it do not divide."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat, flat_shardings):
        for dim, axes in zip(leaf.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            size = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % size:
                named = ", ".join(f"mesh.{a}={sharding.mesh.shape[a]}" for a in axes)
                raise ConfigError(
                    f"{jax.tree_util.keystr(path)} has shape {leaf.shape}: dimension {dim} does not divide over "
                    f"mesh axes {axes} of total size {size} ({named}); pick mesh sizes that divide it")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes (an explicit transfer)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
