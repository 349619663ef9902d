"""experiments/training/cli.override: the command line's KEY=VALUE overrides of a config (scripts/studies/coconut_study.py --set,
experiments/evaluation/reasoning_eval.py --set): cast to the key's type, and one stderr line for what names no key or
does not fit its type."""

import pytest

from experiments.training import cli
from experiments.configs import prosqa_lookup


def test_values_take_the_type_of_the_key_they_replace():
    config = cli.override(prosqa_lookup.get_config("conv"), ["data.facts=16", "seed=7", "optimizer.lr=3e-3",
                                                             "data.curriculum=False", "optimizer.schedule=cosine"])
    assert (config.data.facts, config.seed, config.optimizer.lr) == (16, 7, 0.003)
    assert config.data.curriculum is False and config.optimizer.schedule == "cosine"


@pytest.mark.parametrize("item", ["data.fact=16", "data.facts", "model.d_model=32", "nosuch.key=1"])
def test_an_unknown_key_a_missing_value_or_a_key_outside_the_allowed_sections_is_one_line(item, capsys):
    with pytest.raises(SystemExit) as info:
        cli.override(prosqa_lookup.get_config("conv"), [item], allowed=("data.", "seed"))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --set={item!r}: want KEY=VALUE with KEY an existing config key starting with one of ['data.', 'seed']")


@pytest.mark.parametrize("item, current", [("data.facts=many", "0"), ("data.curriculum=yes", "True")])
def test_a_value_the_keys_type_cannot_hold_is_one_line(item, current, capsys):
    with pytest.raises(SystemExit) as info:
        cli.override(prosqa_lookup.get_config("conv"), [item])
    assert info.value.code == 2
    kind = "int" if "facts" in item else "bool"
    assert capsys.readouterr().err.strip() == (
        f"error: --set={item!r}: {item.split('=')[1]!r} is not a {kind} (the key's current value is {current})")
