"""Mixture-of-Recursions (models/mor.py): expert-choice and token-choice depth assignment against a reference loop
(NumPy float64 selection, each block applied on the whole sequence with only the active tokens as keys), recursive
KV sharing's attention against NumPy, cached decoding against the full pass for every router and KV strategy, the
balancing loss, FLOP accounting, training on the 2x2x2 mesh, and one-line config errors."""

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from experiments.training import metrics_writer, trainer
from models import blocks, gqa, mor
from tests.conftest import assert_mesh_run_matches_one_device, decode_in_pieces, make_tiny_lm_config, slow

T = 11  # not a multiple of anything: top-k sizes round(2/3 T) = 7, round(1/3 T) = 4


def _cfg(**overrides):
    keys = dict(vocab_size=23, max_len=16, d_model=24, num_layers=4, d_mlp=40, num_heads=3, num_kv_heads=1,
                head_dim=8, recursions=3)
    return mor.MoRConfig(**{**keys, **overrides})


@pytest.fixture(scope="module")
def initialised():
    """One set of parameters for every router and KV strategy (they share the parameter tree per router)."""
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, 23)
    params = {router: nn.meta.unbox(jax.jit(mor.MoRTransformer(_cfg(router=router)).init)(jax.random.key(1), tokens)["params"])
              for router in mor.ROUTERS}
    return tokens, params


def _reference(cfg, params, tokens):
    """(logits, recursion counts) by a loop: NumPy float64 routing, each shared block applied to the whole sequence
    with the active tokens as keys, only active tokens updated (recursion-wise caching)."""
    model = mor.MoRTransformer(cfg)
    block = jax.jit(lambda p, x, keys: blocks.Block(cfg).apply({"params": p}, x, None, 0, keys)[0])
    apply_block = lambda name, x, keys=None: block(params[name], x, keys)  # noqa: E731

    def shared(x, keys):
        for j in range(cfg.num_layers - 2):
            x = apply_block(f"shared_{j}", x, None if keys is None else jnp.asarray(keys))
        return x

    x = apply_block("first", model.apply({"params": params}, tokens, method=model.embed_tokens))
    active = np.ones(tokens.shape, bool)
    gate = np.ones(tokens.shape)
    if cfg.router == "token":
        logits = np.asarray(x, np.float64) @ np.asarray(params["depth_router"]["kernel"], np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        depth = probs.argmax(-1) + 1
    runs = np.zeros(tokens.shape, int)
    reference = cfg.router == "expert" and cfg.expert_update == "reference"  # Bae et al.'s x + alpha sig(s) F(x)
    scale = cfg.router_alpha if reference else 1.0
    for r in range(cfg.recursions):
        if reference and r == 0:  # recursion 1 keeps every token, gated by its own router
            score = np.asarray(x, np.float64) @ np.asarray(params["router_0"]["kernel"], np.float64)[:, 0]
            gate = scale / (1 + np.exp(-score))
        if r and cfg.router == "expert":
            score = np.asarray(x, np.float64) @ np.asarray(params[f"router_{r}"]["kernel"], np.float64)[:, 0]
            if cfg.routing == "topk":
                k = int(round((cfg.recursions - r) / cfg.recursions * tokens.shape[1]))
                order = np.argsort(-np.where(active, score, -np.inf), axis=1, kind="stable")[:, :k]
                active = np.zeros_like(active)
                np.put_along_axis(active, order, True, axis=1)
            else:
                active = active & (score > 0)
            gate = scale / (1 + np.exp(-score))
        elif cfg.router == "token":
            active = depth > r
            gate = np.where(depth == r + 1, np.take_along_axis(probs, depth[..., None] - 1, -1)[..., 0], 1.0)
        y = shared(x, active)
        change = np.asarray(y if reference else y - x, np.float64)
        x = x + jnp.asarray(np.where(active[..., None], gate[..., None] * change, 0.0), x.dtype)
        runs += active
    logits = model.apply({"params": params}, apply_block("last", x), method=model.lens_logits)
    return np.asarray(logits), runs


@pytest.fixture(scope="module")
def reference_update():
    """The expert-choice model with Bae et al.'s update (a router at every recursion), its parameters moved off
    their initial values so that alpha sigmoid(s) F(x) differs from every other form."""
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, 23)
    model = mor.MoRTransformer(_cfg(router="expert", expert_update="reference", router_alpha=0.3))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    params["router_0"]["kernel"] = 3.0 * jax.random.normal(jax.random.key(2), params["router_0"]["kernel"].shape)
    return params


@pytest.mark.parametrize("router,routing,update", [("expert", "topk", "delta"), ("expert", "threshold", "delta"),
                                                   ("token", "topk", "delta"), ("expert", "topk", "reference"),
                                                   slow("expert", "threshold", "reference")])
