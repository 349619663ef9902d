"""The seqio Tasks give the grain path's tokens, and training from them gives the same losses.
Needs the optional [seqio] extra (TensorFlow); `.ci/run` installs it."""

import jax
import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="seqio is the optional [seqio] extra: pip install -e '.[seqio]'")

from data import seqio_tasks, text  # noqa: E402
from experiments.training import metrics_writer, trainer  # noqa: E402
from tests.conftest import make_tiny_lm_config  # noqa: E402


def test_default_tasks_are_registered():
    names = seqio.TaskRegistry.names()
    assert {"tinyshakespeare_bytes", "tinyshakespeare_spm"} <= set(names)


@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
def test_task_tokens_equal_the_grain_path(tokenizer, tmp_path):
    config = make_tiny_lm_config().data
    if tokenizer == "sentencepiece":
        from tests.data.test_text import _train_spm
        config.update(tokenizer="sentencepiece", spm_model=_train_spm(tmp_path, 512))
    train_ids, validation_ids, vocab_size = seqio_tasks.token_streams(config)
    tok = text.tokenizer(config.tokenizer, config.spm_model)
    train_text, validation_text = text.split_text(text.read_corpus(config.path), config.train_fraction)
    assert vocab_size == tok.vocab_size
    np.testing.assert_array_equal(train_ids, tok.encode(train_text))
    np.testing.assert_array_equal(validation_ids, tok.encode(validation_text))


@pytest.mark.slow
def test_training_from_the_seqio_task_gives_the_grain_losses(tmp_path):
    results = {}
    for source in ("grain", "seqio"):
        config = make_tiny_lm_config(steps=3)
        config.data.source = source
        trainer.train_and_evaluate(config, str(tmp_path / source), devices=jax.devices()[:2], verbose=False)
        results[source] = [(e["split"], e["step"], e["loss"]) for e in metrics_writer.read(str(tmp_path / source))]
    assert results["seqio"] == results["grain"]
