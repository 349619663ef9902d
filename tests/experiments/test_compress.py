"""Compressing a model (experiments/compression/model.py, experiments/compress.py): the calibration records each kernel's
input second moment (checked against the captured MLP hidden activations), every kernel of every layer is compressed
by the layer function on its own matrix (the 4-D attention output included) and nothing else changes, a compressed
run folder evaluates (experiments/evaluation/loss_eval.py, equal to the trainer's own evaluation on the source run),
GPTQ and AWQ beat RTN on the calibration error, and a model with kernels no calibration reaches, or a bad request, is a
one-line error."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from data.config_fields import ConfigError
from experiments import compress, compression, restore
from experiments.analysis import activations
from experiments.compression import model as compression_model, storage, smoothquant
from experiments.evaluation import loss_eval
from experiments.training import metrics_writer
from models import transformer
from tests.conftest import slow


@pytest.fixture(scope="module")
def tiny():
    cfg = transformer.TransformerConfig(vocab_size=17, max_len=12, d_model=16, num_layers=2, num_heads=4,
                                        num_kv_heads=2, d_mlp=24, activation="swiglu")
    model = transformer.Transformer(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (6, 12), 0, 17))
    variables = {"params": nn.meta.unbox(model.init(jax.random.key(1), jnp.asarray(tokens[:1]))["params"])}
    return model, variables, tokens


def test_calibration_records_each_kernels_input_second_moment(tiny):
    model, variables, tokens = tiny
    # not at init, where every collection is mutable: the grams are no part of a model's state (checkpoints)
    assert "calibration" not in model.init(jax.random.key(1), jnp.asarray(tokens[:1]))
    calibration = compression_model.second_moments(model, variables, tokens, batch_size=4)  # two batches summed
    mlp = calibration["layers"]["mlp"]
    _, _, per_layer = activations.capture(model, variables, jnp.asarray(tokens))
    for layer in range(2):
        hidden = np.asarray(per_layer[layer]["mlp_hidden"], np.float64).reshape(-1, 24)
        np.testing.assert_allclose(mlp["wo_gram"][layer], hidden.T @ hidden, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(mlp["wo_abs_sum"][layer], np.abs(hidden).sum(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(mlp["wo_abs_max"][layer], np.abs(hidden).max(0), rtol=1e-5)  # over both batches
        assert mlp["wo_rows"][layer] == tokens.size
    attention = calibration["layers"]["attention"]
    assert attention["query_gram"].shape == (2, 16, 16) and attention["out_gram"].shape == (2, 16, 16)
    np.testing.assert_allclose(attention["query_gram"], attention["key_gram"])  # one input, three projections
    assert set(compression_model.kernels(variables["params"], calibration)) == {
        f"layers/{scope}/{name}" for scope, names in (("attention", ("query", "key", "value", "out")),
                                                      ("mlp", ("wi", "wg", "wo"))) for name in names}


def test_every_kernel_of_every_layer_is_its_layer_functions_result_and_nothing_else_moves(tiny):
    model, variables, tokens = tiny
    calibration = compression_model.second_moments(model, variables, tokens)
    options = {"bits": 3, "group_size": -1, "symmetric": False}
    new, report, stored = compression_model.compress_params(variables["params"], calibration, "rtn", options)
    for layer in range(2):
        out = np.asarray(variables["params"]["layers"]["attention"]["out"][layer])  # [heads, head_dim, D]
        expected = compression.rtn(out.reshape(16, 16), bits=3).reshape(out.shape)
        np.testing.assert_allclose(new["layers"]["attention"]["out"][layer], expected, rtol=1e-6)
        wi = np.asarray(variables["params"]["layers"]["mlp"]["wi"]["kernel"][layer])
        np.testing.assert_allclose(new["layers"]["mlp"]["wi"]["kernel"][layer], compression.rtn(wi, bits=3), rtol=1e-6)
    for group in ("embed", "unembed", "final_norm"):
        jax.tree.map(np.testing.assert_array_equal, new[group], variables["params"][group])
    jax.tree.map(np.testing.assert_array_equal, new["layers"]["mlp_norm"], variables["params"]["layers"]["mlp_norm"])
    assert len(report) == 7 * 2 and all(0 < r["relative_error"] < 0.2 for r in report)
    packed = compression_model.packed_params(new, stored)  # codes and grids in place of every kernel, layers first
    out = packed["layers"]["attention"]["out"]
    assert out["codes"].shape == (2, 8, 16) and out["scale"].shape == (2, 1, 16)  # [L, in / 2, out], [L, groups, out]
    for path in stored:
        node, kernel = compression_model._get(packed, path), compression_model._get(new, path)
        np.testing.assert_allclose(storage.unstack(node, kernel.shape), kernel, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, packed["embed"], new["embed"])


@pytest.mark.slow  # two compressed runs written and evaluated; by default the calibration and per-kernel tests
def test_a_compressed_run_evaluates_and_gptq_beats_rtn(finished_tiny_run, tmp_path):
    source = str(finished_tiny_run)
    trained = [e for e in metrics_writer.read(source) if e["split"] == "eval"][-1]
    assert loss_eval.evaluate(source)["eval"]["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    reports = {}
    for method in ("rtn", "gptq", "awq"):
        reports[method] = compress.compress_run(source, str(tmp_path / method), method, bits=3, calibration_rows=64)
        saved = json.loads((tmp_path / method / "compression.json").read_text())
        assert saved["method"] == method and len(saved["kernels"]) == 6 * 2  # q, k, v, out, wi, wo (GELU); 2 layers
        assert np.isfinite(loss_eval.evaluate(str(tmp_path / method))["eval"]["loss"])
    errors = {m: np.mean([k["relative_error"] for k in r["kernels"]]) for m, r in reports.items()}
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"]
    _, weights = restore.load_variables(restore.load_config(str(tmp_path / "rtn")), str(tmp_path / "rtn"))
    wi = np.asarray(weights["params"]["layers"]["mlp"]["wi"]["kernel"][0])
    assert all(len(np.unique(wi[:, j])) <= 8 for j in range(wi.shape[1]))  # 3 bits: 8 levels per output channel
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), weights["params"])
    unpacked = storage.load_params(str(tmp_path / "rtn"), abstract)  # the compact weights give the checkpoint's
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), unpacked, weights["params"])
    stored = reports["rtn"]["stored"]
    assert stored["bytes"] < 0.6 * stored["float32_bytes"]  # 3-bit codes two to a byte; embeddings in float32
    with pytest.raises(ConfigError, match="already holds a run"):
        compress.compress_run(source, str(tmp_path / "rtn"), "rtn", bits=4)
    smoothed = str(tmp_path / "smoothquant")
    report = compress.compress_run(source, smoothed, "smoothquant", alpha=0.5, calibration_rows=64)
    assert restore.load_config(smoothed).model.quantization == "w8a8" and len(report["smoothing"]) == 2 * 2
    assert loss_eval.evaluate(smoothed)["eval"]["loss"] == pytest.approx(trained["loss"], rel=0.05)


@pytest.mark.parametrize("method,flags,message", [
    ("rtn", {}, "--method=rtn needs --bits"),
    ("wanda", {"bits": 4}, "--method=wanda prunes: --bits"),
    ("sparsegpt", {"bits": 4, "group_size": 8}, "--method=sparsegpt prunes: .*sparsegpt takes --bits and --symmetric"),
    ("gptq", {"bits": 4, "sparsity": 0.5}, "--method=gptq quantizes: --sparsity"),
    ("sparsegpt", {"n_m": "2-4"}, "--n_m='2-4': two integers n:m"),
    ("fp8", {"bits": 4}, "--method=fp8 is e4m3 with one scale per channel or group: --bits"),
    ("smoothquant", {"bits": 4}, "--method=smoothquant is W8A8 per channel and per token: only --alpha"),
    ("smoothquant", {"alpha": 1.5}, "--alpha=1.5: the migration strength is in"),
    ("gptq", {"bits": 4, "alpha": 0.5}, "--alpha is SmoothQuant's migration strength, not an option of --method=gptq"),
    ("prune", {}, "--method='prune': one of rtn, gptq, awq, awq_gptq, fp8, smoothquant, magnitude, wanda, sparsegpt"),
])
def test_bad_requests_are_one_line_errors(method, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        compress.options_from(method, **flags)


@pytest.mark.slow  # by default the joint mode's layer function against the reference (test_compression.py)
def test_joint_sparsegpt_prunes_rounds_and_packs_every_kernel(tiny):
    model, variables, tokens = tiny
    options = compress.options_from("sparsegpt", sparsity=0.5, bits=4)
    compressed, report, packed = compression_model.compress_variables(model, variables, tokens, "sparsegpt", options)
    assert all(r["zeros"] >= 0.5 for r in report["kernels"])
    wi = compressed["params"]["layers"]["mlp"]["wi"]["kernel"]
    np.testing.assert_allclose(storage.unstack(packed["layers"]["mlp"]["wi"]["kernel"], wi.shape), wi, rtol=1e-6)
    assert all(len(np.unique(np.asarray(wi)[1, :, j])) <= 16 for j in range(wi.shape[-1]))  # 4-bit grids


def test_smoothquant_is_an_identity_in_float_and_tames_an_outlier_channel_under_w8a8(tiny):
    """Folding the scales into the norms changes no float logit; with one input channel 40x larger than the rest
    (a norm scale), W8A8 after smoothing is closer to the float model than W8A8 without; the scales are the
    reference's formula (smooth.py of the SmoothQuant code: max|x|^a / max|W|^(1-a), clamped at 1e-5)."""
    model, variables, tokens = tiny
    params = jax.tree.map(np.array, variables["params"])  # writable copies
    params["layers"]["attention_norm"]["scale"][:, 3] *= 40.0
    params["layers"]["mlp_norm"]["scale"][:, 7] *= 40.0
    variables = {**variables, "params": params}
    calibration = compression_model.second_moments(model, variables, tokens)
    smoothed, report = smoothquant.smooth_params(params, calibration, "layers", alpha=0.5)
    float_logits = np.asarray(model.apply(variables, tokens))
    np.testing.assert_allclose(model.apply({**variables, "params": smoothed}, tokens), float_logits, rtol=1e-4,
                               atol=1e-4)
    x_max = calibration["layers"]["attention"]["query_abs_max"][1]
    w_max = np.max([np.abs(params["layers"]["attention"][k][1]).reshape(16, -1).max(1)
                    for k in ("query", "key", "value")], axis=0)
    expected = np.maximum(np.sqrt(x_max) / np.sqrt(np.maximum(w_max, 1e-5)), 1e-5)
    np.testing.assert_allclose(smoothed["layers"]["attention_norm"]["scale"][1],
                               params["layers"]["attention_norm"]["scale"][1] / expected, rtol=1e-5)
    assert len(report) == 2 * 2 and report[0]["scale_max"] > 5 * report[0]["scale_min"]
    w8a8 = models.build(ml_collections.ConfigDict({**dict(model.cfg.__dict__), "quantization": "w8a8"}))
    plain = np.abs(np.asarray(w8a8.apply(variables, tokens)) - float_logits).mean()
    smooth = np.abs(np.asarray(w8a8.apply({**variables, "params": smoothed}, tokens)) - float_logits).mean()
    assert smooth < 0.7 * plain, (smooth, plain)


