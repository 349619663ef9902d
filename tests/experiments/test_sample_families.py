"""`python -m experiments.sample` on checkpoints of every LM family: greedy samples (temperature 0) equal
argmax decoding by full forward passes of the restored model (the cache path against the plain one)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import text
from experiments import restore
from experiments.training import trainer
from experiments.configs import base
from tests.conftest import make_tiny_lm_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILIES = {
    "ssd": dict(num_layers=2, ssm_head_dim=16, ssm_state=8, chunk_size=8),
    "hybrid": dict(num_layers=3, layer_pattern="CSA", ssm_head_dim=16, ssm_state=8, chunk_size=8, num_kv_heads=2),
    "moe": dict(num_layers=2, num_experts=4, top_k=2, d_expert=16, num_kv_heads=2),
    "deq": dict(num_layers=1, max_iter=8, backward_max_iter=8),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_cli_samples_equal_full_pass_argmax(family, tmp_path):
    config = make_tiny_lm_config(steps=2)
    with config.unlocked():
        config.model = base.get_config(family, "text").model
    config.model.update(d_model=32, num_heads=4, d_mlp=64, **FAMILIES[family])
    trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], verbose=False)

    out = subprocess.run([sys.executable, "-m", "experiments.sample", f"--workdir={tmp_path}", "--prompt=ROMEO:",
                          "--num_tokens=6", "--temperature=0"], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    sampled = out.stdout.split("--- sample 0 ---\n", 1)[1][len("ROMEO:"):].rstrip("\n")

    model, variables = restore.load_variables(restore.load_config(str(tmp_path)), str(tmp_path))
    tokenizer = text.tokenizer("byte", "")
    sequence = jnp.asarray([tokenizer.encode("ROMEO:")], jnp.int32)
    forward = jax.jit(lambda tokens: model.apply(variables, tokens))  # one compile per length, not one per op
    for _ in range(6):
        logits = forward(sequence)
        sequence = jnp.concatenate([sequence, jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)], axis=1)
    assert sampled == tokenizer.decode(np.asarray(sequence[0, 6:])).rstrip("\n")
