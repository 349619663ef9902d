"""Prepare a corpus once: documents in, ArrayRecord shards of token ids and a manifest out.

    python -m data.prepare --input=PATTERN[,PATTERN...] --out=DIR [--tokenizer=byte|sentencepiece:MODEL|hf:TOKENIZER_JSON]
        [--text_field=text] [--workers=N] [--documents_per_shard=4096] [--runner=local|beam [--beam_options=...]]

The inputs are read as `data/corpus_files.py` says (text files, directories, globs, JSONL, Parquet), in a fixed
order; document i goes to shard i // documents_per_shard, so the shards depend only on the inputs and the
flags, never on the number of workers. Worker processes tokenize and write whole shards:

    DIR/tokens-00000.array_record, ...   one record per document: its token ids, little-endian `dtype`
    DIR/manifest.json                    {"tokenizer", "vocab_size", "dtype", "documents", "tokens",
                                          "shards": [{"file", "documents", "tokens", "bytes", "sha256"}],
                                          "request": the inputs (paths, sizes) and flags}

A shard is written under a temporary name and renamed when complete, then noted in `DIR/.progress/`; a killed
prepare, run again, skips the noted shards and writes the rest; a finished `DIR` (its manifest written last)
is left as it is. Documents that tokenize to nothing are skipped. Bad input (a file that cannot be read, not
UTF-8, a missing field, no documents at all, a `DIR` holding a store of other inputs or flags) exits with
status 2 and one line; the shards written before it stay valid for the rerun.
"""

import collections
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator

from absl import app, flags
import numpy as np
import tqdm

from data import corpus_files, sha256_of_file, text

MANIFEST = "manifest.json"
PROGRESS = ".progress"


class PrepareError(ValueError):
    """Input or output the prepare cannot use; one line."""


def tokenizer_from_spec(spec: str):
    """`byte`, `sentencepiece:MODEL_FILE` or `hf:TOKENIZER_JSON` -> a tokenizer of data/text.py."""
    kind, _, path = spec.partition(":")
    if kind not in ("byte", "sentencepiece", "hf") or (kind == "byte") != (not path):
        raise PrepareError(f"--tokenizer={spec!r} is not one of byte, sentencepiece:MODEL_FILE, hf:TOKENIZER_JSON")
    if path and not os.path.exists(text.resolve_path(path)):
        raise PrepareError(f"--tokenizer={spec!r}: no such file {text.resolve_path(path)}")
    return text.tokenizer(kind, path)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def shard_name(index: int) -> str:
    return f"tokens-{index:05d}.array_record"


