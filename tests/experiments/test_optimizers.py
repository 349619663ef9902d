"""The optimizer table (experiments/optim/optimizers.py): every optimizer against a float64 NumPy loop of its
equations (optax's own for Adafactor's wiring), Grokfast and clipping, the weight-decay groups on a real
model's parameters, every schedule against hand-computed values, and validation of the key groups."""

import functools

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.optim import optimizers
from experiments.training import validation
from experiments.configs import base
from tests.conftest import make_tiny_config


def _updates(tx, grads_seq):
    params = {"w": jnp.ones(4)}
    state, out = tx.init(params), []
    for g in grads_seq:
        update, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        out.append(np.asarray(update["w"]))
    return out


def test_grokfast_and_adamw_keys_reach_optax():
    grads = np.random.default_rng(0).normal(size=(4, 4))
    opt = base.get_config().optimizer
    opt.update(lr=0.1, warmup_steps=0)
    opt.adamw.update(b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.5)
    adamw = optax.adamw(optimizers.learning_rate_schedule(opt, 10), b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.5)
    chex.assert_trees_all_close(_updates(optimizers.build(opt, 10), grads), _updates(adamw, grads), rtol=1e-6)

    opt.grokfast.update(alpha=0.7, lamb=3.0)  # AdamW now sees g + 3 ema(g), the ema started at g_0
    amplified, ema = [], None
    for g in grads:
        ema = g if ema is None else 0.7 * ema + 0.3 * g
        amplified.append(g + 3.0 * ema)
    chex.assert_trees_all_close(_updates(optimizers.build(opt, 10), grads), _updates(adamw, amplified), rtol=1e-5)

    opt.grokfast.lamb, opt.grad_clip = 0.0, 0.5  # clipped to global norm 0.5 before AdamW
    clipped = [g * min(1.0, 0.5 / np.linalg.norm(g)) for g in grads]
    chex.assert_trees_all_close(_updates(optimizers.build(opt, 10), grads), _updates(adamw, clipped), rtol=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("name", "rmsprop", "optimizer.name='rmsprop' is not one of ['adamw', 'adam', 'sgd', 'lion', 'adafactor',"),
    ("sgd.momentum", 1.0, "optimizer.sgd.momentum=1.0 must lie in [0, 1)"),
    ("schedule", "step", "optimizer.schedule='step' is not one of"),
    ("decay", "norms", "optimizer.decay='norms' is not one of ['all', 'weights', 'hidden_weights']"),
    ("adamw.b1", 1.0, "optimizer.adamw.b1=1.0 must lie in [0, 1)"),
    ("grokfast.alpha", -0.1, "optimizer.grokfast.alpha=-0.1 must lie in [0, 1)"),
    ("lr", 0.0, "optimizer.lr=0.0 must be > 0"),
    ("lr_multipliers", "embed/*:0.1", "optimizer.lr_multipliers entry 'embed/*:0.1' is not PATTERN=M with M >= 0"),
])
def test_bad_optimizer_keys_are_one_line(key, value, message):
    config = make_tiny_config()
    group, _, name = key.rpartition(".")
    (config.optimizer[group] if group else config.optimizer)[name] = value
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config, 8)
    assert message in str(info.value) and "\n" not in str(info.value)


def _random_problem(rng, rows: int, cols: int, steps: int):
    """(initial parameters {"w": [rows, cols], "b": [cols]}, `steps` random gradients of the same shapes)."""
    params0 = {"w": rng.normal(size=(rows, cols)), "b": rng.normal(size=(cols,))}
    return params0, [{k: rng.normal(size=v.shape) for k, v in params0.items()} for _ in range(steps)]


def _tiny_lm_and_batch(rng):
    """A 1-layer transformer (vocabulary 11, width 8) and a random next-token batch of 4 x 5."""
    from models import transformer
    model = transformer.Transformer(transformer.TransformerConfig(vocab_size=11, max_len=5, d_model=8, num_heads=2,
                                                                  d_mlp=16))
    tokens = jnp.asarray(rng.integers(0, 11, size=(4, 5)), jnp.int32)
    return model, {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.ones((4, 5))}


def _trajectory(opt_or_tx, grads, params0, steps=10):
    """Parameters after each update of `optimizers.build(opt)` (or of an optax transformation) fed `grads[t]`."""
    tx = opt_or_tx if isinstance(opt_or_tx, optax.GradientTransformation) else optimizers.build(opt_or_tx, steps)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params0.items()}
    state, out = tx.init(params), []
    for t in range(len(grads)):
        updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in grads[t].items()}, state, params)
        params = optax.apply_updates(params, updates)
        out.append({k: np.asarray(v) for k, v in params.items()})
    return out


