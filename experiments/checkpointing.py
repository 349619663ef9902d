"""Orbax checkpoints of the train state and the grain data iterator, in `WORKDIR/checkpoints/`.

Orbax writes each step to a temporary folder and renames it when complete, so a crash mid-save
leaves the previous checkpoint as the latest; `restore_latest` resumes from it, placing every
array with the sharding of the current mesh (which may differ from the one that saved it).
"""

import os

import grain
import jax
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iterator):
    """The latest saved state (placed like `abstract_state`'s shardings), with `data_iterator` moved to
    where it was; None when there is no checkpoint."""
    step = mngr.latest_step()
    if step is None:
        return None
    data_file = os.path.join(str(mngr.directory), str(step), "data",
                             f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if os.path.exists(data_file):
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored.state
    # Saved by another number of processes: every process's iterator stood at the same index, the
    # step (element s of the pipeline is step s's global batch), so the state alone says where to go on.
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    data_iterator.set_state({**data_iterator.get_state(), "next_index": int(restored.state.step)})
    return restored.state


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, the template orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
