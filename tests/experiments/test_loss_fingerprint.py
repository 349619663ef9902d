"""scripts/tools/loss_fingerprint.py: the same code reproduces its own fingerprint; a changed number is caught."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_fingerprint_reproduces_and_catches_a_change(tmp_path):
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "scripts/tools/loss_fingerprint.py", "--configs=default", "--steps=3", *args], cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    first = tmp_path / "first.json"
    assert run(f"--out={first}").returncode == 0
    losses = json.loads(first.read_text())["default"]
    assert len(losses) == 3 and losses[2] < losses[0]
    assert run(f"--out={tmp_path / 'again.json'}", f"--compare={first}").returncode == 0
    first.write_text(json.dumps({"default": [losses[0], losses[1] * (1 + 1e-3), losses[2]]}))
    changed = run(f"--out={tmp_path / 'again.json'}", f"--compare={first}")
    assert changed.returncode == 1 and "max relative 0.000999" in changed.stdout  # 1e-3 / (1 + 1e-3)
