"""Mixture of experts: every dispatch against the dense reference (values and gradients, with and
without drops, on several meshes), the routers' losses and bias update against hand-computed cases,
and expert-parallel training against one shard."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.training import metrics_writer, sharding, trainer, validation
from experiments.configs import moe_lm
from models import moe, moe_dispatch
from tests.conftest import make_tiny_lm_config, slow

E, D, F = 8, 12, 20


def _inputs(tokens, top_k, seed=0, skew=0.0):
    """Random tokens, distinct experts per token (skewed towards expert 0 by `skew`), gates, weights."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(tokens, E)) + skew * (np.arange(E) == 0)
    experts = np.argsort(-scores, axis=1)[:, :top_k].astype(np.int32)
    gates = rng.uniform(0.1, 1.0, size=(tokens, top_k)).astype(np.float32)
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    weights = tuple(jnp.asarray(rng.normal(size=s).astype(np.float32) / np.sqrt(s[1]))
                    for s in ((E, D, F), (E, D, F), (E, F, D)))
    return jnp.asarray(x), jnp.asarray(experts), jnp.asarray(gates), weights


def _kept_numpy(experts, capacity, shards):
    """Which assignments fit: per shard (contiguous tokens), all first choices in token order, then all
    second choices, each taking its expert's next slot while fewer than `capacity` are taken."""
    experts = np.asarray(experts)
    kept = np.zeros(experts.shape, bool)
    per_shard = len(experts) // shards
    for s in range(shards):
        taken = np.zeros(E, int)
        for j in range(experts.shape[1]):
            for t in range(s * per_shard, (s + 1) * per_shard):
                e = experts[t, j]
                kept[t, j] = taken[e] < capacity
                taken[e] += 1
    return kept


def _values_and_grads(fn, x, experts, gates, weights):
    def loss(x, gates, weights):
        y, dropped = fn(x, experts, gates, weights)
        return jnp.sum(jnp.sin(y)), (y, dropped)
    (_, (y, dropped)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, gates, weights)
    return y, dropped, grads


MESHES = {"none": None, "expert8": (1, 1, 1, 8), "data2_fsdp2_expert2": (2, 2, 1, 2)}


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("dispatch", ["capacity", "ragged"])
def test_dispatch_equals_the_dense_reference(dispatch, mesh_name):
    shape = MESHES[mesh_name]
    if dispatch == "ragged" and shape and shape[3] > 1:
        shape = (shape[0] * shape[3], shape[1], 1, 1)  # ragged across expert shards is CPU-unsupported (tested below)
    x, experts, gates, weights = _inputs(tokens=40, top_k=2, seed=1)
    expected = _values_and_grads(moe_dispatch.dense, x, experts, gates, weights)
    fn = functools.partial(moe_dispatch.dispatch, dispatch)
    if shape is None:
        got = _values_and_grads(fn, x, experts, gates, weights)
    else:
        with sharding.use_mesh(sharding.make_mesh(shape, jax.devices())):
            got = jax.jit(functools.partial(_values_and_grads, fn))(x, experts, gates, weights)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    assert int(got[1]) == 0
    chex.assert_trees_all_close(got[2], expected[2], rtol=1e-4, atol=1e-5)


