"""LoRA adapters (experiments/posttrain/lora.py) and frozen parameter groups (optimizer.freeze / train_only)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models
from conftest import make_tiny_config
from experiments import restore
from experiments.optim import optimizers
from experiments.posttrain import lora
from experiments.training import trainer


@pytest.fixture(scope="module")
def tiny_model():
    config = make_tiny_config()
    config.model.update(vocab_size=16, max_len=8)
    model = models.build(config.model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 8)), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    return model, boxed, tokens


TARGETS = "*attention/query,*attention/out,*mlp/wo/kernel"


def test_merged_adapters_give_the_kernels_plus_scaled_products(tiny_model):
    """W + alpha / r A B, by NumPy over each stacked layer, the kernel's input axes contracted explicitly."""
    model, boxed, tokens = tiny_model
    config = lora.LoRAConfig(rank=3, alpha=6.0, targets=TARGETS)
    params = nn.meta.unbox(lora.add_adapters(boxed, config, jax.random.key(1)))
    keys = iter(jax.random.split(jax.random.key(2), 16))
    params[lora.KEY] = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), params[lora.KEY])  # B != 0
    got = lora.MergedApply(model.apply, config.alpha)({"params": params}, tokens)

    attention, mlp, adapters = params["layers"]["attention"], params["layers"]["mlp"], params[lora.KEY]["layers"]
    expected = jax.tree.map(lambda x: np.array(x, np.float64), {k: v for k, v in params.items() if k != lora.KEY})
    scale = config.alpha / config.rank
    for layer in range(attention["query"].shape[0]):
        pair = jax.tree.map(lambda x: np.asarray(x[layer], np.float64), adapters["attention"])
        _, heads, head_dim = attention["query"].shape[1:]
        expected["layers"]["attention"]["query"][layer] += scale * np.einsum(
            "ir,rhd->ihd", pair["query"]["a"], pair["query"]["b"].reshape(-1, heads, head_dim))  # in: embed
        expected["layers"]["attention"]["out"][layer] += scale * np.einsum(
            "hdr,ro->hdo", pair["out"]["a"].reshape(heads, head_dim, -1), pair["out"]["b"])  # in: heads x head_dim
        wo = jax.tree.map(lambda x: np.asarray(x[layer], np.float64), adapters["mlp"]["wo"]["kernel"])
        expected["layers"]["mlp"]["wo"]["kernel"][layer] += scale * wo["a"] @ wo["b"]
    want = np.asarray(model.apply({"params": expected}, tokens))
    # float32 rounding relative to the logits' scale (jax 0.10.2: 1.8e-5 at logits up to 2.9); a wrong scale or a
    # missed product moves them by O(1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-5 * np.abs(want).max())
    assert float(jnp.abs(mlp["wi"]["kernel"]).sum()) > 0  # untargeted kernels exist and are left alone


def test_fresh_adapters_leave_the_model_unchanged_and_only_they_keep_optimizer_state(tiny_model):
    model, boxed, tokens = tiny_model
    config = lora.LoRAConfig(rank=2, targets=TARGETS)
    params = nn.meta.unbox(lora.add_adapters(boxed, config, jax.random.key(1)))
    np.testing.assert_array_equal(lora.MergedApply(model.apply, config.alpha)({"params": params}, tokens),
                                  model.apply({"params": nn.meta.unbox(boxed)}, tokens))
    opt = make_tiny_config().optimizer
    opt.train_only = "lora/*"
    state = optimizers.build(opt, 10).init(params)
    adapter_size = sum(x.size for x in jax.tree.leaves(params[lora.KEY]))
    moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert moments == 2 * adapter_size  # Adam's two moments, of the adapters only
    with pytest.raises(ValueError, match="matches no kernel"):
        lora.add_adapters(boxed, lora.LoRAConfig(rank=2, targets="*nothing*"), jax.random.key(1))


def test_unmerged_adapters_without_dropout_give_the_merged_logits():
    """The "lora" collection read by every dropout site (q, k, v, out, SwiGLU's wi / wg / wo) at rate 0 equals the
    merged kernels: the unmerged branch adds exactly (alpha / r) x A B at each site."""
    config = make_tiny_config()
    config.model.update(vocab_size=16, max_len=8, activation="swiglu")
    model = models.build(config.model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 16, (2, 8)), jnp.int32)
    lora_config = lora.LoRAConfig(rank=2, alpha=3.0, targets=",".join(lora.DROPOUT_SITES))
    params = nn.meta.unbox(lora.add_adapters(jax.jit(model.init)(jax.random.key(0), tokens)["params"], lora_config,
                                             jax.random.key(1)))
    keys = iter(jax.random.split(jax.random.key(2), 32))
    params[lora.KEY] = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), params[lora.KEY])  # B != 0
    assert len(lora.adapters_paths(params[lora.KEY])) == 7
    base = {k: v for k, v in params.items() if k != lora.KEY}
    unmerged = model.apply({"params": base, "lora": lora.unmerged(params, lora_config.alpha, 0.0)}, tokens,
                           rngs={"dropout": jax.random.key(3)})
    merged = lora.MergedApply(model.apply, lora_config.alpha)({"params": params}, tokens)
    np.testing.assert_allclose(unmerged, merged, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(merged - model.apply({"params": base}, tokens)).max()) > 1e-2  # the adapters matter