def _numpy_reference(name, keys, lr, grads, params0):
    """The optimizer's update equations in float64 (experiments/optim/optimizers.py's docstring)."""
    p = {k: np.asarray(v, np.float64) for k, v in params0.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    out = []
    for t, g_t in enumerate(grads, start=1):
        for k in p:
            g = np.asarray(g_t[k], np.float64)
            if name == "adam":
                g = g + keys["weight_decay"] * p[k]
                m[k] = keys["b1"] * m[k] + (1 - keys["b1"]) * g
                v2[k] = keys["b2"] * v2[k] + (1 - keys["b2"]) * g * g
                m_hat, v_hat = m[k] / (1 - keys["b1"] ** t), v2[k] / (1 - keys["b2"] ** t)
                p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + keys["eps"])
            elif name == "sgd":
                g = g + keys["weight_decay"] * p[k]
                m[k] = g + keys["momentum"] * m[k]
                p[k] = p[k] - lr * (g + keys["momentum"] * m[k] if keys["nesterov"] else m[k])
            elif name == "lion":
                c = keys["b1"] * m[k] + (1 - keys["b1"]) * g
                p[k] = p[k] - lr * (np.sign(c) + keys["weight_decay"] * p[k])
                m[k] = keys["b2"] * m[k] + (1 - keys["b2"]) * g
        out.append({k: v.copy() for k, v in p.items()})
    return out


@pytest.mark.parametrize("name, keys", [
    ("adam", dict(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)),
    ("sgd", dict(momentum=0.9, nesterov=False, weight_decay=0.05)),
    ("sgd", dict(momentum=0.8, nesterov=True, weight_decay=0.0)),
    ("lion", dict(b1=0.9, b2=0.99, weight_decay=0.3)),
])
def test_each_optimizer_follows_its_equations(name, keys):
    rng = np.random.default_rng(1)
    params0, grads = _random_problem(rng, 3, 5, 6)
    opt = base.get_config().optimizer
    opt.update(name=name, lr=0.05, warmup_steps=0)
    opt[name].update(**keys)
    got, expected = _trajectory(opt, grads, params0), _numpy_reference(name, keys, 0.05, grads, params0)
    for a, b in zip(got, expected):
        chex.assert_trees_all_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_adafactor_keys_reach_optax_and_its_decay_is_times_the_lr():
    """At a constant lr, weight_decay wd equals optax.adafactor's per-step weight_decay_rate lr * wd."""
    rng = np.random.default_rng(2)
    params0, grads = _random_problem(rng, 4, 6, 4)
    opt = base.get_config().optimizer
    opt.update(name="adafactor", lr=0.01, warmup_steps=0)
    opt.adafactor.update(decay_rate=0.7, clipping_threshold=0.5, min_dim_size_to_factor=2, momentum=0.5, weight_decay=3.0)
    expected = _trajectory(optax.adafactor(0.01, min_dim_size_to_factor=2, decay_rate=0.7, clipping_threshold=0.5,
                                           momentum=0.5, weight_decay_rate=0.01 * 3.0), grads, params0)
    for a, b in zip(_trajectory(opt, grads, params0), expected):
        chex.assert_trees_all_close(a, b, rtol=1e-6)


def test_weight_decay_groups_on_a_real_model():
    import flax.linen as nn
    import jax
    from models import transformer
    cfg = transformer.TransformerConfig(vocab_size=16, max_len=4, d_model=8, num_heads=2, d_mlp=16, positional="learned",
                                        mlp_bias=True, norm="layernorm", tie_embeddings=False)
    params = nn.meta.unbox(jax.eval_shape(transformer.Transformer(cfg).init, jax.random.key(0),
                                          jnp.zeros((1, 4), jnp.int32)))["params"]
    decayed = {group: {jax.tree_util.keystr(p) for p, d in jax.tree_util.tree_flatten_with_path(
        optimizers.decay_mask(group)(params))[0] if d} for group in optimizers.DECAY_GROUPS}
    every = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    matrices = {"['layers']['attention']['query']", "['layers']['attention']['key']", "['layers']['attention']['value']",
                "['layers']['attention']['out']", "['layers']['mlp']['wi']['kernel']", "['layers']['mlp']['wo']['kernel']"}
    embeddings = {"['embed']['embedding']", "['position_embedding']", "['unembed']['kernel']"}
    assert decayed["all"] == every
    assert decayed["weights"] == matrices | embeddings
    assert decayed["hidden_weights"] == matrices

    # AdamW with zero gradients: only the decayed parameters move, by -lr * wd * p.
    opt = base.get_config().optimizer
    opt.update(lr=0.1, warmup_steps=0, decay="hidden_weights")
    opt.adamw.weight_decay = 0.5
    ones = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), params)
    tx = optimizers.build(opt, 10)
    updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(ones)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        np.testing.assert_allclose(u, -0.05 if jax.tree_util.keystr(path) in matrices else 0.0, atol=1e-7)


