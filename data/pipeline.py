"""Batches as grain datasets: deterministic by seed, sharded per process, checkpointable.

A dataset of N examples (a dict of [N, ...] arrays) becomes an infinite grain `MapDataset` of
*batches*: element s is step s's global batch, the rows `perm_e[i*B:(i+1)*B]` of epoch
e = s // batches_per_epoch under the seeded permutation perm_e, of which process k keeps the
k-th of `process_count` equal slices. Batches are gathered with NumPy, not record by record, and
grain provides the iterator (prefetch, `get_state` / `set_state` for orbax checkpoints).

With `drop_remainder=False` the last, short batch of an epoch is padded with copies of row 0
whose `loss_mask` is zero, so a batch can be larger than the data (full-batch training) and an
evaluation pass sees every example exactly once.

A curriculum (`staged`) chains datasets: stage k's examples for `epochs_per_stage` epochs each, the
last stage for ever; step s belongs to stage `stage_of(starts, s)`.
"""

import bisect
import functools

import grain
import numpy as np


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def batched(examples: dict[str, np.ndarray], *, batch_size: int, seed: int, shuffle: bool = True,
            num_epochs: int | None = None, drop_remainder: bool = True,
            process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Step s -> this process's slice of global batch s, {"inputs", "targets", "loss_mask", ...}."""
    n = len(examples["inputs"])
    per_epoch = num_batches(n, batch_size, drop_remainder)
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the {n} examples with drop_remainder=True")
    make_batch = _batch_maker(examples, batch_size, (seed,), shuffle, process_index, process_count)
    return grain.MapDataset.range(per_epoch).repeat(num_epochs).map_with_index(
        lambda step, index_in_epoch: make_batch(step // per_epoch, index_in_epoch))


def _batch_maker(examples, batch_size: int, seed: tuple, shuffle: bool, process_index: int, process_count: int):
    """(epoch, batch index in the epoch) -> this process's slice of that batch."""
    n = len(examples["inputs"])
    per_process = batch_size // process_count

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch):
        return np.random.default_rng((*seed, epoch)).permutation(n) if shuffle else np.arange(n)

    def make_batch(epoch, index_in_epoch):
        order = epoch_order(epoch)
        rows = np.arange(index_in_epoch * batch_size, (index_in_epoch + 1) * batch_size)
        rows = rows[process_index * per_process:(process_index + 1) * per_process]
        valid = rows < n
        picked = order[np.where(valid, rows, 0)]
        batch = {k: v[picked] for k, v in examples.items()}
        batch["loss_mask"] = batch["loss_mask"] * valid[:, None].astype(np.float32)
        return batch

    return make_batch


def staged(stages, *, epochs_per_stage: int, batch_size: int, seed: int, process_index: int = 0,
           process_count: int = 1) -> tuple[grain.MapDataset, list[int]]:
    """(an infinite dataset of step s -> batch s of the curriculum, the first step of every stage).

    Stage k (each a dict of [N_k, L] arrays, one L for all) runs `epochs_per_stage` epochs of full batches,
    shuffled by (seed, k, epoch); the last stage runs for ever."""
    per_epoch = [num_batches(len(s["inputs"]), batch_size, True) for s in stages]
    if min(per_epoch) == 0:
        raise ValueError(f"batch_size={batch_size} is larger than a curriculum stage of "
                         f"{min(len(s['inputs']) for s in stages)} examples")
    starts = [0]
    for k in per_epoch[:-1]:
        starts.append(starts[-1] + epochs_per_stage * k)
    makers = [_batch_maker(s, batch_size, (seed, k), True, process_index, process_count) for k, s in enumerate(stages)]

    def make_batch(step, _):
        stage = stage_of(starts, step)
        local = step - starts[stage]
        return makers[stage](local // per_epoch[stage], local % per_epoch[stage])

    return grain.MapDataset.range(1).repeat(None).map_with_index(make_batch), starts


def stage_of(starts: list[int], step: int) -> int:
    """The curriculum stage that step `step` (0-based) trains in."""
    return bisect.bisect_right(starts, step) - 1


def iterator(dataset: grain.MapDataset | grain.IterDataset, prefetch: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator over the batches, prefetched by a background thread (a stream read lazily,
    an `IterDataset`, brings its own reading options)."""
    if isinstance(dataset, grain.MapDataset):
        dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    return iter(dataset)
