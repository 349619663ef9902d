"""Language modelling on prepared token stores (`python -m data.prepare`), read lazily through grain.

    store: documents d_0 .. d_{N-1} (token ids, ArrayRecord records); document i is held out for evaluation
           iff h(i) < data.eval_fraction, h(i) = frac(i * 0.6180339887...) (Fibonacci hashing: uniform, no pattern)
    train: `data.streams` = S independent streams (0: one per process), stream s reading the kept documents
           with index = s mod S, shuffled by (seed, epoch) and repeated; with several stores, interleaved by
           `data.weights` (grain's mixing); each global batch takes batch_size / S rows from every stream, and
           process p of P reads the streams s = p mod P, so a fixed S gives the same global batches on 1, 2, ...
           processes (any P that divides S)
    each document d -> inputs d[:-1], targets d[1:]  (one-token documents have no target and are dropped)
    rows of seq_len by grain's packers (`data.packing`, `PACKINGS`): concat-then-split (no padding; a document
           may continue in the next row), first-fit or best-fit (documents cut into pieces of at most seq_len,
           placed whole into the batch's rows, the rest padded):
           segment_ids 1, 2, ... for the pieces in the row (0: padding), positions 0, 1, ... restarting at each
           piece, loss_mask = segment_ids > 0, so no target is ever a token of another document
    eval:  each store's held-out documents in order, concatenated then split, up to data.eval_tokens tokens

`data.workers` = W > 0 reads and packs in W grain worker processes (`mp_prefetch`; needs absl's flags parsed, as
the command line does). Memory does not grow with the corpus: records are read when a batch needs them (the shuffle permutes indices,
not documents), and a process touches only its documents. The iterator's position is checkpointed with the
run (grain), so a resumed run continues with the very next batch.
"""

import functools
import json
import os

import grain
import grain.experimental
import numpy as np

from data import text

MANIFEST = "manifest.json"
GOLDEN = 0.6180339887498949


def stores_of(config) -> list[str]:
    return [text.resolve_path(s) for s in config.stores.split(",") if s]


def weights_of(config) -> list[float]:
    return [float(w) for w in config.weights.split(",") if w] if config.weights else [1.0] * len(stores_of(config))


def read_manifest(store: str) -> dict:
    with open(os.path.join(store, MANIFEST)) as f:
        return json.load(f)


def validate(config) -> list[str]:
    """Problems with a `data.name="tokens"` config, as one-line messages (empty when fine)."""
    stores = stores_of(config)
    if not stores:
        return ["data.stores is empty: name one or more folders written by `python -m data.prepare`"]
    problems, manifests = [], []
    for store in stores:
        try:
            manifests.append(read_manifest(store))
        except FileNotFoundError:
            problems.append(f"data.stores: {store} holds no {MANIFEST}; prepare it with "
                            f"`python -m data.prepare --input=... --out={store}` (or let a killed prepare finish)")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            problems.append(f"data.stores: {os.path.join(store, MANIFEST)} is not valid JSON ({error})")
    if config.streams and config.batch_size % config.streams:
        problems.append(f"data.batch_size={config.batch_size} must be a multiple of data.streams={config.streams} "
                        "(each stream gives every batch the same number of rows)")
    if len({(m["tokenizer"], m["vocab_size"]) for m in manifests}) > 1:
        problems.append(f"data.stores have different tokenizers: {[m['tokenizer'] for m in manifests]}")
    try:
        weights = weights_of(config)
        if len(weights) != len(stores) or min(weights) <= 0:
            problems.append(f"data.weights={config.weights!r} must be {len(stores)} positive numbers, one per store")
    except ValueError:
        problems.append(f"data.weights={config.weights!r} must be comma-separated numbers")
    return problems


