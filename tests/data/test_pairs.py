"""Prompt / response lines (data/pairs.py) against rows built by hand; SFT and DPO on them through the trainer."""

import json

import jax
import numpy as np
import pytest

import data
from data import pairs, text
from data.config_fields import ConfigError
from experiments.training import trainer, validation
from experiments.objectives import grpo
from experiments.configs import base

LINES = [{"prompt": "2+2=", "response": "4", "rejected": "5"},
         {"prompt": "Capital of France? ", "response": "Paris", "rejected": "Rome"},
         {"prompt": "héllo", "response": " wörld", "rejected": " you"},
         {"prompt": "a", "response": "bcd", "rejected": "x"}]


def write(tmp_path, lines, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return str(path)


def config_for(path, **overrides):
    config = base.get_config("transformer", "pairs")
    config.data.update(path=path, eval_fraction=0.25, batch_size=3, **overrides)
    config.model.update(d_model=16, num_layers=1, num_heads=2, d_mlp=32)
    config.train.update(steps=2, log_every=1, eval_every=0, checkpoint_every=2)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


def by_hand(line, key, seq_len, prompt_len=0):
    """The row of one line: prompt and response bytes, padding, the mask on the response's targets."""
    prompt, answer = (list(text.ByteTokenizer().encode(line[k])) for k in ("prompt", key))
    start = prompt_len - len(prompt) if prompt_len else 0
    row = [0] * start + prompt + answer
    row += [0] * (seq_len + 1 - len(row))
    mask = [0.0] * (start + len(prompt)) + [1.0] * len(answer)
    mask += [0.0] * (seq_len + 1 - len(mask))
    return row[:-1], row[1:], mask[1:]


@pytest.mark.parametrize("left_pad", [False, True])
def test_rows_are_prompt_then_response_scored_on_the_response_only(tmp_path, left_pad):
    config = config_for(write(tmp_path, LINES), left_pad_prompts=left_pad).data
    splits = data.load(config, seed=0)
    encoded = [len(text.ByteTokenizer().encode(line[k])) for line in LINES for k in ("prompt",)]
    prompt_len = max(encoded) if left_pad else 0
    lengths = [(prompt_len or len(line["prompt"].encode())) + max(len(line[k].encode()) for k in ("response", "rejected"))
               for line in LINES]
    assert splits.seq_len == max(lengths) - 1 and splits.vocab_size == 256
    for split, lines in (("train", LINES[:3]), ("eval", LINES[3:])):
        examples = splits.train if split == "train" else splits.evals["eval"]
        for i, line in enumerate(lines):
            for key, prefix in (("response", ""), ("rejected", "rejected_")):
                inputs, targets, mask = by_hand(line, key, splits.seq_len, prompt_len)
                np.testing.assert_array_equal(examples[prefix + "inputs"][i], inputs)
                np.testing.assert_array_equal(examples[prefix + "targets"][i], targets)
                np.testing.assert_array_equal(examples[prefix + "loss_mask"][i], mask)
    if left_pad:  # every response starts at one position: GRPO's prompts
        assert grpo.prompt_length(splits.train) == prompt_len
    else:
        with pytest.raises(ConfigError, match="left-pad the prompts"):
            grpo.prompt_length(splits.train)


def test_bad_lines_are_one_line_errors_naming_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2 has no string 'response'"):
        pairs.read_lines(str(bad))
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2 is not JSON"):
        pairs.read_lines(str(bad))
    with pytest.raises(ConfigError, match=r"line 2: 19 prompt \+ 5 response tokens exceed data.seq_len=8"):
        data.load(config_for(write(tmp_path, LINES), seq_len=8).data, seed=0)
    with pytest.raises(ConfigError, match="data.path='' : pass a JSON-lines file"):
        validation.validate(config_for(""), 1)


@pytest.mark.slow
def test_sft_then_dpo_on_prompt_response_lines(tmp_path):
    """An SFT run on the lines, then DPO from it with the rejected responses (its first step at log 2)."""
    path = write(tmp_path, LINES * 3)
    one_device = jax.devices()[:1]
    trainer.train_and_evaluate(config_for(path), str(tmp_path / "sft"), devices=one_device, verbose=False)
    config = config_for(path)
    config.train.update(init_from=str(tmp_path / "sft"))
    config.train.preference.update(kind="dpo", beta=0.1)
    result = trainer.train_and_evaluate(config, str(tmp_path / "dpo"), devices=one_device, verbose=False)
    with open(tmp_path / "dpo" / "metrics.jsonl") as f:
        first = next(r for r in map(json.loads, f) if r["split"] == "train")
    assert first["preference/loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert np.isfinite(result["train"]["loss"])
