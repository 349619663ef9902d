"""scripts/benchmarks/bench_moe.py runs and times every dispatch against the dense FFN."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_bench_moe_times_every_dispatch():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "scripts/benchmarks/bench_moe.py", "--tokens=128", "--d_model=16", "--repeats=1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| dense", "| MoE"))]
    assert [r.split(" | ")[0] for r in rows] == [
        "| dense FFN, equal active params", "| MoE, dispatch=dense", "| MoE, dispatch=capacity, capacity factor 0.0",
        "| MoE, dispatch=capacity, capacity factor 1.25", "| MoE, dispatch=ragged"]
