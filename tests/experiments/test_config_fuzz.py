"""Config fuzzing (hypothesis): a bad value for any key of any experiment config is exit status 2, one line
on stderr naming the key, no traceback, and nothing compiled.

Each example draws a config (every family and dataset the experiment configs use), one of its keys, and a bad
value of a kind that key admits: a wrong type, a value outside its declared range, an unknown choice, an unknown
key beside it, a shape that does not divide (heads, batch over the batch shards, parameters over the mesh) or
an impossible mesh. The run goes through `experiments.training.cli.run`, the command line's error handling; reaching
the checkpoint restore (the step before the first computation) fails the example, and so does any backend
compilation seen by `jax.monitoring`.
"""

import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax import monitoring

from data import config_fields
from experiments.training import checkpointing, cli
from experiments.configs import base, coconut_prosqa, grokking, lm_shakespeare, moe_lm, recall
from tests.conftest import cpu_env, set_any_value

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _on_8_devices(config):
    """The config with a global batch that the 8 test devices divide (tiny Shakespeare's 12 does not)."""
    if config.data.batch_size != -1 and config.data.batch_size % 8:
        config.data.batch_size = 16
    return config


CONFIGS = {
    "grokking": grokking.get_config,
    "lm_shakespeare": lm_shakespeare.get_config,
    "lm_shakespeare:ssd": lambda: lm_shakespeare.get_config("ssd"),
    "lm_shakespeare:hybrid": lambda: lm_shakespeare.get_config("hybrid"),
    "lm_shakespeare:deq": lambda: lm_shakespeare.get_config("deq"),
    "moe_lm": moe_lm.get_config,
    "coconut_prosqa": coconut_prosqa.get_config,
    "recall": recall.get_config,
}


def _get(config, key):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _bad_values(config, key, field):
    """(kind, value, text the error must contain) for each kind of bad value `key` admits."""
    value, meta = _get(config, key), (field.metadata if field else {})
    named = f"{key}="
    bad = [("type", {bool: "yes", int: "wide", float: "fast", str: 3}[type(value)], named)]
    if isinstance(value, int) and not isinstance(value, bool):
        bad.append(("type", 1.5, named))
    if meta.get("choices"):
        bad.append(("choice", "no-such-choice", named))
    step = 1 if isinstance(value, int) and not isinstance(value, bool) else 0.5
    for bound, outside in (("min", -step), ("max", step), ("above", 0), ("below", 0)):
        if meta.get(bound) is not None and not isinstance(value, bool):
            bad.append(("range", type(value)(meta[bound] + outside) if step == 1 else meta[bound] + outside, named))
    if isinstance(value, float) and meta.get("choices") is None:
        bad.append(("range", math.nan, named))
    return bad


def _cases(name):
    """Every (key, kind, value, named) for one config."""
    config = _on_8_devices(CONFIGS[name]())
    declared = {"seed": None}
    for section, cls in base.sections(config.model.name, config.data.name).items():
        declared.update(config_fields.leaves(cls, f"{section}."))
    cases = [(key, *bad) for key, field in declared.items() if not key.startswith("mesh.")
             for bad in _bad_values(config, key, field)]
    for section in ("model", "data", "train", "optimizer", "mesh"):
        cases.append((f"{section}.no_such_key", "unknown key", 1, f"'{section}.no_such_key'"))
    for mesh, axis in ((dict(data=3), "data"), (dict(data=16), "data"), (dict(data=-1, fsdp=-1), "fsdp"),
                       (dict(tensor=0), "tensor"), (dict(data=2, fsdp=2), "fsdp"), (dict(expert=-2), "expert")):
        cases.append((f"mesh.{axis}", "mesh", mesh, f"mesh.{axis}="))
    if config.model.get("num_heads", 8) % 8 and config.model.name != "ssd":  # attention heads over 8 tensor shards
        cases.append(("mesh.tensor", "mesh", dict(tensor=8), "mesh.tensor=8"))
    if "num_kv_heads" in config.model and config.model.name != "ssd":  # (a pure Mamba-2 stack has no attention)
        cases.append(("model.num_kv_heads", "divide", 3, "model.num_kv_heads=3"))
    if config.data.batch_size != -1:
        cases.append(("data.batch_size", "divide", 12, "data.batch_size=12"))
    if "path" in config.data:
        cases.append(("data.path", "missing file", "/no/such/corpus.txt", "data.path="))
    return cases


CASES = {name: _cases(name) for name in CONFIGS}
COMPILES = []
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)


class ReachedTheFirstComputation(Exception):
    pass


def _apply(config, key, kind, value):
    if kind == "mesh":
        config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
        config.mesh.update(**value)
    else:
        set_any_value(config, key, value)
    return config


def _check(name, key, kind, value, named, tmp_path, capsys, monkeypatch):
    def first_computation(*args, **kwargs):
        raise ReachedTheFirstComputation(f"{name}: {key}={value!r} ({kind}) was not caught before computing")

    monkeypatch.setattr(checkpointing, "restore_latest", first_computation)
    config = _apply(_on_8_devices(CONFIGS[name]()), key, kind, value)
    capsys.readouterr()
    COMPILES.clear()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(config, str(tmp_path / "run"))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, (name, key, value, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (name, key, value, err)
    assert named in lines[0], (name, key, value, lines[0])
    assert not COMPILES, (name, key, value, COMPILES)


ALL = [(name, *case) for name, cases in CASES.items() for case in cases]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from(ALL))
def test_a_bad_value_for_any_key_is_one_line_and_status_2(case, tmp_path, capsys, monkeypatch):
    _check(*case, tmp_path, capsys, monkeypatch)
    monkeypatch.undo()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_bad_value_of_every_key(name, tmp_path, capsys, monkeypatch):
    """The exhaustive form: every case of every config."""
    failures = []
    for case in CASES[name]:
        try:
            _check(name, *case, tmp_path, capsys, monkeypatch)
        except (AssertionError, ReachedTheFirstComputation) as e:
            failures.append(f"{case[:3]}: {str(e)[:300]}")
    assert not failures, f"{len(failures)} of {len(CASES[name])} cases:\n" + "\n".join(failures)


@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from([c for c in ALL if c[2] in ("type", "range", "choice", "unknown key")
                             and not (c[2] == "type" and not isinstance(c[3], str))]))  # a string key's bad
# type (the int 3) is the valid string "3" on a command line
def test_the_command_line_gives_the_same_one_line(case, tmp_path):
    """Through the real command line (flag parsing included): exit status 2, one stderr line, no traceback."""
    name, key, kind, value, named = case
    config_file, _, arg = name.partition(":")
    text = value if isinstance(value, str) else repr(value)
    flags = [f"--config=experiments/configs/{config_file}.py{':' + arg if arg else ''}", f"--config.{key}={text}",
             f"--workdir={tmp_path / 'run'}"]
    if config_file == "lm_shakespeare":
        flags.append("--config.data.batch_size=16")
    env = cpu_env()
    done = subprocess.run([sys.executable, "-m", "experiments.train", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flags, done.stderr[-2000:])
    assert key.rsplit(".", 1)[-1] in lines[0], (flags, lines[0])

