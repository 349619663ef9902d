"""Where a step's time goes (experiments/training/throughput.py): the analytic model FLOPs against XLA's cost analysis
of the compiled train step, the throughput figures and compile time in metrics.jsonl, a profiler trace of the chosen
steps, and a bad step range refused in one line."""

import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from data.config_fields import ConfigError
from experiments import restore
from experiments.configs import base
from experiments.optim import optimizers
from experiments.training import metrics_writer, throughput, train_state, trainer
from tests.conftest import make_tiny_lm_config

BATCH, SEQ = 4, 128


def xla_flops(config, seq_len: int) -> float:
    """XLA's count of the compiled train step's floating-point operations (a scan counts its body once: the configs
    below unroll the layer stack, and give the SSD one chunk)."""
    model = models.build(config.model)
    schedule = optimizers.learning_rate_schedule(config.optimizer, 1000)
    tx = optimizers.build(config.optimizer, 1000)
    tokens = jnp.zeros((BATCH, seq_len + 1), jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((BATCH, seq_len))}
    state = jax.eval_shape(lambda r: nn.meta.unbox(train_state.init_state(model, tx, batch["inputs"], r)),
                           jax.random.PRNGKey(0))
    step = jax.jit(lambda s, b: trainer.train_step(s, b, schedule=schedule))
    cost = step.lower(state, batch).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("family,seq_len,keys", [
    ("transformer", SEQ, dict(activation="gelu", num_heads=4, d_mlp=1024)),
    pytest.param("transformer", SEQ, dict(activation="swiglu", num_heads=2, num_kv_heads=1, d_mlp=640,
                                          tie_embeddings=True), marks=pytest.mark.slow),
    pytest.param("moe", SEQ, dict(num_heads=4, d_mlp=1024, num_experts=4, top_k=2, d_expert=512, dispatch="capacity",
                                  capacity_factor=1.0),  # slots for exactly the assignments: none computes for nothing
                 marks=pytest.mark.slow),
    pytest.param("ssd", 32, dict(chunk_size=32, ssm_state=64, ssm_groups=2, num_heads=4), marks=pytest.mark.slow),
])
def test_model_flops_agree_with_xlas_count_of_the_train_step(family, seq_len, keys):
    config = base.get_config(family, "text")
    config.model.update(max_len=seq_len, vocab_size=256, d_model=256, num_layers=2, scan_unroll=2, **keys)
    ours = throughput.model_flops_per_token(config.model, seq_len) * BATCH * seq_len
    assert ours == pytest.approx(xla_flops(config, seq_len), rel=0.05)


def test_a_run_logs_throughput_compile_time_and_traces_its_profiled_steps(tmp_path):
    config = make_tiny_lm_config(steps=4)
    config.train.update(log_every=2, profile_steps="2:3")
    trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], verbose=False)
    events = metrics_writer.read(str(tmp_path), "train")
    assert [e["step"] for e in events] == [2, 4]
    flops = throughput.model_flops_per_token(restore.load_config(str(tmp_path)).model, config.data.seq_len)
    for e in events:
        assert 0.0 <= e["data_wait_fraction"] < 1.0 and e["mfu"] > 0 and e["tokens_per_s"] > 0
        np.testing.assert_allclose(e["model_flops_per_s"], e["tokens_per_s"] * flops, rtol=1e-6)
    assert events[0]["compile_s"] > 0 and "compile_s" not in events[1]
    assert glob.glob(os.path.join(tmp_path, "profile", "**", "*.xplane.pb"), recursive=True)


def test_peak_flops_are_the_configured_known_or_measured_ones():
    cpu = jax.devices()
    assert throughput.peak_flops(1e12, cpu[:2]) == 2e12
    assert throughput.peak_flops(0.0, cpu[:1]) == throughput.peak_flops(0.0, cpu) > 1e8  # the host's, shared


@pytest.mark.parametrize("spec", ["3", "0:2", "4:2", "a:b"])
def test_a_bad_profile_range_is_one_line(tmp_path, spec):
    config = make_tiny_lm_config(steps=2)
    config.train.profile_steps = spec
    if spec == "3":  # one step alone is a range
        assert throughput.parse_profile_steps(spec) == (3, 3)
        return
    with pytest.raises(ConfigError, match=f"train.profile_steps='{spec}' is not 'A:B' with 1 <= A <= B") as error:
        trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    assert "\n" not in str(error.value)


def test_window_figures_are_tokens_over_wall_time(tmp_path):
    """tokens/s = tokens per step x steps / the window's seconds; FLOPs/s and MFU follow from it; the data time
    share is the window's data seconds over its wall time."""
    config = make_tiny_lm_config(steps=2)
    config.train.peak_flops = 1e9
    clock = throughput.StepClock(config, str(tmp_path), jax.devices()[:2], tokens_per_step=256, flops_per_token=1e3)
    clock.data_seconds = 0.5
    out = clock.window_metrics(steps=4, seconds=2.0)
    assert out["tokens_per_s"] == 256 * 4 / 2.0
    assert out["model_flops_per_s"] == 512 * 1e3 and out["mfu"] == 512 * 1e3 / 2e9
    assert out["data_wait_fraction"] == 0.25
    clock.close()