def test_depth_assignment_and_logits_against_a_reference_loop(initialised, reference_update, router, routing, update):
    """Expert-choice top-k (the gathered form: each recursion on its k_r tokens at their own positions), the
    threshold rule decoding uses, and token-choice's argmax depth, with the interpolating update and the reference
    code's: recursion counts equal the reference's, and so do the logits."""
    tokens, params = initialised
    cfg = _cfg(router=router, routing=routing, expert_update=update, router_alpha=0.3)
    params = {router: reference_update} if update == "reference" else params
    model = mor.MoRTransformer(cfg)
    expected_logits, expected_runs = _reference(cfg, params[router], tokens)
    runs = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.recursion_depths))(
        params[router], tokens))
    np.testing.assert_array_equal(runs, expected_runs)
    if router == "expert" and routing == "topk":  # the hierarchy: k_r per row at recursion r
        assert [int((runs[0] > r).sum()) for r in range(3)] == [T, 7, 4]
    else:
        assert len(np.unique(runs)) > 1  # more than one depth exercised
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params[router]}, tokens), expected_logits, atol=2e-5,
                               rtol=2e-5)


def test_shared_kv_attention_against_numpy():
    """reuse_cache: queries from this pass attend (causally) to the keys and values another pass wrote."""
    cfg = _cfg(num_heads=2, num_kv_heads=1, head_dim=4, d_model=8)
    attention = gqa.GroupedQueryAttention(cfg)
    x1, x2 = jax.random.normal(jax.random.key(2), (2, 1, 5, 8))
    cache = gqa.GroupedQueryAttention.init_cache(cfg, 1, 7)
    params = nn.meta.unbox(attention.init(jax.random.key(3), x1, 0, cache)["params"])
    _, written = attention.apply({"params": params}, x1, 0, cache)
    out, kept = attention.apply({"params": params}, x2, 0, written, reuse_cache=True)
    jax.tree.map(np.testing.assert_array_equal, kept, written)  # nothing written
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def rope(v):  # [T, heads, 4] by positions 0..T-1, models/positions.py's half-split rotation
        inv = cfg.rope_theta ** (-np.arange(0, 4, 2) / 4)
        angle = np.arange(v.shape[0])[:, None] * inv
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        a, b = v[..., :2], v[..., 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    a1, a2 = np.asarray(x1[0], np.float64), np.asarray(x2[0], np.float64)
    q = rope(np.einsum("td,dhk->thk", a2, p["query"]))
    k = rope(np.einsum("td,dhk->thk", a1, p["key"]))[:, 0]
    v = np.einsum("td,dhk->thk", a1, p["value"])[:, 0]
    scores = np.einsum("qhk,sk->hqs", q, k) / 2.0 + np.triu(np.full((5, 5), -np.inf), 1)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("hqs,sk,hkd->qd", weights, v, p["out"])
    np.testing.assert_allclose(out[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router,kv_sharing", [("expert", "recursion"), ("token", "share"),
                                               slow("expert", "share"), slow("token", "recursion")])
def test_cached_decoding_equals_the_full_pass(initialised, router, kv_sharing):
    """Decoding in pieces (a prompt of 4, one token, six) equals the full pass routed as decoding routes
    (expert-choice: the threshold; token-choice: its depths), and remembers each recursion's active positions."""
    tokens, params = initialised
    model = mor.MoRTransformer(_cfg(router=router, routing="threshold", kv_sharing=kv_sharing))
    logits, cache = decode_in_pieces(model, params[router], tokens, model.init_cache(2, 16), (4, 1, 6))
    np.testing.assert_allclose(logits, model.apply({"params": params[router]}, tokens), atol=2e-5, rtol=2e-5)
    runs = np.asarray(model.apply({"params": params[router]}, tokens, method=model.recursion_depths))
    np.testing.assert_array_equal(np.asarray(cache[mor.ACTIVE][:, :, :T]).sum(1), runs)
    assert len(cache["recursions"]) == (1 if kv_sharing == "share" else 3)


@pytest.mark.parametrize("kv_sharing", ["recursion", slow("share")])
def test_one_token_at_a_time_decoding_skips_inactive_recursions_exactly(initialised, kv_sharing):
    """Batch 1, one token per step: a recursion no token needs is skipped (lax.cond), its cache left unwritten,
    and the logits still equal the full pass's."""
    tokens, params = initialised
    model = mor.MoRTransformer(_cfg(routing="threshold", kv_sharing=kv_sharing))
    row = tokens[:1]
    logits, _ = decode_in_pieces(model, params["expert"], row, model.init_cache(1, 16), (1,) * T)
    np.testing.assert_allclose(logits, model.apply({"params": params["expert"]}, row), atol=2e-5, rtol=2e-5)
    runs = np.asarray(model.apply({"params": params["expert"]}, row, method=model.recursion_depths))
    assert runs.min() < 3  # some step skipped a recursion


def test_kv_sharing_changes_what_later_recursions_read(initialised):
    """The two KV strategies give different logits from the same parameters (later recursions read recursion 1's
    keys and values, not their own), and equal ones with a single recursion."""
    tokens, params = initialised
    logits = {kv: mor.MoRTransformer(_cfg(router="token", kv_sharing=kv)).apply({"params": params["token"]}, tokens)
              for kv in mor.KV_SHARING}
    assert np.abs(logits["recursion"] - logits["share"]).max() > 1e-3
    one = _cfg(router="token", recursions=1)
    one_params = nn.meta.unbox(mor.MoRTransformer(one).init(jax.random.key(4), tokens)["params"])
    single = [mor.MoRTransformer(dataclasses.replace(one, kv_sharing=kv)).apply({"params": one_params}, tokens)
              for kv in mor.KV_SHARING]
    np.testing.assert_allclose(*single, atol=1e-5)


def test_token_choice_balancing_loss_against_numpy(initialised):
    tokens, params = initialised
    cfg = _cfg(router="token", router_weight=0.5)
    model = mor.MoRTransformer(cfg)
    _, sown = model.apply({"params": params["token"]}, tokens, mutable=["losses", "metrics"])
    block = blocks.Block(cfg)
    x = block.apply({"params": params["token"]["first"]}, model.apply({"params": params["token"]}, tokens,
                                                                       method=model.embed_tokens), None, 0)[0]
    logits = np.asarray(x, np.float64) @ np.asarray(params["token"]["depth_router"]["kernel"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    fraction = np.bincount(probs.argmax(-1).ravel(), minlength=3) / probs[..., 0].size
    expected = 3 * np.sum(fraction * probs.mean((0, 1)))
    np.testing.assert_allclose(sown["losses"]["router_balance"][0], 0.5 * expected, rtol=1e-5)
    np.testing.assert_allclose(sown["metrics"]["depth_fraction"][0], fraction, rtol=1e-6)


def test_active_parameters_count_the_shared_stack_per_mean_recursion():
    """N active = unique parameters + the shared stack's (N_r + 1) / 2 - 1 more uses (3 recursions: twice)."""
    config = ml_collections.ConfigDict(dataclasses.asdict(_cfg()))
    shapes = jax.eval_shape(models.build(config).init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    params = nn.meta.unbox(shapes["params"])
    shared = sum(x.size for name in ("shared_0", "shared_1") for x in jax.tree.leaves(params[name]))
    total = models.parameter_count(config, 16)
    assert total == sum(x.size for x in jax.tree.leaves(params))
    assert models.parameter_count(config, 16, active=True) == total + shared
    assert mor.capacities(3) == (1.0, 2 / 3, 1 / 3) and mor.mean_recursions(3) == 2.0


def _lm_config(**model):
    c = make_tiny_lm_config()
    with c.unlocked():
        c.model = dataclasses.asdict(mor.MoRConfig())
    c.model.update(d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, d_mlp=64, recursions=2, **model)
    return c


@pytest.mark.slow
def test_trains_through_the_trainer_with_its_router_statistics(tmp_path):
    trainer.train_and_evaluate(_lm_config(), str(tmp_path), verbose=False)
    events = metrics_writer.read(str(tmp_path), "train")
    assert events[-1]["loss"] < events[0]["loss"]
    assert 0 <= events[-1]["router_agreement_1"] <= 1 and events[-1]["router_bce_1"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("router,kv_sharing", [("expert", "recursion"), ("token", "share")])
def test_trains_with_the_one_device_losses_on_a_2x2x2_mesh(tmp_path, router, kv_sharing):
    assert_mesh_run_matches_one_device(lambda: _lm_config(router=router, kv_sharing=kv_sharing), tmp_path)


@pytest.mark.parametrize("overrides,message", [
    (dict(attention="mla"), "model.attention='mla' cannot run on gathered tokens"),
    (dict(positional="alibi"), "model.positional='alibi' biases scores by position"),
    (dict(attention_pattern="sliding", attention_window=4), "model.attention_pattern='sliding' would apply"),
    (dict(remat="full"), "model.remat='full': MoR's blocks are not scanned"),
])
def test_bad_configs_are_one_line_errors(overrides, message):
    problems = mor.validate(_cfg(**overrides))
    assert any(message in p for p in problems), problems
    assert all("\n" not in p for p in problems)
