"""scripts/benchmarks/bench_kernels.py runs on CPU (the compiled-memory table) and shows flash attention's
temporaries growing like L where the reference's grow like L^2."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_cpu_memory_table():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "scripts/benchmarks/bench_kernels.py", "--memory_length=2048"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    growth = dict(re.findall(r"^(flash \(Pallas\)|reference): x([\d.]+) forward,", result.stdout, re.M))
    assert 1.8 < float(growth["flash (Pallas)"]) < 2.2, result.stdout
    assert 3.8 < float(growth["reference"]) < 4.2, result.stdout
    assert "the timing tables need a GPU" in result.stdout
