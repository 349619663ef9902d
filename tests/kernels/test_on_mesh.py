"""kernels_pallas/on_mesh.per_shard: which slice of each array a kernel sees on a data=2, fsdp=2, tensor=2 mesh
(batch over data x fsdp, heads over tensor), checked against slicing by hand; no Pallas kernel runs."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.training import sharding
from kernels_pallas import on_mesh


def test_every_array_of_three_or_more_axes_splits_its_heads_and_the_rest_only_their_batch():
    b, length, heads, width = 8, 3, 4, 5
    x = jnp.arange(b * length * heads * width, dtype=jnp.float32).reshape(b, length, heads, width)  # [B, L, H, P]
    dt = jnp.arange(b * length * heads, dtype=jnp.float32).reshape(b, length, heads)  # [B, L, H]: three axes
    ids = jnp.arange(b * length, dtype=jnp.int32).reshape(b, length)  # [B, L]: batch only

    def kernel(x, dt, ids):  # each shard's slice: x + dt, and ids broadcast to x's shape
        return x + dt[..., None] + ids[:, :, None, None].astype(x.dtype)

    expected = np.asarray(x + dt[..., None] + ids[:, :, None, None])
    with sharding.use_mesh(sharding.make_mesh((2, 2, 2, 1), jax.devices())):
        shapes = []

        def recording(x, dt, ids):
            shapes.append((x.shape, dt.shape, ids.shape))
            return kernel(x, dt, ids)

        got = jax.jit(lambda *a: on_mesh.per_shard(recording, *a, split_heads=True))(x, dt, ids)
    assert shapes == [((2, 3, 2, 5), (2, 3, 2), (2, 3))]  # batch / 4, heads / 2 for both of 3+ axes
    np.testing.assert_array_equal(got, expected)