@pytest.mark.parametrize("family,fields", [
    slow("moe", dict(num_experts=4, top_k=2, d_expert=8, num_shared_experts=1, norm="layernorm")),
    slow("ssd", dict(ssm_state=8, ssm_head_dim=8))])
def test_smoothquant_folds_into_moe_and_mamba2_norms_as_an_identity(tiny, family, fields):
    """The experts, the shared expert and the router (rescaled, kept in float) after an MoE block's mlp_norm, and
    Mamba-2's in_proj after its block's norm: the smoothed float model gives the same logits."""
    tokens = tiny[2]
    model, variables = _tiny(family, tokens, **fields)
    compressed, report, stored = compression_model.compress_variables(model, variables, tokens, "smoothquant",
                                                                      {"alpha": 0.5})
    assert len(report["smoothing"]) == 2 * (2 if family == "moe" else 1) and stored is None  # W8A8 at run time
    assert all(r["scale_min"] < r["scale_max"] for r in report["smoothing"])
    np.testing.assert_allclose(model.apply(compressed, tokens), model.apply(variables, tokens), rtol=1e-4, atol=1e-4)


def _tiny(family: str, tokens, **fields):
    config = ml_collections.ConfigDict(dict(models.MODELS[family][1]().__dict__))
    config.update(vocab_size=17, max_len=12, d_model=16, num_layers=2, num_heads=4, d_mlp=24, **fields)
    model = models.build(config)
    return model, nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(tokens[:1])))


