"""train.init_from (experiments/training/warm_start.py): a run started from another's weights holds them (SGD at lr 1e-30),
placed on a 2x2x2 mesh from a 1-device run, with a context extended under RoPE; bad folders and other shapes are one
line before anything compiles."""

import jax
import numpy as np
import pytest

from data.config_fields import ConfigError
from experiments import restore
from experiments.training import metrics_writer, trainer
from tests.conftest import make_tiny_lm_config


def _config(**model):
    config = make_tiny_lm_config(steps=2)
    config.model.update(positional="rope", **model)
    return config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("warm_start") / "source")
    trainer.train_and_evaluate(_config(), workdir, devices=jax.devices()[:1], verbose=False)
    return workdir


def test_a_warm_started_run_at_a_negligible_lr_keeps_the_weights_on_another_mesh_and_context(source, tmp_path):
    config = _config(max_len=64, rope_scaling="linear", rope_factor=4.0, rope_original_max_len=16)
    config.data.seq_len = 64  # 4x the source's context
    config.train.init_from = source
    config.optimizer.update(name="sgd", lr=1e-30, warmup_steps=0)
    config.optimizer.sgd.update(momentum=0.0, weight_decay=0.0)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.train.ema_decay = 0.5  # the average starts at the loaded weights too (in buffers of its own)
    trainer.train_and_evaluate(config, str(tmp_path / "extended"), verbose=False)
    _, want = restore.load_variables(restore.load_config(source), source)
    _, got = restore.load_variables(restore.load_config(str(tmp_path / "extended")), str(tmp_path / "extended"))
    for a, b in zip(jax.tree.leaves(want["params"]), jax.tree.leaves(got["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-20)
    assert [e["step"] for e in metrics_writer.read(str(tmp_path / "extended"), "train")] == [1, 2]  # a fresh count


def test_a_warm_started_schedule_free_run_starts_its_iterates_at_the_loaded_weights(source, tmp_path):
    """Schedule-free keeps a copy of the weights (z) in its state; one left at the fresh initialisation would pull
    the evaluated weights to it at the first step, whatever the learning rate."""
    config = _config()
    config.train.init_from = source
    config.optimizer.update(name="schedule_free_adamw", lr=1e-10, schedule="constant", warmup_steps=0)  # lr**2 a float32
    config.optimizer.schedule_free_adamw.weight_decay = 0.0
    trainer.train_and_evaluate(config, str(tmp_path / "schedule_free"), devices=jax.devices()[:1], verbose=False)
    _, want = restore.load_variables(restore.load_config(source), source)
    _, got = restore.load_variables(restore.load_config(str(tmp_path / "schedule_free")), str(tmp_path / "schedule_free"))
    for a, b in zip(jax.tree.leaves(want["params"]), jax.tree.leaves(got["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-8)  # steps of ~lr


@pytest.mark.parametrize("change,message", [
    ("missing", "train.init_from='{}/nothing' has no config.json"),
    ("width", "parameter ['embed']['embedding'] is (256, 32) there and (256, 48) here"),
])
def test_bad_init_folders_are_one_line_errors(source, tmp_path, change, message):
    config = _config(d_model=48) if change == "width" else _config()
    config.train.init_from = f"{tmp_path}/nothing" if change == "missing" else source
    with pytest.raises(ConfigError, match=None) as error:
        trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], verbose=False)
    assert message.format(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_only_mods_routers_may_start_fresh_in_a_run_from_another_family():
    """A parameter absent from the init run is an error (the shapes check names it) unless the family declares it
    may start fresh: MoD's routers and predictors when it starts from a transformer, and nothing else anywhere."""
    import models
    from models import mod
    routing = "['layers']['routed']['router']['kernel']"
    for name, (module, _, _) in models.MODELS.items():
        for source in models.MODELS:
            for path in (routing, "['layers']['block_0']['attention']['key']", "['embed']['embedding']"):
                expected = name == "mod" and source == "transformer" and path == routing
                assert module.starts_fresh(source, path) == expected, (name, source, path)
    assert mod.ROUTED == "routed" and mod.is_routing_parameter(routing)