def test_capacity_is_the_ceiling_of_factor_times_assignments_per_expert():
    """Slots per expert and shard = ceil(f T k / E), at least 1; f = 0 gives every token a slot. The drop test below
    reads its capacity from the same function, so the formula itself is checked here, by exact fractions."""
    from fractions import Fraction

    for tokens, top_k, experts, factor in [(64, 2, 8, 0.75), (10, 2, 4, 1.25), (7, 3, 5, 1.0), (1, 1, 8, 0.5),
                                           (96, 1, 6, 2.0)]:
        exact = Fraction(factor) * tokens * top_k / experts
        assert moe_dispatch.capacity_for(tokens, top_k, experts, factor) == max(1, -(-exact.numerator // exact.denominator))
    assert moe_dispatch.capacity_for(48, 2, 8, 0.0) == 48


@pytest.mark.parametrize("shape", [None, (1, 1, 1, 8), (2, 1, 1, 4)])
def test_capacity_overflow_drops_exactly_those_assignments(shape):
    tokens, top_k, factor = 64, 2, 0.75
    x, experts, gates, weights = _inputs(tokens, top_k, seed=2, skew=2.0)  # expert 0 is popular
    shards = 1 if shape is None else shape[0] * shape[1] * shape[3]
    capacity = moe_dispatch.capacity_for(tokens // shards, top_k, E, factor)
    kept = _kept_numpy(experts, capacity, shards)
    assert 0 < (~kept).sum() < kept.size
    expected = _values_and_grads(moe_dispatch.dense, x, experts, gates * jnp.asarray(kept), weights)
    fn = functools.partial(moe_dispatch.capacity, capacity_factor=factor)
    if shape is None:
        got = _values_and_grads(fn, x, experts, gates, weights)
    else:
        with sharding.use_mesh(sharding.make_mesh(shape, jax.devices())):
            got = jax.jit(functools.partial(_values_and_grads, fn))(x, experts, gates, weights)
    assert int(got[1]) == (~kept).sum()
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    grads, expected_grads = got[2], expected[2]
    np.testing.assert_allclose(grads[0], expected_grads[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1] * kept, expected_grads[1] * kept, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(grads[1])[~kept], 0.0)  # a dropped gate does not matter
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads[2], expected_grads[2])


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """jax.lax.ragged_all_to_all's documented semantics from all-gathers (XLA:CPU lacks the collective):
    source s's rows [input_offsets_s[me], + send_sizes_s[me]) land in my output at output_offsets_s[me]."""
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)
    starts, counts, lands = (jax.lax.all_gather(v, axis_name)[:, me] for v in (input_offsets, send_sizes, output_offsets))
    rows = jnp.arange(operand.shape[0])
    for source in range(operands.shape[0]):
        inside = (rows >= starts[source]) & (rows < starts[source] + counts[source])
        target = jnp.where(inside, lands[source] + rows - starts[source], output.shape[0])  # outside: dropped
        output = output.at[target].set(operands[source], mode="drop")
    return output


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 1, 1, 4)])
def test_ragged_expert_parallel_exchange_equals_the_dense_reference(shape):
    x, experts, gates, weights = _inputs(tokens=48, top_k=2, seed=4, skew=1.5)
    expected = _values_and_grads(moe_dispatch.dense, x, experts, gates, weights)
    fn = functools.partial(moe_dispatch.ragged, exchange=emulated_ragged_all_to_all)
    with sharding.use_mesh(sharding.make_mesh(shape, jax.devices())):
        got = jax.jit(functools.partial(_values_and_grads, fn))(x, experts, gates, weights)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    assert int(got[1]) == 0
    chex.assert_trees_all_close(got[2], expected[2], rtol=1e-4, atol=1e-5)


def test_bucket_positions_are_choice_major():
    experts = jnp.asarray([[0, 1], [1, 0], [0, 2]])
    np.testing.assert_array_equal(moe_dispatch.bucket_positions(experts, 3), [[0, 1], [0, 2], [1, 0]])


