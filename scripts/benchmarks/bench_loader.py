"""The prepared-store data path at growing corpus sizes: preparing, the loader's speed, and the trainer's memory.

    python scripts/benchmarks/bench_loader.py [--sizes_mb=1,10,100] [--steps=40] [--medium_steps=12] \
        [--medium=d_model=512,num_layers=6,num_heads=8,d_mlp=2048] [--workers=2] [--loader_workers=0,1,2,4]

For each size: writes a JSONL corpus of that many MB (documents of 200-3,000 characters drawn from a fixed
1,000-word vocabulary), prepares it with the byte tokenizer (`data.prepare`, `--workers` processes: MB/s), reads
200 batches of 16 x 256 tokens from the training stream (the loader's tokens/s: in this process, then with each
`--loader_workers` count of grain worker processes, `data.workers`), then trains
the small LM (`lm_shakespeare.py`, width 128, 4 layers) on the store for `--steps` steps through the command
line in a subprocess, sampling its resident memory (/proc/PID/status VmRSS) ten times a second: the peak RSS,
and the trainer's own tokens/s from metrics.jsonl; then the medium LM (`--medium`, config.model overrides of
the small one; by default `bench_train.py`'s medium: width 512, 6 layers, 8 heads, MLP 2048) for `--medium_steps`
steps, for its tokens/s. A lazy loader keeps the peak flat
across sizes, and outruns both trainers. Prints one Markdown row per size.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from data import TokensConfig, prepare, token_store  # noqa: E402

_SIZES = flags.DEFINE_list("sizes_mb", ["1", "10", "100"], "Corpus sizes in MB.")
_STEPS = flags.DEFINE_integer("steps", 40, "Training steps of the small LM per size.")
_MEDIUM_STEPS = flags.DEFINE_integer("medium_steps", 12, "Training steps of the medium LM per size (0: not run).")
_MEDIUM = flags.DEFINE_list("medium", ["d_model=512", "num_layers=6", "num_heads=8", "d_mlp=2048"],
                            "The medium LM: config.model overrides of the small one (bench_train.py's medium).")
_WORKERS = flags.DEFINE_integer("workers", 2, "data.prepare worker processes.")
_LOADER_WORKERS = flags.DEFINE_list("loader_workers", ["0", "1", "2", "4"], "data.workers values the loader is timed at.")
_ROOT = flags.DEFINE_string("root", None, "Folder for the corpora and runs (default: a temporary one, removed).")


def write_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(1000)]
    written, target = 0, int(megabytes * 1e6)
    with open(path, "w") as f:
        while written < target:
            text = " ".join(rng.choice(words, size=int(rng.integers(40, 600))))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
    return written


def loader_tokens_per_s(store: str, workers: int, batches: int = 200) -> float:
    config = TokensConfig(stores=store, seq_len=256, workers=workers)
    stream = iter(token_store.train_batches(config, batch_size=16, seed=0))
    for _ in range(5):  # the workers started and their buffers filled
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * 16 * 256 / (time.perf_counter() - start)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


SMALL = ()  # lm_shakespeare.py as it is


def train(store: str, workdir: str, steps: int, model=SMALL) -> tuple[float, float]:
    """(peak RSS in MB, the trainer's median tokens/s after its first logging window) of a run on the store."""
    log_every = max(1, min(5, steps // 4))
    command = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/lm_shakespeare.py",
               "--config.data.name=tokens", f"--config.data.stores={store}", "--config.data.seq_len=256",
               "--config.data.batch_size=16", "--config.data.eval_tokens=4096", f"--config.train.steps={steps}",
               f"--config.train.log_every={log_every}", "--config.train.eval_every=0",
               f"--config.train.checkpoint_every={steps}", f"--workdir={workdir}", *model]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run, peak = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True), 0.0
    while run.poll() is None:
        try:
            peak = max(peak, _rss_mb(run.pid))
        except (FileNotFoundError, StopIteration):
            pass
        time.sleep(0.1)
    if run.returncode:
        raise SystemExit(f"the run on {store} failed: {run.stderr.read()[-2000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        speeds = [(e["step"], e["tokens_per_s"]) for e in map(json.loads, f) if e["split"] == "train"]
    after_compiling = [v for step, v in speeds if step > log_every] or [v for _, v in speeds]
    return peak, float(np.median(after_compiling))


def main(argv):
    del argv
    root = _ROOT.value or tempfile.mkdtemp(prefix="bench-loader-")
    workers = "/".join(w if int(w) else "in-process" for w in _LOADER_WORKERS.value)
    print(f"| corpus | documents | tokens | prepare (MB/s) | loader (tokens/s; {workers} workers) | small trainer (tokens/s) "
          "| medium trainer (tokens/s) | small trainer's peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for size in map(float, _SIZES.value):
            corpus, store = os.path.join(root, f"corpus_{size:g}.jsonl"), os.path.join(root, f"store_{size:g}")
            written = write_corpus(corpus, size)
            start = time.perf_counter()
            manifest = prepare.prepare([corpus], store, workers=_WORKERS.value)
            prepare_mb_s = written / 1e6 / (time.perf_counter() - start)
            loader = " / ".join(f"{loader_tokens_per_s(store, int(w)):,.0f}" for w in _LOADER_WORKERS.value)
            peak, small_speed = train(store, os.path.join(root, f"run_{size:g}"), _STEPS.value)
            medium = [f"--config.model.{override}" for override in _MEDIUM.value]
            medium_speed = (train(store, os.path.join(root, f"medium_{size:g}"), _MEDIUM_STEPS.value, medium)[1]
                            if _MEDIUM_STEPS.value else float("nan"))
            print(f"| {size:g} MB | {manifest['documents']:,} | {manifest['tokens']:,} | {prepare_mb_s:.1f} | "
                  f"{loader} | {small_speed:,.0f} | {medium_speed:,.0f} | {peak:.0f} |", flush=True)
    finally:
        if not _ROOT.value:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
