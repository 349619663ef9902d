"""Mixture-of-Depths (models/mod.py): top-k routing and capacity against NumPy, the gathered block against the same
block run on the whole sequence with the other tokens masked out, the predictor-routed decode against its full pass,
FLOP accounting, router tuning from a dense run, training on the 2x2x2 mesh, and one-line config errors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from experiments import restore
from experiments.training import metrics_writer, trainer
from models import blocks, mod
from tests.conftest import assert_mesh_run_matches_one_device, decode_in_pieces, make_tiny_config, make_tiny_lm_config


def _cfg(**overrides):
    keys = dict(vocab_size=23, max_len=16, d_model=24, num_layers=2, d_mlp=40, num_heads=3, num_kv_heads=1,
                head_dim=8, capacity=0.3)
    return mod.MoDConfig(**{**keys, **overrides})


@pytest.fixture(scope="module")
def routed_block():
    cfg = _cfg()
    module = mod.RoutedBlock(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 11, cfg.d_model))
    params = nn.meta.unbox(jax.jit(module.init, static_argnums=3)(jax.random.key(1), x, None, 0)["params"])
    return cfg, module, params, x


def test_top_k_routing_and_capacity_against_numpy(routed_block):
    """k = round(capacity T) tokens per row, the k highest router scores w . x_i (float64 argsort); the others leave
    unchanged, the chosen ones get r_i (f(x_S) - x_S), which equals the block run on the whole sequence with only
    the chosen tokens as keys: the gathered tokens keep their own positions (RoPE) and causal order."""
    cfg, module, params, x = routed_block
    k = mod.capacity_tokens(cfg.capacity, x.shape[1])
    assert k == 3 and mod.capacity_tokens(0.01, 11) == 1 and mod.capacity_tokens(1.0, 11) == 11
    r = np.float64(x) @ np.float64(params["router"]["kernel"])[:, 0]  # [B, T]
    chosen = np.zeros(r.shape, bool)
    for row in range(r.shape[0]):
        chosen[row, np.argsort(-r[row])[:k]] = True

    got, cache = jax.jit(lambda p, x: module.apply({"params": p}, x, None, 0))(params, x)
    assert cache is None
    np.testing.assert_array_equal(np.asarray(got)[~chosen], np.asarray(x)[~chosen])
    masked, _ = module.apply({"params": params}, x, jnp.asarray(r, jnp.float32), jnp.asarray(chosen),
                             method=mod.RoutedBlock.masked)
    np.testing.assert_allclose(np.asarray(got)[chosen], np.asarray(masked)[chosen], rtol=1e-5, atol=1e-5)
    assert float(np.abs(np.asarray(got) - np.asarray(x))[chosen].min()) > 0  # chosen tokens did move


def test_predictor_metrics_and_loss_score_its_logits_against_the_top_k_choice(routed_block):
    """The causal predictor's logits p against the top-k choice z (float64 NumPy): its loss and metric
    predictor_bce = mean(max(p, 0) - p z + log(1 + exp(-|p|))) (the loss times predictor_weight), predictor_agreement
    = mean([p > 0] == z), predicted_fraction = mean(p > 0)."""
    cfg, module, params, x = routed_block
    k = mod.capacity_tokens(cfg.capacity, x.shape[1])
    r, p = (np.float64(a) for a in module.apply({"params": params}, x, method=mod.RoutedBlock.scores))
    chosen = np.zeros(r.shape, bool)
    for row in range(r.shape[0]):
        chosen[row, np.argsort(-r[row])[:k]] = True
    _, state = module.apply({"params": params}, x, None, 0, mutable=["metrics", "losses"])
    metrics = {name: float(value[0]) for name, value in state["metrics"].items()}
    bce = np.mean(np.maximum(p, 0) - p * chosen + np.log1p(np.exp(-np.abs(p))))
    np.testing.assert_allclose(metrics["predictor_bce"], bce, rtol=1e-5)
    np.testing.assert_allclose(float(state["losses"]["predictor_bce"][0]), cfg.predictor_weight * bce, rtol=1e-5)
    assert metrics["predictor_agreement"] == pytest.approx(np.mean((p > 0) == chosen))
    assert metrics["predicted_fraction"] == pytest.approx(np.mean(p > 0))
    assert np.mean((p > 0) == chosen) != 0.5  # so that 1 - agreement (a flipped comparison) differs


def test_full_capacity_is_the_dense_block_scaled_by_the_router(routed_block):
    cfg, module, params, x = routed_block
    full = dataclasses.replace(cfg, capacity=1.0)
    got, _ = mod.RoutedBlock(full).apply({"params": params}, x, None, 0)
    dense, _ = blocks.Block(cfg).apply({"params": params["block"]}, x, None, 0)
    r = (x @ params["router"]["kernel"])[..., 0]
    np.testing.assert_allclose(got, x + r[..., None] * (dense - x), rtol=1e-5, atol=1e-5)
    assert set(params["router"]) == {"kernel"}  # r = w . x, no bias (Raposo et al.)


def test_predictor_routed_decoding_equals_the_full_pass():
    """routing="predictor": token i is routed iff the predictor's logit > 0, in the full pass and when decoding (a
    5-token prompt, then one token at a time), routed positions remembered by the cache."""
    cfg = _cfg(routing="predictor")
    model = mod.MoDTransformer(cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(3), tokens)["params"])
    full, captured = model.apply({"params": params}, tokens, mutable=["intermediates"])
    got, cache = decode_in_pieces(model, params, tokens, model.init_cache(2, cfg.max_len), (5, 1, 1, 1, 1, 1, 1))
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)
    x = captured["intermediates"]["layers"]["block_0"]["residual"][0][0]  # the routed block's input [B, T, D]
    routed = params["layers"][mod.ROUTED]
    hidden = np.maximum(np.asarray(x) @ routed["predictor_in"]["kernel"][0] + routed["predictor_in"]["bias"][0], 0)
    p = hidden @ routed["predictor_out"]["kernel"][0][:, 0] + routed["predictor_out"]["bias"][0][0]
    np.testing.assert_array_equal(np.asarray(cache[mod.ROUTED][mod.ROUTED][0])[:, :11], p > 0)  # what it remembers
    assert 0 < (p > 0).mean() < 1  # both paths exercised


def test_active_parameters_count_routed_blocks_at_capacity():
    config = dict(name="mod", vocab_size=23, max_len=16, d_model=24, num_layers=4, d_mlp=40, num_heads=3,
                  num_kv_heads=1, head_dim=8, capacity=0.25)
    model_config = ml_collections.ConfigDict(config)
    shapes = jax.eval_shape(models.build(model_config).init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    block = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])["layers"][mod.ROUTED]["block"]))
    total = models.parameter_count(model_config, 16)
    assert models.parameter_count(model_config, 16, active=True) == int(total - 0.75 * block)


@pytest.mark.slow
def test_router_tuning_trains_only_the_routers_of_a_dense_run(finished_tiny_run, tmp_path):
    config = make_tiny_config(steps=3)
    config.model.name = "mod"
    with config.unlocked():
        config.model = dataclasses.asdict(mod.MoDConfig(**{k: v for k, v in config.model.to_dict().items()
                                                           if k != "name"}, capacity=0.5))
    config.train.update(init_from=str(finished_tiny_run))
    config.optimizer.update(train_only="*router*,*predictor*", lr=1e-2)
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    dense = restore.load_variables(restore.load_config(str(finished_tiny_run)), str(finished_tiny_run))[1]["params"]
    tuned = restore.load_variables(restore.load_config(str(tmp_path)), str(tmp_path))[1]["params"]
    expected = mod.from_dense(dense, 2)
    routing = {name: tuned["layers"][mod.ROUTED].pop(name) for name in mod.ROUTING_PARAMETERS}
    jax.tree.map(np.testing.assert_array_equal, tuned, expected)  # every block exactly the dense run's
    assert routing["router"]["kernel"].shape == (1, 32, 1)
    events = [e for e in metrics_writer.read(str(tmp_path)) if e["split"] == "train"]
    bce = [e["layers/routed/predictor_bce/0"] for e in events]
    assert bce[-1] < bce[0]  # the predictor learns top-k membership


@pytest.mark.slow
def test_trains_with_the_one_device_losses_on_a_2x2x2_mesh(tmp_path):
    def config():
        c = make_tiny_lm_config()
        with c.unlocked():
            c.model = dataclasses.asdict(mod.MoDConfig())
        c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_mlp=64, capacity=0.25)
        return c
    assert_mesh_run_matches_one_device(config, tmp_path)


@pytest.mark.parametrize("overrides,message", [
    (dict(num_layers=3), "model.num_layers=3 must be a multiple of model.route_every=2"),
    (dict(attention="mla"), "model.attention='mla' cannot run on gathered tokens"),
    (dict(positional="alibi"), "model.positional='alibi' biases scores by position"),
    (dict(attention_pattern="sliding", attention_window=4), "model.attention_pattern='sliding' would apply"),
])
def test_bad_configs_are_one_line_errors(overrides, message):
    problems = mod.validate(_cfg(**overrides))
    assert any(message in p for p in problems), problems
    assert all("\n" not in p for p in problems)


@pytest.mark.parametrize("capacity,valid", [(1.0, True), (0.01, True), (1.5, False), (0.0, False)])
def test_capacity_is_a_fraction_of_the_sequence(capacity, valid):
    """0 < capacity <= 1: a routed block processes at most every token."""
    from data.config_fields import problems

    found = problems(mod.MoDConfig, {"capacity": capacity}, "model.")
    assert (found == []) == valid, found
    if not valid:
        assert len(found) == 1 and f"model.capacity={capacity}" in found[0]


def test_from_dense_puts_layer_u_times_every_plus_i_in_period_u():
    """A 6-layer transformer's stacked blocks in an MoD layout with route_every 3: period u's block_i is dense layer
    3u + i (i = 0, 1), its routed block layer 3u + 2; everything outside the stack is kept as it is."""
    dense = {"embed": {"embedding": np.ones((4, 2))},
             "layers": {"attention": {"kernel": np.arange(6 * 2).reshape(6, 2)}, "norm": {"scale": np.arange(6.0)}}}
    moved = mod.from_dense(dense, 3)
    assert set(moved["layers"]) == {"block_0", "block_1", mod.ROUTED}
    for u in range(2):
        for i, block in enumerate((moved["layers"]["block_0"], moved["layers"]["block_1"],
                                   moved["layers"][mod.ROUTED]["block"])):
            np.testing.assert_array_equal(block["attention"]["kernel"][u], dense["layers"]["attention"]["kernel"][3 * u + i])
            assert block["norm"]["scale"][u] == 3 * u + i
    assert moved["embed"] is dense["embed"]
