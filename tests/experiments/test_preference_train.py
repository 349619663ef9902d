"""Preference optimisation through the trainer (experiments/objectives/preference.py) on ProntoQA's derailed pairs."""

import json

import numpy as np
import pytest

import data
from data import prontoqa
from data.config_fields import ConfigError
from experiments.training import trainer
from experiments.configs import preference as preference_configs


def tiny(variant: str):
    config = preference_configs.get_config(f"prontoqa,{variant}")
    config.model.update(d_model=32, num_layers=1, num_heads=2, d_mlp=64)
    config.data.update(min_hops=2, max_hops=3, branches=2, train_examples=64, eval_examples=16, test_examples=16,
                       batch_size=16)
    config.train.update(steps=3, log_every=1, eval_every=0, checkpoint_every=3)
    return config


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sft"))
    trainer.train_and_evaluate(tiny("sft"), workdir, verbose=False)
    return workdir


def rows(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow  # an SFT run, then DPO from it; the default suite keeps the losses (test_preference_losses) and the errors
def test_dpo_starts_from_its_reference_and_raises_the_margin(sft_run, tmp_path):
    config = tiny("dpo")
    config.train.update(init_from=sft_run, steps=6)
    config.optimizer.lr = 3e-3
    config.mesh.update(data=2, fsdp=2, tensor=2)
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    first, last = rows(tmp_path)[0], rows(tmp_path)[-1]
    # Step 1's policy is its reference: every implicit reward 0, DPO's loss log 2, no KL.
    assert first["preference/loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert abs(first["preference/reward_margin"]) < 1e-5 and abs(first["preference/kl_ref"]) < 1e-5
    assert last["preference/loss"] < np.log(2) - 0.01 and last["preference/reward_margin"] > 0
    assert last["preference/kl_ref"] > 0


@pytest.mark.parametrize("change,message", [
    (dict(kind="dpo"), "needs a reference model: set train.init_from"),
    (dict(kind="simpo", data="no_pairs"), "needs paired data"),
    (dict(kind="", data="prosqa"), "data.rejected='derailed' needs data.name='prontoqa'"),
])
def test_bad_preference_configs_are_one_line_errors(tmp_path, change, message):
    config = tiny("sft")
    config.train.preference.kind = change["kind"]
    if change.get("data") == "no_pairs":
        config.data.rejected = ""
    if change.get("data") == "prosqa":
        config.data.name = "prosqa"
    with pytest.raises(ConfigError, match=message) as error:
        trainer.train_and_evaluate(config, str(tmp_path / "run"), verbose=False)
    assert "\n" not in str(error.value)


def test_derailed_responses_are_wrong_and_share_the_prompt():
    config = tiny("sft").data
    problems = data.reasoning_problems(config, seed=0)["train"]
    rejected = data.rejected_problems(config, {"train": problems}, seed=0)["train"]
    for p, r in zip(problems, rejected):
        edges, properties = prontoqa._facts(p.question)
        name, start = p.question[0], p.question[3]
        assert r.answer != p.answer
        concepts = [start] + [s[3] for s in r.steps[:-1]]
        unsupported = [(a, b) for a, b in zip(concepts, concepts[1:]) if edges.get(a) != b]
        assert len(unsupported) == 1  # exactly one jump no fact licenses; the rest follow the facts
        negated, prop = properties[concepts[-1]]  # its conclusion is the last concept's property
        assert r.steps[-1] == (name, "is", *(("not",) if negated else ()), prop, ".")
    splits = data.load(config, seed=0)
    question_len = splits.model_keys["bot_position"]
    np.testing.assert_array_equal(splits.train["inputs"][:, :question_len],
                                  splits.train["rejected_inputs"][:, :question_len])
    assert (splits.train["rejected_loss_mask"][:, :question_len - 1] == 0).all()
