"""MQAR examples against a direct reading of the sequence; determinism; config errors; the study's
models are valid configs of matched size."""

import numpy as np
import pytest

import models
from data import recall
from experiments.training import validation
from experiments.configs import recall as recall_config


@pytest.mark.parametrize("seq_len,num_pairs,vocab", [(24, 4, 32), (64, 8, 256), (9, 3, 10)])
def test_every_query_targets_its_keys_value(seq_len, num_pairs, vocab):
    ex = recall.examples(50, seq_len, num_pairs, vocab, seed=1)
    for inputs, targets, mask in zip(ex["inputs"], ex["targets"], ex["loss_mask"]):
        keys, values = inputs[0:2 * num_pairs:2], inputs[1:2 * num_pairs:2]
        assert len(set(keys)) == num_pairs and (keys >= 1).all() and (keys < vocab // 2).all()
        assert (values >= vocab // 2).all() and (values < vocab).all()
        bound = dict(zip(keys.tolist(), values.tolist()))
        queries = [t for t in range(2 * num_pairs, seq_len) if inputs[t] != 0]
        assert sorted(inputs[queries].tolist()) == sorted(keys.tolist())  # each key asked once
        assert mask.sum() == num_pairs and all(mask[t] == 1 for t in queries)
        for t in queries:
            assert targets[t] == bound[int(inputs[t])]


def test_seeded():
    a, b = recall.examples(5, 32, 4, 64, seed=3), recall.examples(5, 32, 4, 64, seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], recall.examples(5, 32, 4, 64, seed=4)["inputs"])


@pytest.mark.parametrize("override,message", [
    (dict(num_pairs=30, seq_len=64), "data.num_pairs=30 must lie in [1, seq_len / 3 = 21]"),
    (dict(vocab_size=10, num_pairs=8), "data.vocab_size=10 leaves 4 keys"),
])
def test_bad_recall_config_is_one_clear_line(override, message):
    config = recall_config.get_config("ssd")
    config.data.update(**override)
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config, 8)
    assert message in str(info.value)


@pytest.mark.parametrize("arg", recall_config.MODELS)
def test_every_recall_model_is_a_valid_config_of_about_the_same_size(arg):
    config = recall_config.get_config(arg)
    validation.validate(config, 8)
    config.model.update(vocab_size=config.data.vocab_size, max_len=config.data.seq_len)
    params = models.parameter_count(config.model, config.data.seq_len)
    assert 100_000 < params < 145_000, (arg, params)