def test_adapter_dropout_zeroes_or_rescales_each_input_element():
    """With A = B = I on an MLP's output kernel, the unmerged branch returns its dropped-out input exactly: each
    element 0 or h / (1 - p), a fraction ~p dropped, a fresh mask per rng, no dropout without a "dropout" rng."""
    d, rate = 8, 0.25
    mlp = models.layers.Mlp(d_mlp=d, activation="relu", use_bias=True)
    x = jax.random.normal(jax.random.key(0), (4, 32, d))
    params = nn.meta.unbox(mlp.init(jax.random.key(1), x)["params"])
    h = np.maximum(np.einsum("bld,dm->blm", np.float64(x), np.float64(params["wi"]["kernel"]))
                   + np.float64(params["wi"]["bias"]), 0).reshape(-1, d)
    base = h @ np.float64(params["wo"]["kernel"]) + np.float64(params["wo"]["bias"])
    adapters = {"wo": {"kernel": {"a": jnp.eye(d), "b": jnp.eye(d), "rate": jnp.asarray(rate)}}}

    def branch(rngs):
        return np.asarray(mlp.apply({"params": params, "lora": adapters}, x, rngs=rngs), np.float64).reshape(-1, d) - base

    np.testing.assert_allclose(branch({}), h, rtol=1e-4, atol=1e-4)  # evaluation: the whole input
    dropped = branch({"dropout": jax.random.key(2)})
    kept = np.abs(dropped) > 1e-4
    np.testing.assert_allclose(dropped[kept], h[kept] / (1 - rate), rtol=1e-4, atol=1e-4)
    live = np.abs(h) > 1e-3  # ReLU zeros say nothing about the mask
    assert abs(1 - kept[live].mean() - rate) < 0.08, kept[live].mean()
    assert not np.array_equal(kept, np.abs(branch({"dropout": jax.random.key(3)})) > 1e-4)


def test_adapter_dropout_refuses_kernels_that_read_only_merged_adapters(tiny_model):
    _, boxed, _ = tiny_model
    with pytest.raises(ValueError, match="train.lora.dropout=0.1 needs every target among .* 'embed/embedding'"):
        lora.add_adapters(boxed, lora.LoRAConfig(rank=2, dropout=0.1, targets="*attention/query,embed/*"),
                          jax.random.key(1))
    config = make_tiny_config()
    config.model.attention = "mla"
    config.train.lora.update(rank=2, dropout=0.1)
    assert lora.problems(config) == ["train.lora.dropout=0.1 needs model.attention in ['gqa', 'qk_norm'], not 'mla' "
                                     "(its projections read only merged adapters)"]


def test_frozen_parameters_get_no_update():
    params = {"embed": {"embedding": jnp.ones((4, 3))}, "layers": {"w": jnp.ones((3, 3)), "norm": {"scale": jnp.ones(3)}}}
    opt = make_tiny_config().optimizer
    opt.update(freeze="embed/*,*norm*", lr=0.1, warmup_steps=0)
    tx = optimizers.build(opt, 10)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["embed"]["embedding"], params["embed"]["embedding"])
    np.testing.assert_array_equal(new["layers"]["norm"]["scale"], params["layers"]["norm"]["scale"])
    assert float(jnp.abs(new["layers"]["w"] - params["layers"]["w"]).min()) > 0


@pytest.mark.slow  # the default suite keeps the adapter algebra above and test_warm_start's init_from on another mesh
def test_a_lora_fine_tune_changes_only_its_targets_by_rank_r_on_a_mesh(finished_tiny_run, tmp_path):
    config = make_tiny_config(steps=4)
    config.train.update(init_from=str(finished_tiny_run))
    config.train.lora.update(rank=2, alpha=4.0, targets=TARGETS, dropout=0.1)  # trained unmerged, saved merged
    config.optimizer.lr = 1e-2
    config.mesh.update(data=2, fsdp=2, tensor=2)
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    load = lambda d: restore.load_variables(restore.load_config(d), d)[1]["params"]  # noqa: E731  (merged)
    before, after = load(str(finished_tiny_run)), load(str(tmp_path))
    input_axes = {"layers/attention/query": 1, "layers/attention/out": 2, "layers/mlp/wo/kernel": 1}  # per layer
    changed = dict(jax.tree_util.tree_flatten_with_path(after)[0])
    for path, old in jax.tree_util.tree_flatten_with_path(before)[0]:
        name, change = lora._path(path), np.asarray(changed[path]) - np.asarray(old)
        if name not in input_axes:
            np.testing.assert_array_equal(change, 0, err_msg=name)
            continue
        for layer in change:  # W' - W = (alpha / r) A B: rank r at most
            matrix = layer.reshape(int(np.prod(layer.shape[:input_axes[name]])), -1)
            assert 0 < np.linalg.matrix_rank(matrix, tol=1e-6) <= 2, name
