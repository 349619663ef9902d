"""Activation capture and the logit lens (experiments/analysis/activations.py, experiments/analysis/logit_lens.py): the sites add up
to the residual stream, the captured layers are those of a model truncated to them, the last layer's lens is the
model's output, and the command's last layer gives the trainer's evaluation loss."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.analysis import activations, attention_plot, logit_lens
from experiments.training import metrics_writer
from models import hybrid, transformer
from tests.conftest import slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model_and_params(model_cls, cfg, tokens):
    model = model_cls(cfg)
    return model, {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])}


def _truncated(variables, stack: str, units: int):
    params = dict(variables["params"])
    params[stack] = jax.tree.map(lambda p: p[:units], params[stack])
    return {"params": params}


@pytest.mark.parametrize("family", ["transformer", slow("hybrid")])
def test_captured_layers_add_up_and_equal_a_model_truncated_to_them(family):
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 19)
    if family == "transformer":
        cfg = transformer.TransformerConfig(vocab_size=19, max_len=8, d_model=16, num_layers=3, num_heads=2, d_mlp=32)
        model_cls, stack, per_unit = transformer.Transformer, "layers", 1
    else:  # two periods of a Mamba-2 layer and an attention block: layers interleave across the periods
        cfg = hybrid.HybridConfig(vocab_size=19, max_len=8, d_model=16, num_layers=4, layer_pattern="SA", num_heads=2,
                                  ssm_head_dim=8, ssm_state=4, chunk_size=4, d_mlp=32)
        model_cls, stack, per_unit = hybrid.HybridLM, "periods", 2
    model, variables = _model_and_params(model_cls, cfg, tokens)
    logits, embed, layers = activations.capture(model, variables, tokens)
    assert len(layers) == cfg.num_layers
    np.testing.assert_allclose(logits, model.apply(variables, tokens), rtol=1e-6, atol=1e-6)
    previous = embed
    for layer in layers:  # x_l = x_{l-1} + mixer_out (+ ffn_out)
        np.testing.assert_allclose(layer["residual"], previous + layer["mixer_out"] + layer.get("ffn_out", 0.0),
                                   rtol=1e-5, atol=1e-5)
        previous = layer["residual"]
    lens = lambda x: model.apply(variables, x, method=model.lens_logits)  # noqa: E731
    np.testing.assert_allclose(lens(layers[-1]["residual"]), logits, rtol=1e-5, atol=1e-5)
    units = cfg.num_layers // per_unit - 1  # a model of the first units only ends where they end
    short = model_cls(dataclasses.replace(cfg, num_layers=units * per_unit))
    np.testing.assert_allclose(lens(layers[units * per_unit - 1]["residual"]),
                               short.apply(_truncated(variables, stack, units), tokens), rtol=1e-5, atol=1e-5)


def test_the_last_layer_of_the_lens_is_the_trainers_evaluation(finished_tiny_run):
    report = logit_lens.lens_report(str(finished_tiny_run), max_examples=100_000)
    assert report["layers"] == [0, 1, 2]
    trained = metrics_writer.read(str(finished_tiny_run), "eval")[-1]
    np.testing.assert_allclose(report["loss"][-1], trained["loss"], rtol=1e-5)
    np.testing.assert_allclose(report["accuracy"][-1], trained["accuracy"], rtol=1e-5)


@pytest.mark.slow  # a subprocess; by default the function above
def test_the_lens_command_writes_its_json_and_plot(finished_tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_tiny_run, workdir)
    out = subprocess.run([sys.executable, "-m", "experiments.analysis.logit_lens", f"--workdir={workdir}", "--max_examples=8"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(workdir / "logit_lens.json") as f:
        assert json.load(f)["examples"] == 8
    assert (workdir / "logit_lens.png").is_file() and out.stdout.count("layer ") == 3


def test_a_family_that_sows_nothing_is_refused_in_one_line():
    class Bare(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return nn.Embed(5, 4)(tokens)

    model = Bare()
    tokens = np.zeros((1, 3), np.int32)
    with pytest.raises(ValueError, match="sows no activations"):
        activations.capture(model, jax.jit(model.init)(jax.random.key(0), tokens), tokens)


@pytest.mark.slow  # the default suite's budget
def test_the_attention_pattern_and_the_values_give_the_mixer_output_and_mlp_hidden_the_ffn_output(tmp_path):
    """Norm-free, so layer 0 reads the embeddings: mixer_out = sum_h P_h (x W_v,h) W_out,h, and ffn_out =
    mlp_hidden W_out + b_out of the MLP, recomputed from the parameters; P is causal and its rows sum to 1."""
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 11)
    cfg = transformer.TransformerConfig(vocab_size=11, max_len=8, d_model=16, num_layers=2, num_heads=4,
                                        num_kv_heads=2, d_mlp=24, norm="none", mlp_bias=True, activation="relu")
    model, variables = _model_and_params(transformer.Transformer, cfg, tokens)
    _, embed, layers = activations.capture(model, variables, tokens)
    pattern = np.asarray(layers[0]["attention_pattern"], np.float64)  # [B, H, T, T]
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.triu(pattern, k=1) == 0)
    params = jax.tree.map(lambda p: np.asarray(p[0], np.float64), variables["params"]["layers"])
    values = np.repeat(np.einsum("btd,dhe->bthe", np.asarray(embed, np.float64), params["attention"]["value"]), 2, 2)
    mixed = np.einsum("bhqk,bkhe,hed->bqd", pattern, values, params["attention"]["out"])
    np.testing.assert_allclose(layers[0]["mixer_out"], mixed, rtol=1e-4, atol=1e-5)
    hidden = np.asarray(layers[0]["mlp_hidden"], np.float64)
    assert np.all(hidden >= 0)  # after the ReLU
    mlp = params["mlp"]
    np.testing.assert_allclose(layers[0]["ffn_out"], hidden @ mlp["wo"]["kernel"] + mlp["wo"]["bias"], rtol=1e-4,
                               atol=1e-5)
    found = attention_plot.patterns(model, variables, tokens)
    np.testing.assert_array_equal(found[1], layers[1]["attention_pattern"][0])
    attention_plot.plot(found, [str(t) for t in tokens[0]], str(tmp_path / "attention.png"))
    assert (tmp_path / "attention.png").stat().st_size > 0


@pytest.mark.slow  # a hybrid initialised and decoded token by token
def test_the_captured_ssm_state_is_the_recurrent_state_after_decoding_the_sequence():
    cfg = hybrid.HybridConfig(vocab_size=19, max_len=8, d_model=16, num_layers=4, layer_pattern="SA", num_heads=2,
                              ssm_head_dim=8, ssm_state=4, chunk_size=4, d_mlp=32)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 19)
    model, variables = _model_and_params(hybrid.HybridLM, cfg, tokens)
    layers = activations.capture(model, variables, tokens)[2]  # the chunked SSD over the whole sequence
    decode = jax.jit(lambda t, c, s: model.apply(variables, t, c, s, method=model.decode))
    cache = model.init_cache(2, 8)
    for position in range(7):  # one token at a time: the sequential recurrence
        _, cache = decode(tokens[:, position:position + 1], cache, position)
    for period, layer in enumerate((0, 2)):
        np.testing.assert_allclose(layers[layer]["ssm_state"], cache["layer_0_ssm"]["ssm"][period], rtol=1e-4,
                                   atol=1e-5)
    assert "ssm_state" not in layers[1] and "attention_pattern" in layers[1]
