"""Orbax checkpoints of the train state and the grain data iterator, in `WORKDIR/checkpoints/`, each
step sealed by a manifest so that a resume can tell a damaged step from a good one.

    save:    orbax writes step N to a temporary folder and renames it when complete, so a kill mid-save
             leaves the previous step the latest (the writer's next start removes the temporary folder).
    seal:    once step N is complete (checked before the next save starts, and at the end of the run),
             process 0 writes `checkpoints/N/manifest.json`: every file's size and CRC-32, atomically.
    resume:  newest step first: a step whose files differ from its manifest (truncated, deleted,
             corrupted), or that orbax cannot restore, is reported in one line and moved to
             `WORKDIR/damaged_checkpoints/` (nothing is deleted); the first step that passes wins.
             A step killed between its rename and its seal has no manifest and is taken on orbax's word.
             A sealed step whose files all match but that does not restore is not damaged: the state this code
             builds changed since it was saved; the run stops in one line and moves nothing.

Replica-parallel writes (orbax splits a replicated array so that each replica writes a part) apply to slices
of at least `REPLICA_PARALLEL_MIN_BYTES`: below that, slicing (one small program per piece) costs more than
the parallel write saves (on 8 CPU devices it was most of a small run's save time).

A save that cannot succeed (less free space than the state's bytes, a folder that is not writable) is
refused before it starts; a save that fails midway (the disk fills up during the write) is reported when
the next save or the end of the run waits for it. Both raise `CheckpointWriteError`, one line, and the
previous step stays the latest.
"""

import errno
import json
import os
import shutil
import zlib

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

MANIFEST = "manifest.json"
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _register_array_handler() -> None:
    """jax.Array's handler with `REPLICA_PARALLEL_MIN_BYTES`; orbax warns on every override, wanted here."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)
    finally:
        logging.set_verbosity(verbosity)


_register_array_handler()


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the step, the cause and the latest good step."""


class NoGoodCheckpointError(RuntimeError):
    """Every checkpoint in the workdir is damaged; the message names the workdir."""


class IncompatibleCheckpointError(NoGoodCheckpointError):
    """A checkpoint whose files are intact does not fit the state this code builds (a code or config change): it is
    left where it is, and the run stops."""


def manager(workdir: str, keep: int, async_save: bool = True, writer: bool = False) -> ocp.CheckpointManager:
    """`writer`: the training run's own manager, which also removes the temporary folders of killed saves
    (a reader must not: the run may be writing one)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=writer)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def has_checkpoints(workdir: str) -> bool:
    """Whether `workdir` holds any checkpoint step folder (intact or not), without opening a manager."""
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class Checkpoints:
    """The training run's writer: saves steps asynchronously and seals each one once it is complete."""

    def __init__(self, workdir: str, keep: int, latest_good: int | None):
        self.mngr = manager(workdir, keep, writer=True)
        self.latest_good = latest_good
        self._unsealed: list[int] = []

    @property
    def last_saved(self) -> int | None:
        """The newest step saved or being saved (its loss was checked before the save)."""
        return self._unsealed[-1] if self._unsealed else self.latest_good

    def finish_pending(self) -> None:
        """Waits for the save in flight (raising its error, if any) and seals what it completed."""
        step = self._unsealed[-1] if self._unsealed else None
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # orbax re-raises the background thread's error here
            self._unsealed.clear()  # not good: never sealed, never the fallback
            raise CheckpointWriteError(self._write_failure(step, e)) from e
        if jax.process_index() == 0:
            for done in self._unsealed:
                seal(os.path.join(str(self.mngr.directory), str(done)))
        if self._unsealed:
            self.latest_good = self._unsealed[-1]
        self._unsealed.clear()

    def _write_failure(self, step, error) -> str:
        return (f"could not write checkpoint step {step} in {self.mngr.directory} ({_first_line(error)}); "
                f"the latest good checkpoint is step {self.latest_good} (free space or fix permissions, then rerun)")

    def _check_room(self, step: int, state) -> None:
        """Refuses a save that cannot succeed, before orbax starts writing."""
        directory = str(self.mngr.directory)
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
        free = shutil.disk_usage(directory).free
        if free < needed:
            raise CheckpointWriteError(self._write_failure(step, OSError(
                errno.ENOSPC, f"{free} bytes free, the state needs {needed}")))
        if not os.access(directory, os.W_OK):
            raise CheckpointWriteError(self._write_failure(step, OSError(errno.EACCES, "the folder is not writable")))

    def save(self, step: int, state, data_iterator) -> None:
        self.finish_pending()
        self._check_room(step, state)
        try:
            self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=grain.checkpoint.CheckpointSave(data_iterator)),
                           force=True)
        except Exception as e:
            raise CheckpointWriteError(self._write_failure(step, e)) from e
        self._unsealed.append(step)

    def restore(self, step: int, abstract_state, data_iterator):
        """Step `step`'s state, with `data_iterator` moved to where it was (a NaN rollback's target)."""
        self.finish_pending()
        return _restore_step(self.mngr, step, abstract_state, data_iterator)

    def close(self) -> None:
        try:
            self.finish_pending()
        finally:
            self.mngr.close()


