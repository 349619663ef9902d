"""scripts/benchmarks/bench_loader.py runs end to end at a tiny size and prints its row."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # prepares a corpus and trains 3 steps in a subprocess
def test_the_loader_benchmark_prints_a_row_per_size():
    done = subprocess.run([sys.executable, "scripts/benchmarks/bench_loader.py", "--sizes_mb=0.05", "--steps=3",
                           "--workers=1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 0.05 MB"))
    documents, tokens, prepare_rate, loader, trainer, rss = re.findall(r"[\d,.]+", row.replace(" MB", ""))[1:]
    assert int(tokens.replace(",", "")) > 40_000 and float(rss) > 0 and float(loader.replace(",", "")) > 0