def test_moe_experts_are_calibrated_on_their_tokens_and_compressed_one_by_one(tiny):
    """Each expert's statistics count the tokens routed to it (top-2: every token twice per layer), every expert of
    every layer is compressed by the layer function on its own matrix, and the router is kept."""
    tokens = tiny[2]
    model, variables = _tiny("moe", tokens, num_experts=4, top_k=2, d_expert=8)
    calibration = compression_model.second_moments(model, variables, tokens)
    moe = calibration["layers"]["block_0"]["moe"]
    assert moe["w_gate_gram"].shape == (2, 4, 16, 16) and moe["w_out_gram"].shape == (2, 4, 8, 8)
    np.testing.assert_allclose(moe["w_gate_rows"].sum(1), 2 * tokens.size)  # top-2: every token twice per layer
    assert np.all(moe["w_gate_rows"] > 0)
    compressed, report, _ = compression_model.compress_variables(  # the command's path: checks, then every kernel
        model, variables, tokens, "rtn", {"bits": 3, "group_size": -1, "symmetric": False})
    new, report = compressed["params"], report["kernels"]
    before, after = variables["params"]["layers"]["block_0"]["moe"], new["layers"]["block_0"]["moe"]
    w_out = np.asarray(before["w_out"])  # [L, E, d_expert, D]
    np.testing.assert_allclose(after["w_out"][1, 3], compression.rtn(w_out[1, 3], bits=3), rtol=1e-6)
    assert {(r["layer"], r["expert"]) for r in report if r["kernel"] == "layers/block_0/moe/w_out"} == {
        (layer, expert) for layer in range(2) for expert in range(4)}
    np.testing.assert_array_equal(after["router"], before["router"])