def held_out(indices: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each document index is held out for evaluation."""
    return np.modf(np.asarray(indices, np.float64) * GOLDEN)[0] < fraction


class _Documents(grain.sources.ArrayRecordDataSource):
    """A store's documents as int32 token arrays, by index."""

    def __init__(self, store: str):
        manifest = read_manifest(store)
        super().__init__([os.path.join(store, s["file"]) for s in manifest["shards"]])
        self._dtype = np.dtype(manifest["dtype"])

    def __getitem__(self, index):
        return np.frombuffer(super().__getitem__(index), self._dtype).astype(np.int32)


def _next_token_pairs(document: np.ndarray) -> dict:
    return {"inputs": document[:-1], "targets": document[1:]}


class _Pieces(grain.experimental.FlatMapTransform):
    """A document's inputs / targets in consecutive pieces of at most `length` (first- and best-fit packing place
    whole elements, so a longer document is cut first; each piece is its own segment)."""

    max_fan_out = 1 << 24

    def __init__(self, length: int):
        self.length = length

    def flat_map(self, pair: dict) -> list[dict]:
        return [{k: v[i:i + self.length] for k, v in pair.items()} for i in range(0, len(pair["inputs"]), self.length)]


def _concat_then_split(documents, length: dict, bins: int, seed: int) -> grain.IterDataset:
    """Documents concatenated, then cut into rows: no padding but a row's last document continues in the next."""
    del bins, seed
    return grain.experimental.ConcatThenSplitIterDataset(documents, length_struct=length)


def _fitted(packer, documents, length: dict, bins: int, seed: int) -> grain.IterDataset:
    """Pieces placed whole into `bins` open rows (the first that fits, or the one it fills most), then emitted."""
    pieces = grain.experimental.FlatMapIterDataset(documents, _Pieces(length["inputs"]))
    return packer(pieces, length_struct=length, num_packing_bins=bins, seed=seed)


# data.packing -> (documents, {"inputs": L, "targets": L}, rows packed at once, seed) -> rows (grain's packers)
PACKINGS = {"concat_then_split": _concat_then_split,
            "first_fit": functools.partial(_fitted, grain.experimental.FirstFitPackIterDataset),
            "best_fit": functools.partial(_fitted, grain.experimental.BestFitPackIterDataset)}


def _packed(documents: grain.IterDataset, seq_len: int, packing: str = "concat_then_split", bins: int = 1,
            seed: int = 0) -> grain.IterDataset:
    """Documents (dicts of inputs / targets) -> rows of seq_len with segment ids, positions and the loss mask."""
    packed = PACKINGS[packing](documents, {"inputs": seq_len, "targets": seq_len}, bins, seed)
    return packed.map(lambda row: {"inputs": row["inputs"], "targets": row["targets"],
                                   "loss_mask": (row["inputs_segment_ids"] > 0).astype(np.float32),
                                   "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]})


def _train_documents(store: str, eval_fraction: float, seed: int, stream: int, streams: int) -> grain.IterDataset:
    source = _Documents(store)
    kept = grain.MapDataset.range(len(source)).filter(lambda i: not held_out(i, eval_fraction))
    mine = kept[stream::streams]
    documents = mine.shuffle(seed=seed).repeat(None).map(lambda i: source[i]).filter(lambda d: len(d) > 1)
    return documents.map(_next_token_pairs).to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                                               prefetch_buffer_size=64))


def train_batches(config, *, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
    """This process's slice of every global training batch (batch_size // process_count rows), for ever: the rows of
    its streams in turn (equal weights: exact round robin)."""
    streams = config.streams or process_count
    if streams % process_count or batch_size % streams:
        raise ValueError(f"data.streams={config.streams} gives {streams} streams, which must be a multiple of the "
                         f"{process_count} processes and divide data.batch_size={batch_size}")
    rows = [_stream_rows(config, s, streams, batch_size // streams, seed) for s in range(process_index, streams,
                                                                                           process_count)]
    mixed = rows[0] if len(rows) == 1 else grain.IterDataset.mix(rows, [1.0] * len(rows))
    batches = mixed.batch(batch_size // process_count, drop_remainder=True)
    if not config.workers:
        return batches
    return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))  # checkpointable too


def _stream_rows(config, stream: int, streams: int, rows_per_batch: int, seed: int) -> grain.IterDataset:
    """Stream `stream` of `streams`: its documents of every store, mixed by weight, packed into rows."""
    sources = [_train_documents(store, config.eval_fraction, seed + k, stream, streams)
               for k, store in enumerate(stores_of(config))]
    documents = sources[0] if len(sources) == 1 else grain.IterDataset.mix(sources, weights_of(config))
    return _packed(documents, config.seq_len, config.packing, bins=rows_per_batch, seed=seed)


def eval_examples(config) -> dict[str, dict[str, np.ndarray]]:
    """Each store's held-out rows ("eval" for one store, the store folders' names for several)."""
    stores = stores_of(config)
    names = ["eval"] if len(stores) == 1 else [os.path.basename(os.path.normpath(s)) for s in stores]
    return {name: _held_out_rows(store, config) for name, store in zip(names, stores)}


def _held_out_rows(store: str, config) -> dict[str, np.ndarray]:
    source, picked, tokens = _Documents(store), [], 0
    for start in range(0, len(source), 4096):
        indices = np.arange(start, min(start + 4096, len(source)))
        for i in indices[held_out(indices, config.eval_fraction)]:
            document = source[int(i)]
            if len(document) > 1:
                picked.append(document)
                tokens += len(document) - 1
            if tokens >= config.eval_tokens:
                break
        if tokens >= config.eval_tokens:
            break
    if not picked:
        raise ValueError(f"data.eval_fraction={config.eval_fraction} holds out no document of {store} "
                         f"({len(source)} documents); raise it")
    documents = grain.MapDataset.source(picked).map(_next_token_pairs).to_iter_dataset()
    rows = list(_packed(documents, config.seq_len))
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def sample_rows(config, seed: int, rows: int = 64) -> dict[str, np.ndarray]:
    """The first rows of the training stream (process 0 of 1): what tools that want `splits.train` arrays see."""
    iterator = iter(train_batches(config, batch_size=rows, seed=seed))
    return next(iterator)


def identity(config) -> dict:
    """The stores a run reads: each manifest's shard checksums (a resume with other data is refused)."""
    return {"stores": {store: [s["sha256"] for s in read_manifest(store)["shards"]] for store in stores_of(config)}}
