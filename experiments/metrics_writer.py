"""Where metrics go: `metrics.jsonl` (CONTRACTS §1), TensorBoard event files, and a progress line.

Only process 0 writes. Each event is one JSON object per line, appended, so a resumed run
continues the file: {"step": 500, "split": "train", "loss": 0.0123, ...} with plain floats.
"""

import json
import os
import sys
import time

import tensorboardX


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def read(workdir: str, split: str | None = None) -> list[dict]:
    """Every event in `metrics.jsonl` (of one split, if given), in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f if line.strip()]
    return events if split is None else [e for e in events if e["split"] == split]


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
