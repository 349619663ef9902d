"""The activation store (experiments/analysis/activation_store.py): its shards are the captured activations of the run's
batches in order, and an interrupted capture resumes writing only what is missing."""

import os

import numpy as np
import pytest

import data as datasets
from experiments import restore
from experiments.analysis import activation_store, activations


@pytest.mark.slow  # a model restored and captured per shard
def test_the_store_holds_the_captured_activations_and_resumes(finished_tiny_run, tmp_path):
    out = str(tmp_path / "store")
    description = activation_store.write(str(finished_tiny_run), out, "mixer_out", 0, "eval", batches=3, batch_size=8)
    assert description["shards"] == 3 and description["width"] == 32
    stored = activation_store.read(out)
    config = restore.load_config(str(finished_tiny_run))
    model, variables = restore.load_variables(config, str(finished_tiny_run))
    tokens = datasets.load(config.data, seed=config.seed).evals["eval"]["inputs"][:24]
    want = np.asarray(activations.capture(model, variables, tokens)[2][0]["mixer_out"]).reshape(-1, 32)
    np.testing.assert_allclose(stored, want, rtol=1e-5, atol=1e-6)

    os.remove(activation_store.shard_path(out, 1))  # as if stopped before its second shard
    mtime = os.path.getmtime(activation_store.shard_path(out, 0))
    activation_store.write(str(finished_tiny_run), out, "mixer_out", 0, "eval", batches=3, batch_size=8)
    assert os.path.getmtime(activation_store.shard_path(out, 0)) == mtime  # kept, not rewritten
    np.testing.assert_array_equal(activation_store.read(out), stored)


def test_bad_splits_and_empty_stores_are_one_line(finished_tiny_run, tmp_path):
    with pytest.raises(ValueError, match="--split='valid' is not 'train' or one of"):
        activation_store.write(str(finished_tiny_run), str(tmp_path / "s"), split="valid")
    with pytest.raises(FileNotFoundError, match="holds no activation shards"):
        activation_store.read(str(tmp_path))
