"""data/command_check.py: `python -m` on a module that has no command line exits 2 in one line naming the commands
(found in the tree), instead of importing it and exiting 0."""

import os
import subprocess
import sys

import pytest

from data import command_check

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_commands_are_the_modules_with_a_main_block():
    found = command_check.commands("data", os.path.join(REPO, "data"))
    assert {"data.prepare", "data.prosqa_dag"} <= set(found) and "data.prosqa" not in found
    nested = command_check.commands("experiments", os.path.join(REPO, "experiments"))
    assert {"experiments.train", "experiments.analysis.probes"} <= set(nested) and "experiments.restore" not in nested


@pytest.mark.parametrize("argv,refused", [
    (["python", "-m", "data.prosqa", "--out=F"], True),  # a library module
    (["python", "-X", "dev", "-m", "data.text"], True),
    (["python", "-m", "data.prepare", "--input=F"], False),  # a command
    (["python", "-m", "data.missing"], False),  # Python says it is missing
    (["python", "-m", "pytest", "-q"], False),  # not this package
    (["python", "script.py", "-m"], False),
])
def test_refuses_library_modules_only(monkeypatch, capsys, argv, refused):
    monkeypatch.setattr(sys, "orig_argv", argv)
    if not refused:
        command_check.refuse_library_module("data", os.path.join(REPO, "data"))
        assert capsys.readouterr().err == ""
        return
    with pytest.raises(SystemExit) as exit_:
        command_check.refuse_library_module("data", os.path.join(REPO, "data"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert f"error: {argv[-1 if argv[-1].startswith('data') else -2]} is a library module" in err
    assert "data.prosqa_dag" in err


def test_python_dash_m_on_a_library_module_exits_2():
    done = subprocess.run([sys.executable, "-m", "data.prosqa", "--out=/dev/null", "--num=3"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("error: data.prosqa is a library module, not a command")