def request_of(files: list[str], tokenizer_spec: str, text_field: str, documents_per_shard: int) -> dict:
    """What the store is made of: a `DIR` is resumed, or left alone, only for the same request."""
    tokenizer = tokenizer_spec.partition(":")
    return {"inputs": [{"path": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files],
            "tokenizer": tokenizer[0], "tokenizer_sha256": sha256_of_file(text.resolve_path(tokenizer[2])) if tokenizer[2]
            else "", "text_field": text_field, "documents_per_shard": documents_per_shard}


# A worker's tokenizer, built once per process by `_start_worker`.
_worker_tokenizer = None


def _start_worker(tokenizer_spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_spec(tokenizer_spec)


def write_shard(out: str, dtype: str, job: tuple[int, list[str]]) -> dict:
    """Tokenizes one shard's documents and writes them (temporary name, then renamed); returns its entry."""
    from array_record.python import array_record_module  # grain's record format

    index, docs = job
    path = os.path.join(out, shard_name(index))
    ids = [np.asarray(_worker_tokenizer.encode(d), dtype) for d in docs]
    ids = [i for i in ids if len(i)]
    writer = array_record_module.ArrayRecordWriter(path + ".tmp", "group_size:1")
    for record in ids:
        writer.write(record.tobytes())
    writer.close()
    os.replace(path + ".tmp", path)
    entry = {"file": shard_name(index), "documents": len(ids), "tokens": int(sum(len(i) for i in ids)),
             "bytes": os.path.getsize(path), "sha256": sha256_of_file(path)}
    with open(os.path.join(out, PROGRESS, f"{index:05d}.json"), "w") as f:
        json.dump(entry, f)
    return entry


def _finished_shards(out: str) -> dict[int, dict]:
    """The shards a previous (killed) run completed: noted, and their file still of the noted size."""
    folder, done = os.path.join(out, PROGRESS), {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name[0].isdigit():
            with open(os.path.join(folder, name)) as f:
                entry = json.load(f)
            path = os.path.join(out, entry["file"])
            if os.path.exists(path) and os.path.getsize(path) == entry["bytes"]:
                done[int(name.split(".")[0])] = entry
    return done


def _shard_jobs(files: list[str], text_field: str, documents_per_shard: int) -> Iterator[tuple[int, list[str], int]]:
    """(shard index, its documents, input bytes consumed once they are read) in order."""
    before, consumed = 0, 0

    def stream():
        nonlocal before, consumed
        for path in files:
            for doc, position in corpus_files.documents(path, text_field):
                consumed = before + position
                yield doc
            before += os.path.getsize(path)
            consumed = before

    docs = stream()
    for index in itertools.count():
        chunk = list(itertools.islice(docs, documents_per_shard))
        if not chunk:
            return
        yield index, chunk, consumed


class _Done:
    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value


class _InProcessPool(contextlib.AbstractContextManager):
    """`--workers=1`: shards are tokenized in this process (no process start-up; any script may call it)."""

    def __init__(self, tokenizer_spec: str):
        _start_worker(tokenizer_spec)

    def apply_async(self, function, args) -> _Done:
        return _Done(function(*args))

    def __exit__(self, *exc):
        return False


def _pool(workers: int, tokenizer_spec: str):
    """Worker processes (spawned: the caller may hold threads, e.g. jax's) that build the tokenizer once each."""
    if workers == 1:
        return _InProcessPool(tokenizer_spec)
    return multiprocessing.get_context("spawn").Pool(workers, _start_worker, (tokenizer_spec,))


def _write_shards(pool, workers: int, jobs, done: dict, out: str, dtype: str, progress) -> None:
    """Hands the shards not `done` to the pool, at most two per worker in flight (the documents waiting are
    what the prepare holds in memory), advancing `progress` as each completes, in order."""
    in_flight, started, tokens, shown = collections.deque(), time.time(), 0, 0

    def complete(result, position):
        nonlocal tokens, shown
        tokens += result.get()["tokens"] if result else 0
        progress.update(position - shown)
        shown = position
        progress.set_postfix_str(f"{tokens / max(time.time() - started, 1e-9):.3g} tokens/s")

    for index, docs, consumed in jobs:
        in_flight.append((None if index in done else pool.apply_async(write_shard, (out, dtype, (index, docs))),
                          consumed))
        while in_flight and (len(in_flight) > 2 * workers or not in_flight[0][0] or in_flight[0][0].ready()):
            complete(*in_flight.popleft())
    while in_flight:
        complete(*in_flight.popleft())


def _check_out(out: str, request: dict) -> bool:
    """Whether `out` is already finished with this request; raises PrepareError if it holds (part of) another."""
    manifest, noted = os.path.join(out, MANIFEST), os.path.join(out, PROGRESS, "request.json")
    for path in (manifest, noted):
        if os.path.exists(path):
            with open(path) as f:
                recorded = json.load(f)
            if recorded.get("request", recorded) != request and (path == manifest or _finished_shards(out)):
                raise PrepareError(f"--out={out!r} holds a store prepared from other inputs or flags; choose another "
                                   "--out or remove it")
            return path == manifest
    return False


RUNNERS = ("local", "beam")  # worker processes on this machine; an Apache Beam pipeline (data/prepare_beam.py)


def prepare(inputs: list[str], out: str, tokenizer_spec: str = "byte", text_field: str = "text", workers: int = 1,
            documents_per_shard: int = 4096, show_progress: bool = False, runner: str = "local",
            beam_options: str = "") -> dict:
    """Prepares the store (or finishes a killed prepare); returns its manifest. runner "beam" writes the same shards
    through an Apache Beam pipeline (`beam_options`: Beam's pipeline options; default its DirectRunner)."""
    if runner not in RUNNERS:
        raise PrepareError(f"--runner={runner!r} is not one of {list(RUNNERS)}")
    files = corpus_files.expand(inputs)
    vocab_size = tokenizer_from_spec(tokenizer_spec).vocab_size
    request = request_of(files, tokenizer_spec, text_field, documents_per_shard)
    if _check_out(out, request):
        with open(os.path.join(out, MANIFEST)) as f:
            return json.load(f)
    os.makedirs(os.path.join(out, PROGRESS), exist_ok=True)
    with open(os.path.join(out, PROGRESS, "request.json"), "w") as f:
        json.dump(request, f)
    done, dtype = _finished_shards(out), token_dtype(vocab_size).str
    if runner == "beam":
        from data import prepare_beam

        prepare_beam.write_shards(files, text_field, documents_per_shard, set(done), beam_options,
                                  start_worker=functools.partial(_start_worker, tokenizer_spec),
                                  write_shard=functools.partial(write_shard, out, dtype), input_error=PrepareError)
    else:
        total = sum(os.path.getsize(f) for f in files)
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc="prepare",
                       disable=None if show_progress else True) as progress, _pool(workers, tokenizer_spec) as pool:
            _write_shards(pool, workers, _shard_jobs(files, text_field, documents_per_shard), done, out, dtype,
                          progress)
    entries = _finished_shards(out)
    shards = [entries[i] for i in sorted(entries)]
    if not sum(s["documents"] for s in shards):
        raise PrepareError(f"--input={','.join(inputs)!r}: no documents (every file is empty)")
    manifest = {"tokenizer": tokenizer_spec, "vocab_size": vocab_size, "dtype": dtype,
                "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                "shards": shards, "request": request}
    with open(os.path.join(out, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(out, MANIFEST + ".tmp"), os.path.join(out, MANIFEST))
    return manifest


def read_documents(out: str) -> list[np.ndarray]:
    """Every document of a prepared store, in order (for tests and small stores; training reads lazily)."""
    from array_record.python import array_record_module

    with open(os.path.join(out, MANIFEST)) as f:
        manifest = json.load(f)
    documents = []
    for shard in manifest["shards"]:
        reader = array_record_module.ArrayRecordReader(os.path.join(out, shard["file"]))
        documents += [np.frombuffer(r, manifest["dtype"]) for r in reader.read_all()]
        reader.close()
    return documents


def main(argv):
    del argv
    args = flags.FLAGS
    if not args.input or not args.out:
        print("error: pass --input=PATTERN[,PATTERN...] and --out=DIR", file=sys.stderr)
        sys.exit(2)
    try:
        manifest = prepare(args.input, args.out, args.tokenizer, args.text_field, args.workers,
                           args.documents_per_shard, show_progress=True, runner=args.runner,
                           beam_options=args.beam_options)
    except (PrepareError, corpus_files.CorpusError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.out}: {manifest['documents']} documents, {manifest['tokens']} tokens in "
          f"{len(manifest['shards'])} shards (vocabulary {manifest['vocab_size']}, {manifest['tokenizer']})")


if __name__ == "__main__":  # the flags exist only for the command
    flags.DEFINE_list("input", None, "Text files, directories, globs, .jsonl[.gz] or .parquet files.")
    flags.DEFINE_string("out", None, "The folder of the prepared store.")
    flags.DEFINE_string("tokenizer", "byte", "byte, sentencepiece:MODEL_FILE or hf:TOKENIZER_JSON.")
    flags.DEFINE_string("text_field", "text", "The JSONL field / Parquet column holding the text.")
    flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) - 1), "Tokenizing processes.")
    flags.DEFINE_integer("documents_per_shard", 4096, "Documents per ArrayRecord shard.")
    flags.DEFINE_string("runner", "local", "local (worker processes here) or beam (an Apache Beam pipeline, the "
                        "[beam] extra: the same shards).")
    flags.DEFINE_string("beam_options", "", "With --runner=beam: Beam's pipeline options (default: its DirectRunner).")
    app.run(main)
