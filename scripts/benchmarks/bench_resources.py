"""Bounded resources of a long run: host memory flat after warm-up, logs linear in logged steps, disk bounded.

    python scripts/benchmarks/bench_resources.py --steps=20000

Runs the tiny grokking config (`RUN_FLAGS`: logging every 10 steps, evaluating and checkpointing every 500,
keeping 3 checkpoints) through the command line in a subprocess and samples, twice a second, the process's
resident memory (/proc/PID/status VmRSS), the step it reached (the last line of metrics.jsonl), and the sizes
of metrics.jsonl, the TensorBoard folder and the checkpoints folder. Prints a table at each quarter of the run
and: the RSS slope after warm-up (the first 10% of steps) in MB per 1,000 steps by least squares; the bytes of
metrics.jsonl and of the TensorBoard events per logged event at each quarter (equal numbers = linear growth);
and the largest checkpoints folder against one checkpoint (keep_checkpoints of them plus the one being
written bound it), in each half of the run (equal = no growth).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEEP = 3
RUN_FLAGS = ["--config=experiments/configs/grokking.py", "--config.data.p=13", "--config.model.d_model=32",
             "--config.model.d_mlp=64", "--config.train.log_every=10", "--config.train.eval_every=500",
             "--config.train.checkpoint_every=500", f"--config.train.keep_checkpoints={KEEP}"]

_STEPS = flags.DEFINE_integer("steps", 20_000, "Training steps.")
_WARMUP = flags.DEFINE_float("warmup_fraction", 0.1, "Steps before the RSS slope is fitted, as a fraction.")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns) if os.path.isdir(path) else 0


def _last_step(metrics: str) -> int:
    if not os.path.exists(metrics) or os.path.getsize(metrics) == 0:
        return 0
    with open(metrics, "rb") as f:
        f.seek(max(0, os.path.getsize(metrics) - 4096))
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except ValueError:
            continue
    return 0


def measure(steps: int, workdir: str) -> tuple[list[dict], int]:
    """(the samples, the bytes of the largest finished checkpoint)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *RUN_FLAGS, f"--config.train.steps={steps}",
                             f"--workdir={workdir}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    samples, start = [], time.perf_counter()
    metrics = os.path.join(workdir, "metrics.jsonl")
    while proc.poll() is None:
        try:
            rss = _rss_mb(proc.pid)
        except (OSError, StopIteration):
            break
        events = sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0
        samples.append({"seconds": time.perf_counter() - start, "step": _last_step(metrics), "rss_mb": rss,
                        "events": events, "metrics_bytes": _bytes(metrics),
                        "tensorboard_bytes": _bytes(os.path.join(workdir, "tensorboard")),
                        "checkpoints_bytes": _bytes(os.path.join(workdir, "checkpoints"))})
        time.sleep(0.5)
    if proc.wait() != 0:
        raise RuntimeError(f"the run failed: {proc.stderr.read()[-2000:]}")
    checkpoints = os.path.join(workdir, "checkpoints")
    step_sizes = [_bytes(os.path.join(checkpoints, n)) for n in os.listdir(checkpoints) if n.isdigit()]
    return samples, max(step_sizes)


def report(samples: list[dict], one_checkpoint: int, steps: int, warmup_fraction: float) -> str:
    rows = ["| step | RSS (MB) | metrics.jsonl bytes / event | TensorBoard bytes / event | checkpoints (kB) |",
            "|---|---|---|---|---|"]
    for quarter in (0.25, 0.5, 0.75, 1.0):
        s = min((x for x in samples if x["step"] >= quarter * steps * 0.999), key=lambda x: x["step"],
                default=samples[-1])
        rows.append(f"| {s['step']} | {s['rss_mb']:.0f} | {s['metrics_bytes'] / max(s['events'], 1):.1f} | "
                    f"{s['tensorboard_bytes'] / max(s['events'], 1):.1f} | {s['checkpoints_bytes'] / 1e3:.0f} |")
    after = [x for x in samples if x["step"] >= warmup_fraction * steps]
    slope = np.polyfit([x["step"] for x in after], [x["rss_mb"] for x in after], 1)[0] * 1000 if len(after) > 2 else 0
    largest = max(x["checkpoints_bytes"] for x in samples)
    halves = [max((x["checkpoints_bytes"] for x in samples if (x["step"] > steps / 2) == second), default=0)
              for second in (False, True)]
    rows.append(f"\nRSS after warm-up (step >= {warmup_fraction * steps:.0f}): {min(x['rss_mb'] for x in after):.0f}"
                f"-{max(x['rss_mb'] for x in after):.0f} MB, slope {slope:+.2f} MB per 1,000 steps "
                f"({len(after)} samples); largest checkpoints folder {largest / 1e3:.0f} kB = "
                f"{largest / one_checkpoint:.1f} x one checkpoint of {one_checkpoint / 1e3:.0f} kB (keep_checkpoints={KEEP}: "
                f"{KEEP} kept plus the one being written, which briefly holds its per-process and merged files); "
                f"largest in the first / second half of the run {halves[0] / 1e3:.0f} / {halves[1] / 1e3:.0f} kB")
    return "\n".join(rows)


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as root:
        samples, one_checkpoint = measure(_STEPS.value, os.path.join(root, "run"))
    print(report(samples, one_checkpoint, _STEPS.value, _WARMUP.value))


if __name__ == "__main__":
    app.run(main)
