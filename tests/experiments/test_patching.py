"""Activation patching and ablation (experiments/analysis/patching.py) against what they must equal: a clean run's residual
patched in anywhere gives the clean logits from there on, at one position only that position's, and zero-ablating
every layer's outputs leaves the embeddings read through the lens."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.analysis import activations, patching
from models import hybrid, transformer
from tests.conftest import slow

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["transformer", slow("hybrid")])
def model_and_runs(request):
    if request.param == "transformer":
        cfg = transformer.TransformerConfig(vocab_size=19, max_len=8, d_model=16, num_layers=3, num_heads=2, d_mlp=32)
        model = transformer.Transformer(cfg)
    else:
        cfg = hybrid.HybridConfig(vocab_size=19, max_len=8, d_model=16, num_layers=4, layer_pattern="SA", num_heads=2,
                                  ssm_head_dim=8, ssm_state=4, chunk_size=4, d_mlp=32)
        model = hybrid.HybridLM(cfg)
    clean = jax.random.randint(jax.random.key(0), (2, 7), 0, 19)
    corrupted = clean.at[:, 2].set((clean[:, 2] + 5) % 19)
    variables = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), clean)["params"])}
    clean_logits, clean_sown = activations.capture_tree(model, variables, clean)
    corrupted_logits, corrupted_sown = activations.capture_tree(model, variables, corrupted)
    return model, variables, cfg.num_layers, clean, corrupted, clean_logits, clean_sown, corrupted_logits, corrupted_sown


def test_patching_the_clean_residual_into_the_corrupted_run_restores_the_clean_logits(model_and_runs):
    model, variables, layers, clean, corrupted, clean_logits, clean_sown, corrupted_logits, _ = model_and_runs
    assert np.abs(np.asarray(clean_logits - corrupted_logits)).max() > 1e-3
    for layer in range(layers):
        tree = patching.patches(clean_sown, "residual", [layer])
        np.testing.assert_allclose(patching.patched_logits(model, variables, corrupted, tree), clean_logits, **TOL)
    same = patching.patches(clean_sown, ("mixer_out", "residual"), range(layers))  # clean into clean: nothing moves
    np.testing.assert_allclose(patching.patched_logits(model, variables, clean, same), clean_logits, **TOL)


def test_patching_one_position_of_the_last_layer_changes_only_that_position(model_and_runs):
    model, variables, layers, clean, corrupted, clean_logits, clean_sown, corrupted_logits, _ = model_and_runs
    tree = patching.patches(clean_sown, "residual", [layers - 1], positions=[4])
    logits = patching.patched_logits(model, variables, corrupted, tree)
    np.testing.assert_allclose(logits[:, 4], clean_logits[:, 4], **TOL)
    others = [t for t in range(7) if t != 4]
    np.testing.assert_allclose(logits[:, others], corrupted_logits[:, others], **TOL)


def test_zero_ablating_every_layers_outputs_leaves_the_embeddings(model_and_runs):
    model, variables, layers, clean, _, _, clean_sown, _, _ = model_and_runs
    zero = patching.zeros_like(clean_sown)
    tree = patching.patches(clean_sown, ("mixer_out", "ffn_out"), range(layers), source=zero)
    embed = model.apply(variables, clean, method=model.embed_tokens)
    want = model.apply(variables, embed, method=model.lens_logits)
    np.testing.assert_allclose(patching.patched_logits(model, variables, clean, tree), want, **TOL)


def test_mean_ablation_values_and_the_metrics(model_and_runs):
    *_, clean, _, clean_logits, clean_sown, _, _ = model_and_runs
    means = patching.means_like(clean_sown)
    leaf, mean = jax.tree.leaves(clean_sown)[0], jax.tree.leaves(means)[0]
    np.testing.assert_allclose(mean[:, 1, 3], np.asarray(leaf).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    logits = np.asarray(clean_logits)
    want = np.mean(logits[:, 3, 5] - logits[:, 3, 7])
    np.testing.assert_allclose(patching.logit_difference(clean_logits, 3, 5, 7), want, rtol=1e-6)
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs[:, :-1], np.asarray(clean)[:, 1:, None], axis=-1)
    np.testing.assert_allclose(patching.next_token_loss(clean_logits, clean), -picked.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"site\(s\) \['attention'\] are not in layers \[0\]"):
        patching.patches(clean_sown, "attention", [0])


@pytest.mark.slow  # the default suite's budget
def test_the_sweep_is_one_at_the_last_layers_last_position_and_zero_before_the_corruption(model_and_runs):
    model, variables, layers, clean, corrupted, clean_logits, _, corrupted_logits, _ = model_and_runs
    right, wrong = int(np.argmax(clean_logits[0, -1])), int(np.argmin(clean_logits[0, -1]))
    table, high, low = patching.sweep(model, variables, clean[:1], corrupted[:1], "residual", right, wrong)
    assert table.shape == (layers, 7) and high != pytest.approx(low)
    assert high == pytest.approx(float(clean_logits[0, -1, right] - clean_logits[0, -1, wrong]), rel=1e-5)
    np.testing.assert_allclose(table[-1, -1], 1.0, rtol=1e-4)  # the whole residual at the read-out position
    np.testing.assert_allclose(table[:, :2], 0.0, atol=1e-4)  # positions before the corrupted token are the same