@pytest.mark.parametrize("schedule, expected", [  # lr 1, 4 warmup steps, 24 steps, min_lr_ratio 0.1
    ("constant", {0: 0.0, 2: 0.5, 4: 1.0, 23: 1.0}),
    ("linear", {2: 0.5, 4: 1.0, 14: 0.55, 24: 0.1}),
    ("cosine", {2: 0.5, 4: 1.0, 14: 0.55, 24: 0.1}),
    ("inverse_sqrt", {2: 0.5, 4: 1.0, 16: 0.5, 25: 0.4}),
    ("wsd", {2: 0.5, 4: 1.0, 19: 1.0, 21: 0.64, 24: 0.1}),  # decays over the last round(0.2 * 24) = 5 steps
])
def test_schedules_against_hand_computed_values(schedule, expected):
    opt = base.get_config().optimizer
    opt.update(lr=1.0, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2)
    lr = optimizers.learning_rate_schedule(opt, 24)
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-5, atol=1e-6, err_msg=f"{schedule} at {step}")


@pytest.mark.slow
def test_schedule_free_adamw_is_optax_and_the_trainer_evaluates_the_average():
    import flax.linen as nn
    import jax
    from experiments.training import train_state, trainer
    rng = np.random.default_rng(3)
    params0, grads = _random_problem(rng, 3, 4, 5)
    opt = base.get_config().optimizer
    opt.update(name="schedule_free_adamw", lr=0.05, warmup_steps=2)
    opt.schedule_free_adamw.update(b1=0.8, b2=0.99, weight_decay=0.1)
    reference = optax.contrib.schedule_free_adamw(0.05, warmup_steps=2, b1=0.8, b2=0.99, weight_decay=0.1)
    for a, b in zip(_trajectory(opt, grads, params0), _trajectory(reference, grads, params0)):
        chex.assert_trees_all_close(a, b, rtol=1e-6)

    # The trainer's evaluation runs at x = (y - (1 - b1) z) / b1, not at the stored (gradient) point y.
    (model, batch), tx = _tiny_lm_and_batch(rng), optimizers.build(opt, 10)
    tokens = batch["inputs"]
    state = nn.meta.unbox(train_state.init_state(model, tx, tokens, jax.random.PRNGKey(0)))
    step = jax.jit(lambda s, b: trainer.train_step(s, b, schedule=optimizers.learning_rate_schedule(opt, 10)))
    for _ in range(3):
        state, _ = step(state, batch)
    z = state.opt_state.z
    x = jax.tree.map(lambda y, z: (y - 0.2 * z) / 0.8, state.params, z)
    at = lambda p: float(trainer.losses.masked_mean(model.apply({"params": p}, tokens), batch["targets"],  # noqa: E731
                                                    batch["loss_mask"])[0])
    evaluated = jax.jit(trainer._eval_step)(state, batch)
    np.testing.assert_allclose(float(evaluated["loss"]) / float(evaluated["count"]), at(x), rtol=1e-5)
    assert abs(at(x) - at(state.params)) > 1e-4


def _schedule_free_reference(lrs, grads, params0, b1=0.9, b2=0.999, eps=1e-8, decay=0.0, power=2.0):
    """Defazio et al.'s AdamWScheduleFree step (facebookresearch/schedule_free, no warmup) in float64, one parameter
    group per key with its own lr: -> [(y, x) after each step]."""
    y = {k: np.asarray(v, np.float64) for k, v in params0.items()}
    z, v = {k: w.copy() for k, w in y.items()}, {k: np.zeros_like(w) for k, w in y.items()}
    weight_sum, out = dict.fromkeys(y, 0.0), []
    for k, g in enumerate(grads):
        for name, lr in lrs.items():
            weight = lr ** power  # lr_max ** weight_lr_power, r = 0
            weight_sum[name] += weight
            c = weight / weight_sum[name] if weight_sum[name] else 0.0
            v[name] = b2 * v[name] + (1 - b2) * g[name] ** 2
            normalised = g[name] / (np.sqrt(v[name] / (1 - b2 ** (k + 1))) + eps) + decay * y[name]
            y[name] = (1 - c) * y[name] + c * z[name] + lr * (b1 * (1 - c) - 1) * normalised
            z[name] = z[name] - lr * normalised
        out.append(({n: w.copy() for n, w in y.items()}, {n: (y[n] - (1 - b1) * z[n]) / b1 for n in y}))
    return out


