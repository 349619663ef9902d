"""experiments/training/checkpointing.py's restore of the data position: a step saved by this number of processes
resumes each iterator where it stood; one saved by another number of processes (no iterator file for this one)
resumes at global batch step + data_skipped (the batches NaN rollbacks skipped), where every process stood."""

import flax
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from experiments.training import checkpointing


@flax.struct.dataclass
class _State:
    step: jax.Array
    data_skipped: jax.Array
    weights: jax.Array


def test_the_data_resumes_where_it_stood_or_at_step_plus_skipped(tmp_path):
    saved = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(3):
        next(saved)
    state = _State(jnp.int32(7), jnp.int32(2), jnp.arange(3.0))
    mngr = checkpointing.manager(str(tmp_path), keep=1, async_save=False)
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data=grain.checkpoint.CheckpointSave(saved)), force=True)
    mngr.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    same = iter(grain.MapDataset.range(100).to_iter_dataset())
    restored = checkpointing._restore_step(mngr, 7, abstract, same)
    assert int(restored.step) == 7 and list(restored.weights) == [0.0, 1.0, 2.0]
    assert next(same) == 3  # this process's own iterator state

    (tmp_path / "checkpoints" / "7" / "data" / f"process_0-of-{jax.process_count()}.json").unlink()
    other = iter(grain.MapDataset.range(100).to_iter_dataset())
    checkpointing._restore_step(mngr, 7, abstract, other)
    assert next(other) == 7 + 2
