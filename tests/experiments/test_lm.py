"""Language modelling through the trainer: the same losses on every mesh, evaluation metrics,
FSDP's per-device memory from the compiled step, and sampling from a run's checkpoint."""

import functools
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import data as datasets
import models
from experiments import restore
from experiments.optim import optimizers
from experiments.training import metrics_writer, sharding, train_state, trainer
from tests.conftest import make_tiny_lm_config, slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESHES = {"data=8": dict(data=8), "fsdp=8": dict(data=1, fsdp=8),
          "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2)}


def _losses(workdir):
    events = metrics_writer.read(str(workdir))
    return {(e["split"], e["step"]): e["loss"] for e in events}


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    result = trainer.train_and_evaluate(make_tiny_lm_config(), str(workdir), devices=jax.devices()[:1], verbose=False)
    return workdir, result


@pytest.mark.parametrize("mesh,attention_impl", [("data=2,fsdp=2,tensor=2", "pallas"), slow("data=8", "xla"),
                                                 slow("fsdp=8", "xla"), slow("data=2,fsdp=2,tensor=2", "xla")])
def test_same_losses_on_every_mesh(mesh, attention_impl, one_device_run, tmp_path):
    """Each mesh, and the Pallas flash-attention kernels run per shard, give the one-device XLA losses."""
    config = make_tiny_lm_config()
    config.mesh.update(**MESHES[mesh])
    config.model.attention_impl = attention_impl
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    expected, got = _losses(one_device_run[0]), _losses(tmp_path)
    assert expected.keys() == got.keys() and len(got) == 5  # 4 train steps + 1 eval
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, err_msg=str(key))


def test_evaluation_equals_a_float64_recount_of_the_whole_validation_split(one_device_run):
    """Loss, accuracy, perplexity and bits per character against NumPy over the restored model's logits."""
    workdir, result = one_device_run[0], one_device_run[1]["eval"]
    config = restore.load_config(str(workdir))
    model, variables = restore.load_variables(config, str(workdir))
    split = datasets.load(config.data, seed=0).evals["eval"]
    logits = np.asarray(jax.jit(model.apply)(variables, split["inputs"]), np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, split["targets"][..., None].astype(np.int64), -1)[..., 0]
    mask = np.asarray(split["loss_mask"], np.float64)
    loss = np.sum(nll * mask) / np.sum(mask)
    accuracy = np.sum((logits.argmax(-1) == split["targets"]) * mask) / np.sum(mask)
    assert mask.sum() > 1000  # the whole split, not one batch of it
    assert result["loss"] == pytest.approx(loss, rel=1e-5) and result["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result["perplexity"] == pytest.approx(np.exp(loss), rel=1e-5)
    assert result["bits_per_char"] == pytest.approx(loss / math.log(2), rel=1e-5)  # bytes of ASCII: 1 char a token
    assert 4.0 < result["loss"] < math.log(256) + 0.5  # a few steps in: below uniform-ish, far from trained


def _state_bytes_per_device(fsdp: int) -> int:
    config = make_tiny_lm_config()
    config.model.update(d_model=256, d_mlp=1024, num_heads=4, num_kv_heads=4)
    config.mesh.update(data=8 // fsdp, fsdp=fsdp)
    mesh = sharding.make_mesh(sharding.mesh_shape(config.mesh, 8), jax.devices())
    config.model.update(vocab_size=256, max_len=16)
    model = models.build(config.model)
    tx = optimizers.build(config.optimizer, 10)
    init_fn = functools.partial(train_state.init_state, model, tx, jax.ShapeDtypeStruct((8, 16), np.int32))
    state, shardings = train_state.abstract_state_and_shardings(init_fn, jax.random.PRNGKey(0), mesh)
    step = jax.jit(functools.partial(trainer.train_step, schedule=optimizers.learning_rate_schedule(config.optimizer, 10)),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)), donate_argnums=0)
    batch = {k: jax.ShapeDtypeStruct((8, 16), dtype) for k, dtype in
             (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32))}
    with sharding.use_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    batch_bytes = sum(math.prod(b.shape) * 4 for b in batch.values()) // 8  # split over data * fsdp = 8
    return compiled.memory_analysis().argument_size_in_bytes - batch_bytes


@pytest.mark.slow
def test_fsdp_divides_parameter_and_optimizer_memory_per_device():
    """The compiled step's arguments (params + Adam moments + step + rng) per device shrink ~8x."""
    replicated, sharded = _state_bytes_per_device(1), _state_bytes_per_device(8)
    assert replicated > 3 * 4 * 1_000_000  # ~1.1M parameters, 3 float32 copies
    assert replicated / sharded > 7.5, (replicated, sharded)


@pytest.mark.slow  # by default sampling is tested in-process
def test_sample_cli_continues_a_prompt_from_the_checkpoint(one_device_run):
    workdir = one_device_run[0]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}", "--prompt=ROMEO:",
            "--num_samples=2", "--top_k=5", "--seed=3"]
    out = subprocess.run(args + ["--num_tokens=10"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    samples = out.stdout.split("--- sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("ROMEO:") for s in samples)
    too_long = subprocess.run(args + ["--num_tokens=100"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert too_long.returncode == 2
    assert too_long.stderr.strip().splitlines()[-1].startswith("error: prompt (6 tokens) + --num_tokens=100 exceeds")


@pytest.mark.slow
def test_sample_cli_speculates_with_a_draft_run_and_refuses_what_it_cannot_do(one_device_run):
    """The run drafting for itself: greedy speculative output is accepted whole (stderr reports it); top-k and
    self-speculation without MTP modules are refused in one line."""
    workdir = one_device_run[0]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}", "--prompt=ROMEO:", "--num_tokens=8",
            "--temperature=0"]
    out = subprocess.run(args + [f"--draft_workdir={workdir}", "--lookahead=3"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("--- sample 0 ---\nROMEO:") and "acceptance 1.000 (6 of 6 drafts)" in out.stderr
    for extra, message in (([f"--draft_workdir={workdir}", "--top_k=5"], "speculative decoding samples at"),
                           (["--self_speculative"], "--self_speculative needs a run trained with model.mtp_depth")):
        refused = subprocess.run(args + extra, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and message in refused.stderr.strip().splitlines()[-1], refused.stderr


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32(one_device_run, tmp_path):
    config = make_tiny_lm_config()
    config.model.dtype = "bfloat16"
    trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], verbose=False)
    expected, got = _losses(one_device_run[0]), _losses(tmp_path)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-2, err_msg=str(key))
        assert got[key] != expected[key]  # the bfloat16 path really ran
