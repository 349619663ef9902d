"""scripts/benchmarks/bench_loader.py runs end to end at a tiny size and prints its row."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # prepares a corpus and trains 3 + 2 steps in subprocesses
def test_the_loader_benchmark_prints_a_row_per_size():
    """The medium LM here is the small one at twice the width (bench_train's medium takes a minute to compile and
    save on two cores)."""
    done = subprocess.run([sys.executable, "scripts/benchmarks/bench_loader.py", "--sizes_mb=0.05", "--steps=3",
                           "--medium_steps=2", "--medium=d_model=256,num_heads=4,d_mlp=1024", "--workers=1",
                           "--loader_workers=0,2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 0.05 MB"))
    size, documents, tokens, prepare_rate, loaders, small, medium, rss = [c.strip() for c in row.strip("|").split("|")]
    number = lambda cell: float(cell.replace(",", ""))  # noqa: E731
    assert number(tokens) > 40_000 and number(rss) > 0 and number(small) > number(medium) > 0
    assert len(loaders.split(" / ")) == 2 and all(number(x) > 0 for x in loaders.split(" / "))  # 0 and 2 workers
