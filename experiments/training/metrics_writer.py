"""Where metrics go: `metrics.jsonl` (docs/interfaces.md), TensorBoard event files, optionally Weights & Biases, and
a progress line.

Only process 0 writes. Each event is one JSON object per line, {"step": 500, "split": "train", "loss": 0.0123,
...} with plain floats, appended, so a resumed run continues the file; the one rewrite drops a last line torn
by a kill. A resumed run logs again the steps between its checkpoint and the kill: the later event wins.
"""

import json
import os
import sys
import time


def _import_tensorboardx():
    """tensorboardX without torch: it imports torch (seconds, when the `hf` extra installed it) only to accept
    torch tensors, and this writer passes it floats. Every process that writes metrics saves those seconds."""
    if "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


tensorboardX = _import_tensorboardx()


class MetricsWriter:
    """`tracker`: another sink with `log(step, split, values)` and `finish()` (a W&B run, training/wandb_run.py)."""

    def __init__(self, workdir: str, enabled: bool = True, tracker=None):
        self.enabled, self._tracker = enabled, tracker
        if enabled:
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_torn_line(path)
            self._jsonl = open(path, "a")
            self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{key}", value, step)
        if self._tracker:
            self._tracker.log(int(step), split, values)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
            if self._tracker:
                self._tracker.finish()


def _drop_torn_line(path: str) -> None:
    """Truncates a last line without its newline (a writer killed mid-write), so appending goes on cleanly."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0 or (f.seek(size - 1) is not None and f.read(1) == b"\n"):
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def read(workdir: str, split: str | None = None) -> list[dict]:
    """Every event in `metrics.jsonl` (of one split, if given), in order; a torn last line (a writer killed
    mid-write, or one still writing) is not an event."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        complete = f.read().split("\n")[:-1]
    events = [json.loads(line) for line in complete if line.strip()]
    return events if split is None else [e for e in events if e["split"] == split]


def training_wall_s(workdir: str) -> float:
    """The training loop's wall time over every process that ran it: each process's train events carry `wall_s`
    from its own start, so a restart shows as `wall_s` falling and the run's time is the sum of every process's
    last event."""
    walls = [e["wall_s"] for e in read(workdir, "train") if "wall_s" in e]
    return sum(last for last, following in zip(walls, walls[1:] + [0.0]) if following < last)


class Progress:
    """`step 1200/20000  loss 0.0123  85.1 steps/s  ETA 0:03:32`, redrawn in place on a terminal."""

    def __init__(self, total_steps: int, first_step: int, enabled: bool = True):
        self.total, self.enabled = total_steps, enabled
        self._start_time, self._start_step = time.perf_counter(), first_step
        self._live = enabled and sys.stdout.isatty()

    def update(self, step: int, metrics: dict, extra: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._start_time
        rate = (step - self._start_step) / max(elapsed, 1e-9)
        eta = int((self.total - step) / rate) if rate > 0 else 0
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        line = f"step {step}/{self.total}  {shown}  {rate:.1f} steps/s  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        if extra:
            line += "  | " + extra
        print(("\r\033[K" if self._live else "") + line, end="" if self._live else "\n", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self._live else "") + text, flush=True)
