"""`--config.model.name=F` on any experiment config: the family's own section (its defaults, the keys both
families share, the user's settings), or one line; never a traceback (experiments/training/cli.switch_sections,
experiments/configs/base.switch_family)."""

import glob
import importlib
import os
import subprocess
import sys

import pytest

import models
from experiments.training import cli, validation
from experiments.configs import base, lm_shakespeare
from tests.conftest import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "experiments", "configs", "*.py"))
                      if os.path.basename(p) not in ("__init__.py", "base.py"))


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_every_family_on_every_config_validates_or_is_one_line(config_file):
    get_config = importlib.import_module(f"experiments.configs.{config_file}").get_config
    for family in models.MODELS:
        config = cli.switch_sections(get_config(), [f"model.name={family}"])
        assert set(config.model) == set(base.get_config(family).model), (config_file, family)
        try:
            validation.validate(config, 8)
        except validation.ConfigError as e:
            assert "\n" not in str(e) and str(e), (config_file, family, str(e))


def test_the_new_section_keeps_shared_and_user_keys_and_takes_the_family_defaults():
    config = cli.switch_sections(lm_shakespeare.get_config(), ["model.name=moe", "model.top_k=1", "model.d_model=64"])
    assert config.model.name == "moe" and config.model.top_k == 1 and config.model.d_model == 64
    assert config.model.num_layers == 4 and config.model.positional == "learned"  # lm_shakespeare's, shared
    assert config.model.num_experts == base.get_config("moe").model.num_experts  # MoE's own key, at its default
    config = cli.switch_sections(lm_shakespeare.get_config(), ["model.name=ssd"])
    assert "exit_every" not in config.model and config.model.d_model == 128  # the transformer's own key, dropped


def test_a_shared_value_the_new_family_refuses_takes_its_default():
    config = cli.switch_sections(importlib.import_module("experiments.configs.moe_lm").get_config(), ["model.name=mor"])
    assert config.model.router == base.get_config("mor").model.router  # MoE's "sigmoid" is not a MoR router


@pytest.mark.parametrize("items, named", [(["model.name=ssd", "model.exit_every=2"], "'exit_every'"),
                                          (["model.name=nosuch"], "'nosuch'"),
                                          (["model.name=moe", "model.top_k=two"], "'two' is not a int")])
def test_a_key_the_family_lacks_an_unknown_family_or_a_bad_value_is_one_line(items, named, capsys):
    with pytest.raises(SystemExit) as info:
        cli.switch_sections(lm_shakespeare.get_config(), items)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and named in err, err


def test_a_renamed_family_without_its_section_is_one_line_naming_switch_family():
    config = lm_shakespeare.get_config()
    config.model.name = "moe"
    with pytest.raises(validation.ConfigError, match="switch_family"):
        validation.validate(config, 8)


def test_the_command_line_switches_before_the_other_model_overrides():
    """`--config.model.top_k` exists only in the MoE section: the switch must come first, whatever the order."""
    env = cpu_env()
    done = subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/lm_shakespeare.py",
                           "--config.model.top_k=3", "--config.model.name=moe", "--config.model.num_experts=2",
                           "--workdir=/nonexistent/never/written"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "model.top_k=3" in lines[0] and "num_experts=2" in lines[0], lines[0]  # the MoE rule top_k <= experts


@pytest.mark.slow  # a compile and one step each
@pytest.mark.parametrize("family", ["moe", "ssd", "mod"])  # the families whose switch was a traceback or a wrong key
def test_the_command_line_trains_a_step_of_the_switched_family(family, tmp_path):
    env = cpu_env()
    flags = [f"--config.model.name={family}", "--config.model.d_model=64", "--config.model.num_heads=2",
             "--config.data.seq_len=32", "--config.data.batch_size=16", "--config.data.eval_batch_size=512",
             "--config.train.steps=1", "--config.train.eval_every=0"]
    done = subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/lm_shakespeare.py",
                           *flags, f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "done at step 1" in done.stdout, done.stderr[-2000:]
    with open(tmp_path / "run" / "config.json") as f:
        assert f'"name": "{family}"' in f.read()