def test_losses_and_bias_update_match_hand_computed_cases():
    np.testing.assert_allclose(moe.bias_update(jnp.zeros(4), jnp.asarray([3.0, 1.0, 2.0, 2.0]), 0.1),
                               [-0.1, 0.1, 0.0, 0.0])
    experts = jnp.asarray([[0], [0], [1]])
    probs = jnp.asarray([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1]])
    # f = (2/3, 1/3, 0), P = (1.3, 1.3, 0.4) / 3: 0.01 * 3 * (2/3 * 1.3/3 + 1/3 * 1.3/3)
    np.testing.assert_allclose(moe.switch_aux_loss(experts, probs, 0.01), 0.01 * 3 * (1.3 / 3), rtol=1e-6)
    scores = jnp.asarray([[[0.5, 0.5], [0.2, 0.6]]])
    # f = counts * E / (k L) = (2, 0); P = mean(s / sum s) = (0.375, 0.625): alpha * 2 * 0.375
    np.testing.assert_allclose(moe.sequence_balance_loss(jnp.asarray([[[0], [0]]]), scores, 1e-4), 0.75e-4, rtol=1e-6)
    np.testing.assert_allclose(moe.max_violation(jnp.asarray([3.0, 1.0, 2.0, 2.0])), 0.5)
    # the bias picks expert 2 over expert 1, but the gates come from the unbiased affinities
    logits = jnp.asarray([[2.0, 1.0, 0.0]])
    experts, gates, scores = moe.route_sigmoid(logits, jnp.asarray([0.0, 0.0, 1.5]), top_k=2)
    assert set(np.asarray(experts)[0].tolist()) == {0, 2}
    s = jax.nn.sigmoid(jnp.asarray([2.0, 0.0]))
    np.testing.assert_allclose(sorted(np.asarray(gates)[0]), sorted(np.asarray(s / s.sum())), rtol=1e-6)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def numpy_moe_layer(x, p):
    """Float64 transcription of a sigmoid-routed MoE FFN at its defaults, bias zero: s = sigmoid(x R), the top-k s
    by token, g = s_chosen / sum s_chosen, y = sum_k g_k SwiGLU_{e_k}(x) + the shared SwiGLU(x)."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    tokens = f64(x).reshape(-1, x.shape[-1])
    s = 1.0 / (1.0 + np.exp(-(tokens @ f64(p["router"]))))
    y = np.zeros_like(tokens)
    for t, row in enumerate(tokens):
        chosen = np.argsort(-s[t])[:moe.MoEOptions().top_k]
        for e in chosen:
            hidden = _silu(row @ f64(p["w_gate"][e])) * (row @ f64(p["w_in"][e]))
            y[t] += s[t, e] / s[t, chosen].sum() * (hidden @ f64(p["w_out"][e]))
    shared = p["shared"]
    hidden = _silu(tokens @ f64(shared["wg"]["kernel"])) * (tokens @ f64(shared["wi"]["kernel"]))
    return (y + hidden @ f64(shared["wo"]["kernel"])).reshape(x.shape)


def test_the_default_moe_layer_against_a_float64_loop():
    """MoEOptions as they come (sigmoid router, top 2 of 8, one shared expert, capacity dispatch with room for
    every token): the gates are the chosen affinities normalised to sum 1, times route_scale = 1."""
    layer = moe.MoEFfn(D, F, moe.MoEOptions())
    x = jax.random.normal(jax.random.key(0), (2, 7, D))
    variables = layer.init(jax.random.key(1), x)
    params = jax.tree.map(lambda w: 3.0 * w if w.ndim == 2 and w.shape[-1] == E else w,
                          nn.meta.unbox(variables["params"]))  # a sharper router: distinct top-k choices
    got = layer.apply({"params": params, "router_bias": variables["router_bias"]}, x)
    np.testing.assert_allclose(np.asarray(got), numpy_moe_layer(np.asarray(x), params), rtol=2e-5, atol=2e-6)


def test_training_forward_moves_the_router_bias_against_the_load():
    layer = moe.MoEFfn(D, F, moe.MoEOptions(num_experts=E, top_k=2, bias_update_rate=0.01, dispatch="dense"))
    x = jax.random.normal(jax.random.key(0), (2, 16, D))
    variables = layer.init(jax.random.key(1), x)
    train_out, written = layer.apply({"params": variables["params"], "router_bias": variables["router_bias"]}, x,
                                     mutable=["router_bias", "metrics", "losses"])
    load = np.asarray(written["metrics"]["load"][0])
    np.testing.assert_allclose(written["router_bias"]["bias"], -0.01 * np.sign(load - load.mean()), atol=1e-7)
    assert load.sum() == 2 * 16 * 2
    np.testing.assert_allclose(written["metrics"]["max_violation"][0], (load.max() - load.mean()) / load.mean(),
                               rtol=1e-6)
    assert set(written["losses"]) == {"balance_loss"}
    bias = np.asarray(written["router_bias"]["bias"])  # the metrics read the updated bias
    assert (written["metrics"]["bias_min"][0], written["metrics"]["bias_max"][0]) == (bias.min(), bias.max())
    assert written["metrics"]["dropped_fraction"][0] == 0.0  # dense dispatch drops nothing
    eval_out = layer.apply({"params": variables["params"], "router_bias": variables["router_bias"]}, x)
    # Evaluation routes with the stored bias and writes nothing (flax refuses a write to an immutable
    # collection); training routes with the same bias and updates it only afterwards: equal outputs.
    np.testing.assert_allclose(eval_out, train_out, rtol=1e-6)
    moved = layer.apply({"params": variables["params"], "router_bias": written["router_bias"]}, x)
    assert not np.allclose(moved, eval_out)  # and the bias does route: the updated one changes the output


def test_dropped_fraction_counts_the_assignments_over_each_experts_capacity():
    """Capacity dispatch with factor 0.5: expert e keeps C = ceil(0.5 T k / E) of its load_e assignments, so the
    sown fraction is sum_e max(load_e - C, 0) / (T k)."""
    options = moe.MoEOptions(num_experts=E, top_k=2, dispatch="capacity", capacity_factor=0.5)
    layer = moe.MoEFfn(D, F, options)
    x = jax.random.normal(jax.random.key(3), (2, 9, D))
    variables = layer.init(jax.random.key(4), x)
    _, written = layer.apply(variables, x, mutable=["metrics"])
    load = np.asarray(written["metrics"]["load"][0])
    slots = int(np.ceil(0.5 * 18 * 2 / E))
    expected = np.maximum(load - slots, 0).sum() / (18 * 2)
    assert expected > 0
    np.testing.assert_allclose(written["metrics"]["dropped_fraction"][0], expected, rtol=1e-6)


def _tiny_moe_config(steps, router="sigmoid"):
    config = make_tiny_lm_config(steps)
    config.model = moe_lm.get_config("aux" if router == "softmax" else None).model
    config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_mlp=64, d_expert=16,
                        moe_every=2, vocab_size=0, max_len=0)
    config.train.update(log_every=1)
    return config


@pytest.mark.parametrize("router", [slow("sigmoid"), slow("softmax")])  # by default: the dispatch tests' meshes
def test_expert_parallel_training_gives_the_losses_of_one_shard(router, tmp_path):
    losses = {}
    for name, mesh in (("expert8", dict(data=1, expert=8)), ("data8", dict(data=8, expert=1))):
        config = _tiny_moe_config(steps=3, router=router)
        config.mesh.update(**mesh)
        trainer.train_and_evaluate(config, str(tmp_path / name), verbose=False)
        losses[name] = [e for e in metrics_writer.read(str(tmp_path / name)) if e["split"] == "train"]
    for a, b in zip(losses["expert8"], losses["data8"]):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
        assert a["layers/block_1/moe/dropped_fraction/0"] == 0.0
        np.testing.assert_allclose(a["layers/block_1/moe/max_violation/0"], b["layers/block_1/moe/max_violation/0"],
                                   rtol=1e-5)
    if router == "sigmoid":
        assert losses["expert8"][-1]["layers/block_1/moe/bias_max/0"] > 0 > losses["expert8"][-1][
            "layers/block_1/moe/bias_min/0"]
    else:
        assert losses["expert8"][-1]["aux_loss"] > 0


def test_ragged_dispatch_across_expert_shards_on_cpu_fails_before_compiling():
    config = _tiny_moe_config(steps=1)
    config.model.dispatch = "ragged"
    config.mesh.update(data=1, expert=8)
    with pytest.raises(validation.ConfigError, match="ragged_all_to_all"):
        validation.validate(config, num_devices=8)
    config.mesh.update(data=8, expert=1)
    validation.validate(config, num_devices=8)


def numpy_group_limited_routing(logits, bias, top_k, n_groups, topk_groups, route_scale, normalise=True):
    """DeepSeek-V3's routing, token by token in float64 loops (`normalise`: its norm_topk_prob)."""
    experts_out, gates_out = [], []
    per_group = logits.shape[1] // n_groups
    for row in logits.astype(np.float64):
        s = 1.0 / (1.0 + np.exp(-row))
        biased = s + bias
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group])[-2:]) for g in range(n_groups)]
        groups = sorted(range(n_groups), key=lambda g: -group_score[g])[:topk_groups]
        eligible = [e for e in range(len(row)) if e // per_group in groups]
        chosen = sorted(eligible, key=lambda e: -biased[e])[:top_k]
        experts_out.append(chosen)
        total = sum(s[c] for c in chosen) if normalise else 1.0
        gates_out.append([route_scale * s[e] / total for e in chosen])
    return np.asarray(experts_out), np.asarray(gates_out)


@pytest.mark.parametrize("n_groups,topk_groups,top_k,normalise", [(4, 2, 3, True), (2, 1, 2, True), (4, 4, 2, False),
                                                                   (1, 1, 2, True)])
def test_group_limited_routing_against_a_numpy_loop(n_groups, topk_groups, top_k, normalise):
    """Random logits and a non-zero bias over 8 experts: the same experts, and gates from the unbiased
    affinities (normalised over the chosen, or not) times route_scale."""
    rng = np.random.default_rng(n_groups * 10 + topk_groups)
    logits = rng.normal(size=(37, E)).astype(np.float32)
    bias = rng.normal(scale=0.3, size=E).astype(np.float32)
    experts, gates, _ = moe.route_sigmoid(jnp.asarray(logits), jnp.asarray(bias), top_k, n_groups, topk_groups, 2.5,
                                          normalise)
    want_experts, want_gates = numpy_group_limited_routing(logits, bias.astype(np.float64), top_k, n_groups,
                                                           topk_groups, 2.5, normalise)
    order = np.argsort(np.asarray(experts), axis=1)
    want_order = np.argsort(want_experts, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(experts), order, 1),
                                  np.take_along_axis(want_experts, want_order, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(gates), order, 1),
                               np.take_along_axis(want_gates, want_order, 1), rtol=1e-5)
    if topk_groups < n_groups:  # the restriction binds: some token's plain top-k leaves its eligible groups
        plain = np.argsort(-(1 / (1 + np.exp(-logits)) + bias), axis=1)[:, :top_k]
        assert not np.array_equal(np.sort(plain, 1), np.sort(want_experts, 1))