@pytest.mark.slow  # by default the transformer and MoE paths
def test_mamba2_projections_are_compressed_and_its_convolution_kept(tiny):
    tokens = tiny[2]
    model, variables = _tiny("ssd", tokens, ssm_state=8, ssm_head_dim=8)
    compressed, report, _ = compression_model.compress_variables(model, variables, tokens, "rtn",
                                                              {"bits": 4, "group_size": -1, "symmetric": False})
    assert {r["kernel"].split("/")[-1] for r in report["kernels"]} == {"in_proj", "out_proj"}
    before, after = (v["params"]["periods"]["layer_0_ssm"]["mixer"] for v in (variables, compressed))
    for name in ("in_proj", "out_proj"):
        np.testing.assert_allclose(after[name][1], compression.rtn(before[name][1], bits=4), rtol=1e-6)
    np.testing.assert_array_equal(after["conv_kernel"], before["conv_kernel"])


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale


def test_mla_kernels_are_calibrated_on_their_inputs(tiny):
    """Low-rank queries and latent keys and values: each kernel's second moment is that of its input computed here
    in float64 from layer 1's input (layer 0's residual): the normalised block input for the down-projections, the
    normalised query latent for query_up, the normalised key-value latent for key_up and value_up; no kernel of the
    model is left uncalibrated (compressing them: the DeepSeek-V3 test of tests/experiments/test_import_hf.py)."""
    tokens = tiny[2]
    model, variables = _tiny("transformer", tokens, attention="mla", q_lora_rank=12, kv_lora_rank=10)
    calibration = compression_model.second_moments(model, variables, tokens)["layers"]["attention"]
    _, _, per_layer = activations.capture(model, variables, jnp.asarray(tokens))
    p = jax.tree.map(lambda x: np.asarray(x[1], np.float64), variables["params"]["layers"])  # layer 1
    eps = model.cfg.norm_eps
    x = _rms(np.asarray(per_layer[0]["residual"], np.float64).reshape(-1, 16), p["attention_norm"]["scale"], eps)
    q_latent = _rms(x @ p["attention"]["query_down"], p["attention"]["query_norm"]["scale"], 1e-6)
    kv_latent = _rms(x @ p["attention"]["kv_down"], p["attention"]["kv_norm"]["scale"], 1e-6)
    for kernel, inputs in (("query_down", x), ("kv_down", x), ("key_rope", x), ("query_up", q_latent),
                           ("key_up", kv_latent), ("value_up", kv_latent)):
        np.testing.assert_allclose(calibration[f"{kernel}_gram"][1], inputs.T @ inputs, rtol=2e-4, atol=2e-4)
    found = compression_model.kernels(variables["params"], {"layers": {"attention": calibration}})
    assert {name.split("/")[-1] for name in found} == {
        "query_down", "query_up", "kv_down", "key_rope", "key_up", "value_up", "out"}
    assert compression_model.uncovered_kernels(  # the MLP's too: nothing left for the command to refuse
        variables["params"], {path for path, _, _ in found.values()} | {
            ("layers", "mlp", name, "kernel") for name in ("wi", "wo")}, ("layers",)) == []


