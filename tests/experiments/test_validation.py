"""Every bad input is one ConfigError line before compiling; the CLI prints it as one stderr line."""

import os
import subprocess
import sys

import pytest

from experiments.training import sharding, trainer, validation
from tests.conftest import cpu_env, make_tiny_config, set_any_value, slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _error(config, tmp_path, devices=None) -> str:
    with pytest.raises(validation.ConfigError) as info:
        trainer.train_and_evaluate(config, str(tmp_path), devices=devices, verbose=False)
    message = str(info.value)
    assert "\n" not in message
    assert not (tmp_path / "checkpoints").exists()  # nothing ran
    return message


@pytest.mark.parametrize("path, value, expected", [
    ("model.dropout", 0.1, "unknown config key 'model.dropout'"),
    ("trian", {"steps": 3}, "unknown config key 'trian'"),
    ("model.d_model", "wide", "model.d_model='wide' has type str, expected int"),
    ("model.activation", "tanh", "model.activation='tanh' is not one of"),
    ("model.num_kv_heads", 3, "model.num_kv_heads=3 must divide model.num_heads=4"),
    ("train.steps", 0, "train.steps=0 must be >= 1"),
    ("optimizer.adamw.b2", 1.5, "optimizer.adamw.b2=1.5 must lie in [0, 1)"),
    ("optimizer.lr", -1.0, "optimizer.lr=-1.0 must be > 0"),
    ("data.p", 12, "data.p=12 is not a prime"),
    ("model.name", "mamba7", "model.name='mamba7' is not one of"),
])
def test_bad_values(tmp_path, path, value, expected):
    config = set_any_value(make_tiny_config(), path, value)
    assert expected in _error(config, tmp_path)


def test_mesh_that_does_not_match_the_devices(tmp_path):
    config = make_tiny_config()
    config.mesh.update(data=2, fsdp=2, tensor=1)
    assert ("mesh (mesh.data=2, mesh.fsdp=2, mesh.tensor=1, mesh.expert=1) has 4 devices but 8 are available"
            in _error(config, tmp_path))
    config.mesh.update(data=-1, fsdp=3)
    assert "3 does not divide 8" in _error(config, tmp_path)


def test_batch_that_does_not_divide_the_batch_shards(tmp_path):
    config = make_tiny_config()
    config.data.batch_size = 12
    config.mesh.update(data=8)
    assert "data.batch_size=12 must be -1 (whole split) or a positive multiple of the 8 batch shards" in \
        _error(config, tmp_path)


def test_parameter_that_does_not_divide_over_its_mesh_axes(tmp_path):
    config = make_tiny_config()  # vocabulary 14 (p = 13, plus "=")
    config.mesh.update(data=2, tensor=4)
    config.model.update(num_heads=8, num_kv_heads=4)
    message = _error(config, tmp_path)
    assert "dimension 14 does not divide over mesh axes ('tensor',) of total size 4" in message


def test_mesh_shape_resolution():
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=2, expert=1), 8) == (2, 2, 2, 1)
    assert sharding.mesh_shape(dict(data=1, fsdp=1, tensor=1, expert=-1), 8) == (1, 1, 1, 8)
    with pytest.raises(validation.ConfigError, match="at most one -1"):
        sharding.mesh_shape(dict(data=-1, fsdp=-1, tensor=1, expert=1), 8)


def _cli(*args):
    env = cpu_env()
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["--config.model.dropout=0.1"], "dropout"),  # unknown key, caught by the flag parser
    slow(["--config.model.d_model=wide"], "wide"),  # wrong type, caught by the flag parser
    (["--config.mesh.data=3"], "mesh (mesh.data=3"),  # caught by validation
    slow(["--config.data.op=a%b"], "data.op='a%b'"),
])
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, args, expected):
    result = _cli(f"--workdir={tmp_path / 'run'}", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