@pytest.mark.parametrize("multiplier", [0.25, 0.0])
def test_schedule_free_with_lr_multipliers_is_the_reference_with_per_group_rates(multiplier):
    """The multiplier scales the step of z inside the wrapper: the evaluated average x of the group moves as
    schedule-free at lr x M (with M = 0, neither y nor x moves), not only its y."""
    rng = np.random.default_rng(7)
    params0, grads = _random_problem(rng, 3, 4, 6)
    opt = base.get_config().optimizer
    opt.update(name="schedule_free_adamw", lr=0.05, warmup_steps=0, lr_multipliers=f"w={multiplier}")
    opt.schedule_free_adamw.update(b1=0.8, b2=0.99, weight_decay=0.1)
    tx = optimizers.build(opt, 10)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params0.items()}
    state = tx.init(params)
    want = _schedule_free_reference({"w": 0.05 * multiplier, "b": 0.05}, grads, params0, b1=0.8, b2=0.99,
                                    decay=0.1)
    for g, (y, x) in zip(grads, want):
        updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(params, y, rtol=2e-5, atol=1e-6)
        chex.assert_trees_all_close(optimizers.evaluation_params(state, params), x, rtol=2e-5, atol=1e-6)
    if multiplier == 0:
        chex.assert_trees_all_close(optimizers.evaluation_params(state, params)["w"], params0["w"], rtol=1e-6)


def test_schedule_free_needs_the_constant_schedule():
    config = make_tiny_config()
    config.optimizer.update(name="schedule_free_adamw", schedule="cosine")
    with pytest.raises(validation.ConfigError, match="optimizer.schedule='cosine' with optimizer.name='schedule_free"):
        validation.validate(config, 8)


def test_muon_dimensions_from_logical_axis_names():
    dims = optimizers.muon_dimensions
    assert dims(("layers", "embed", "heads", "head_dim")) == (( 1,), (2, 3))  # query: embed -> heads x head_dim
    assert dims(("layers", "heads", "head_dim", "embed")) == ((1, 2), (3,))  # out: heads x head_dim -> embed
    assert dims(("layers", "expert", "embed", "mlp")) == ((2,), (3,))  # every expert its own matrix
    assert dims(("layers", "embed", None)) == ((1,), (2,))  # Mamba-2's in_proj
    assert dims(("embed", "mlp")) == ((0,), (1,))
    for adamw in [("vocab", "embed"), ("embed", "vocab"), ("layers", "embed"), ("embed",), ("layers", None, None)]:
        assert dims(adamw) is None, adamw
    assert dims(("embed", None), ("router_2", "kernel")) is None  # MoR's expert-choice router of recursion 2
    assert dims(("embed", None), ("routers", "kernel")) == ((0,), (1,))  # a name, not a prefix


MUON_MATRICES = {"query", "key", "value", "out", "wi", "wg", "wo", "in_proj", "out_proj", "w_gate", "w_in", "w_out",
                 "kv_down", "key_rope"}  # the hidden linear maps of the families below (by parameter or module name)


@pytest.mark.parametrize("family", ["hybrid_every_layer_kind", "mod_predictor", "mor_token_router_shared_kv",
                                    "transformer_learned_short_conv"])
def test_muon_takes_the_hidden_linear_maps_and_leaves_routers_gates_positions_and_convs_to_adamw(family):
    """Over real models' parameters: Muon gets exactly the hidden matrices; routers (MoE, MoD, MoR), MoD's predictor,
    the linear-attention gate, learned positions, short-conv filters, embeddings and vectors go to AdamW."""
    import jax
    import ml_collections
    import models
    from tests.models.test_packing import FAMILIES, TINY
    name, extra = FAMILIES[family]
    config = ml_collections.ConfigDict({**TINY, **extra, "name": name})
    names = models.axis_names(models.build(config), models.example_inputs(config))
    muon, adamw = set(), set()
    for path, axes in jax.tree_util.tree_leaves_with_path(names, is_leaf=lambda x: isinstance(x, tuple)):
        keys = [str(getattr(k, "key", k)) for k in path]
        dims = optimizers._muon_dimensions_at(path, axes)
        owner = keys[-2] if keys[-1] == "kernel" else keys[-1]
        (muon if dims is not None else adamw).add(owner)
        assert (dims is not None) == (owner in MUON_MATRICES and len(axes) >= 2), (keys, axes)
    routing = {"hybrid_every_layer_kind": {"router", "gate", "conv_kernel"}, "mod_predictor": {"router", "predictor_in"},
               "mor_token_router_shared_kv": {"depth_router"},
               "transformer_learned_short_conv": {"position_embedding", "short_conv"}}[family]
    assert routing <= adamw and {"query", "wi"} <= muon, (muon, adamw)


