"""What study and benchmark scripts share: run a config (or reuse its finished run) and read its metrics,
and time a jitted function with one statistic, the median (figures go through `training.plots.save_figure`).
The study machinery that is more than a helper lives beside it: IsoFLOP sweeps and their fits (scaling.py,
scaling_fits.py) and many grokking runs in one compiled program (vmap_sweep.py).

Counting parameters is `models.parameter_count`; MoE load balance is `models.moe.max_violation`.
"""

import os
import time

import jax
import numpy as np

from experiments.training import metrics_writer, trainer


def run_or_reuse(config, workdir: str, **train_kwargs) -> tuple[list[dict], list[dict]]:
    """(train events, eval events) of `config` trained in `workdir`; a finished run is read, not rerun (the
    trainer resumes from its last checkpoint, which is the end)."""
    trainer.train_and_evaluate(config, workdir, verbose=False, **train_kwargs)
    return metrics_writer.read(workdir, "train"), metrics_writer.read(workdir, "eval")


def with_overrides(config, overrides: dict):
    """`config` with each "section.key" (or top-level "key") of `overrides` set to its value; returns it."""
    for key, value in overrides.items():
        *sections, name = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[name] = value
    return config


def write_table(workdir: str, lines: list[str]) -> str:
    """Prints a markdown table and writes it to WORKDIR/table.md; returns it."""
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    return table


def seconds(fn, *args) -> float:
    """Wall seconds of one call fn(*args), waiting for its results (benchmarks that interleave their variants
    time one call at a time and keep the median of each)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_seconds(fn, *args, repeats: int = 10) -> float:
    """Median wall seconds of fn(*args) (a jitted or compiled function) over `repeats` calls after a warm-up:
    the one timing statistic of every study and benchmark."""
    jax.block_until_ready(fn(*args))
    return float(np.median([seconds(fn, *args) for _ in range(repeats)]))