@pytest.mark.slow  # by default the transformers parity test covers the dense first blocks' full pass
def test_first_k_dense_blocks_run_before_the_moe_stack_and_decode():
    """num_layers=3, first_k_dense_replace=1: a dense stack of 1 (width d_mlp), then 2 MoE blocks; cached
    decoding equals the full pass."""
    from models import moe_transformer
    cfg = moe_transformer.MoEConfig(vocab_size=19, max_len=12, d_model=16, num_layers=3, num_heads=2, d_mlp=24,
                                    d_expert=8, num_experts=4, top_k=2, n_groups=2, topk_groups=1, route_scale=2.5,
                                    first_k_dense_replace=1, dispatch="dense")
    model = moe_transformer.MoETransformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 19)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))
    params = variables["params"]
    assert params["dense_layers"]["mlp"]["wi"]["kernel"].shape == (1, 16, 24)
    assert params["layers"]["block_0"]["moe"]["w_in"].shape == (2, 4, 16, 8)
    full = model.apply(variables, tokens)
    decode = jax.jit(lambda t, c, s: model.apply(variables, t, c, s, method=model.decode))  # start traced: 2 compiles
    logits, cache = decode(tokens[:, :5], model.init_cache(2, 12), 0)
    pieces = [logits]
    for t in range(5, 9):
        logits, cache = decode(tokens[:, t:t + 1], cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("override,message", [
    (dict(n_groups=3), "model.n_groups=3 must divide model.num_experts=8 into groups of >= 2"),
    (dict(n_groups=4, topk_groups=1, top_k=3), "leave at least model.top_k=3 eligible experts"),
    (dict(router="softmax", route_scale=2.5), "need model.router='sigmoid'"),
    (dict(first_k_dense_replace=2), "minus model.first_k_dense_replace=2 must be a positive multiple"),
])
def test_routing_restrictions_refuse_bad_values(override, message):
    from models import moe_transformer
    cfg = moe_transformer.MoEConfig(num_experts=8, num_layers=2, **override)
    assert any(message in p for p in moe_transformer.validate(cfg)), moe_transformer.validate(cfg)


@pytest.mark.parametrize("override", [dict(n_groups=4, topk_groups=1, top_k=2), dict(n_groups=2, topk_groups=2, top_k=8),
                                      dict(n_groups=4, topk_groups=4, top_k=8)])
def test_routing_restrictions_accept_their_boundaries(override):
    """top_k equal to the eligible experts (topk_groups x experts per group) is allowed."""
    from models import moe_transformer
    assert moe_transformer.validate(moe_transformer.MoEConfig(num_experts=8, num_layers=2, **override)) == []


@pytest.mark.parametrize("every", [1, 2, 3])
def test_the_moe_ffn_sits_in_the_last_block_of_each_period(every):
    """model.moe_every = k: each scanned period is k - 1 dense blocks then one MoE block (shapes only, nothing run)."""
    import models

    config = moe_lm.get_config(None).model
    config.update(d_model=32, num_layers=every, num_heads=4, num_kv_heads=2, d_mlp=64, d_expert=16, moe_every=every,
                  vocab_size=11, max_len=8)
    shapes = jax.eval_shape(models.build(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    period = nn.meta.unbox(shapes["params"])["layers"]
    assert {name: "moe" in block for name, block in period.items()} == {
        f"block_{i}": i == every - 1 for i in range(every)}
    assert all(("mlp" in block) != ("moe" in block) for block in period.values())