def _newton_schulz(g, steps=5, coeffs=(3.4445, -4.775, 2.0315)):
    """Muon's orthogonalisation in float64: X <- a X + (b A + c A^2) X, A = X X^T, X_0 = G / ||G||_F."""
    a, b, c = coeffs
    x = g / (np.linalg.norm(g) + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    x = x.T if transposed else x
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


def test_muon_orthogonalises_each_stacked_matrix_and_adamw_steps_the_rest():
    rng = np.random.default_rng(4)
    params = {"wi": jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32),
              "embedding": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)}
    names = {"wi": ("layers", "embed", "mlp"), "embedding": ("vocab", "embed")}
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    opt = base.get_config().optimizer
    opt.update(name="muon", lr=0.02, warmup_steps=0)
    opt.muon.update(beta=0.9, nesterov=False, adam_lr_ratio=0.5)
    tx = optimizers.build(opt, 10, axis_names=names)
    updates, _ = tx.update(grads, tx.init(params), params)
    # First step, no Nesterov: momentum = g, so each layer's update is -lr * scale * NS(g_layer), optax's scale
    # sqrt(max(1, fan_out / fan_in)) = 1 here (4 <= 6).
    for layer in range(2):
        expected = -0.02 * _newton_schulz(np.asarray(grads["wi"][layer], np.float64))
        np.testing.assert_allclose(updates["wi"][layer], expected, rtol=2e-3, atol=2e-5)
    # The embedding is AdamW's: the first step is -lr_adam * sign(g) (bias-corrected m / sqrt(v)).
    np.testing.assert_allclose(updates["embedding"], -0.01 * np.sign(grads["embedding"]), rtol=1e-3)


@pytest.mark.slow
def test_ema_of_the_weights_follows_its_recursion_and_is_evaluated_beside_them():
    import flax.linen as nn
    import jax
    from experiments.training import train_state, trainer
    model, batch = _tiny_lm_and_batch(np.random.default_rng(5))
    tokens, opt = batch["inputs"], base.get_config().optimizer
    opt.update(lr=0.05, warmup_steps=0)
    tx = optimizers.build(opt, 10)
    state = nn.meta.unbox(train_state.init_state(model, tx, tokens, jax.random.PRNGKey(0), ema=True))
    step = jax.jit(lambda s, b: trainer.train_step(s, b, schedule=optimizers.learning_rate_schedule(opt, 10),
                                                   ema_decay=0.7))
    ema = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
    for _ in range(3):
        state, _ = step(state, batch)
        ema = jax.tree.map(lambda e, p: 0.7 * e + 0.3 * np.asarray(p, np.float64), ema, state.params)
    chex.assert_trees_all_close(state.ema_params, ema, rtol=1e-5, atol=1e-7)
    sums = jax.jit(functools.partial(trainer._eval_step, ema=True))(state, batch)
    logits = model.apply({"params": state.ema_params}, tokens)
    np.testing.assert_allclose(float(sums["loss"]) / float(sums["count"]),
                               float(trainer.losses.masked_mean(logits, batch["targets"], batch["loss_mask"])[0]),
                               rtol=1e-5)


@pytest.mark.parametrize("multiplier", [0.25, 2.0])
def test_lr_multipliers_scale_each_group_as_its_own_learning_rate(multiplier):
    """AdamW with decoupled decay and `w=M`: w steps exactly as AdamW at M times the lr, b as before."""
    rng = np.random.default_rng(6)
    params0, grads = _random_problem(rng, 3, 4, 5)
    opt = base.get_config().optimizer
    opt.update(lr=0.04, warmup_steps=0, lr_multipliers=f"w={multiplier}, nothing/*=3")
    opt.adamw.update(weight_decay=0.1)
    got = _trajectory(opt, grads, params0)
    for group, lr in (("w", 0.04 * multiplier), ("b", 0.04)):
        alone = _trajectory(optax.adamw(lr, weight_decay=0.1), [{group: g[group]} for g in grads],
                            {group: params0[group]})
        for a, b in zip(got, alone):
            np.testing.assert_allclose(a[group], b[group], rtol=1e-6)