def test_sequential_calibration_takes_each_blocks_statistics_through_the_compressed_blocks_before_it(tiny):
    """Block 0 as in one pass; block 1 from statistics of the model whose block 0 is compressed (recomputed here),
    which differ from the uncompressed model's."""
    model, variables, tokens = tiny
    options = {"bits": 2, "group_size": -1, "symmetric": False, "act_order": False, "damp": 0.01, "block_size": 128}
    one_pass, _, _ = compression_model.compress_variables(model, variables, tokens, "gptq", options)
    sequential, report, packed = compression_model.compress_variables(model, variables, tokens, "gptq", options,
                                                                      sequential=True)
    assert report["calibration"] == "sequential" and compression_model.blocks(variables["params"], "layers") == [
        ("layers", 0), ("layers", 1)]
    first = jax.tree.map(lambda x: np.asarray(x)[0], (one_pass["params"]["layers"], sequential["params"]["layers"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *first)
    block_0_compressed = {"params": {**variables["params"], "layers": jax.tree.map(
        lambda new, old: np.concatenate([np.asarray(new)[:1], np.asarray(old)[1:]]),
        sequential["params"]["layers"], variables["params"]["layers"])}}
    statistics = compression_model.second_moments(model, block_0_compressed, tokens)["layers"]["mlp"]
    wo = np.asarray(variables["params"]["layers"]["mlp"]["wo"]["kernel"][1])
    expected = compression.gptq(wo, statistics["wo_gram"][1] / statistics["wo_rows"][1], bits=2)
    np.testing.assert_allclose(sequential["params"]["layers"]["mlp"]["wo"]["kernel"][1], expected, rtol=1e-4,
                               atol=1e-5)
    assert not np.allclose(one_pass["params"]["layers"]["mlp"]["wo"]["kernel"][1], expected, atol=1e-3)
    assert packed["layers"]["mlp"]["wo"]["kernel"]["codes"].shape == (2, 12, 16)  # both blocks' codes, 2 to a byte
    with pytest.raises(ConfigError, match="--sequential does not apply to --method=smoothquant"):
        compression_model.compress_variables(model, variables, tokens, "smoothquant", {"alpha": 0.5}, sequential=True)


def test_a_model_with_kernels_no_calibration_reaches_is_refused(tiny):
    tokens = tiny[2]
    model, variables = _tiny("transformer", tokens, attention="linear")
    with pytest.raises(ConfigError, match="kernels whose inputs no calibration records: layers/attention/key"):
        compression_model.compress_variables(model, variables, tokens, "rtn", {"bits": 4, "group_size": -1})
    options = {"bits": 4, "group_size": 5, "symmetric": False}
    with pytest.raises(ConfigError, match=r"group_size=5 does not divide the layer's 16 inputs \(.*\) \(kernel layers/"):
        compression_model.compress_variables(*tiny[:2], tokens, "rtn", options)