def _files(step_dir: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), step_dir)
                  for root, _, names in os.walk(step_dir) for name in names if name != MANIFEST)


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def seal(step_dir: str) -> None:
    """Writes the step's manifest ({relative path: [bytes, crc32]}) atomically."""
    manifest = {name: [os.path.getsize(os.path.join(step_dir, name)), _crc32(os.path.join(step_dir, name))]
                for name in _files(step_dir)}
    temporary = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(temporary, "w") as f:
        json.dump({"files": manifest}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(step_dir, MANIFEST))


def damage(step_dir: str) -> str | None:
    """What differs from the step's manifest (first difference), or None if nothing does or it has none."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable manifest ({_first_line(e)})"
    for name, (size, crc) in sorted(expected.items()):
        file = os.path.join(step_dir, name)
        if not os.path.exists(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, the manifest {size}"
        if _crc32(file) != crc:
            return f"{name} fails its CRC-32"
    return None


def _restore_step(mngr, step: int, abstract_state, data_iterator):
    data_file = os.path.join(str(mngr.directory), str(step), "data",
                             f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if os.path.exists(data_file):
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored.state
    # Saved by another number of processes: every process's iterator stood at the same index, the
    # step plus the batches skipped by NaN rollbacks (element i of the pipeline is global batch i).
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    next_index = int(restored.state.step) + int(getattr(restored.state, "data_skipped", 0))
    data_iterator.set_state({**data_iterator.get_state(), "next_index": next_index})
    return restored.state


def restore_latest(workdir: str, abstract_state, data_iterator, warn=print):
    """The newest good step's state (placed like `abstract_state`'s shardings) with `data_iterator` moved to
    where it was; None when there is no checkpoint; NoGoodCheckpointError when every step is damaged.
    Each damaged step is reported through `warn` (one line) and moved aside."""
    mngr = manager(workdir, keep=1, async_save=False)
    steps = sorted(mngr.all_steps(), reverse=True)
    try:
        for step in steps:
            step_dir = os.path.join(str(mngr.directory), str(step))
            problem = damage(step_dir)
            if problem is None:
                try:
                    return _restore_step(mngr, step, abstract_state, data_iterator)
                except Exception as e:  # truncated / missing / corrupted files orbax trips over
                    if os.path.exists(os.path.join(step_dir, MANIFEST)):  # sealed and intact: not damage
                        raise IncompatibleCheckpointError(
                            f"checkpoint step {step} in {workdir} is intact (its files match their seal) but does not "
                            f"restore into this run's state ({_first_line(e)}): the code or a key that shapes the "
                            "state changed since it was saved; nothing was moved (resume with the code that wrote "
                            "it, or use a fresh --workdir)") from None
                    problem = f"orbax cannot restore it: {_first_line(e)}"
            aside = _move_aside(workdir, step_dir)
            warn(f"warning: checkpoint step {step} in {workdir} is damaged ({problem}); "
                 f"moved to {aside}, trying the previous step")
    finally:
        mngr.close()
    if steps:
        raise NoGoodCheckpointError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')} restores (steps "
                                    f"{sorted(steps)} are damaged, now in damaged_checkpoints/); "
                                    "use a fresh --workdir to start again")
    return None


def _move_aside(workdir: str, step_dir: str) -> str:
    """Moves a damaged step to WORKDIR/damaged_checkpoints/ (process 0; the others see it gone)."""
    target = os.path.join(workdir, "damaged_checkpoints", os.path.basename(step_dir))
    if jax.process_index() == 0 and os.path.exists(step_dir):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        suffix = 0
        while os.path.exists(target + (f".{suffix}" if suffix else "")):
            suffix += 1
        target += f".{suffix}" if suffix else ""
        shutil.move(step_dir, target)
    return target


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, the template orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
