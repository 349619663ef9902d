"""The training objective's extra terms (experiments/losses.Objective): label smoothing, z-loss and
distillation against float64 NumPy, their wiring into the trainer's step against a hand-written objective,
and distillation from a finished run through the trainer on the mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import data
from data.config_fields import ConfigError
from experiments import losses, objectives, restore
from experiments.optim import optimizers
from experiments.training import metrics_writer, train_state, trainer, validation
from experiments.objectives import distillation, frozen, language_modelling, sown
from experiments.configs import base
from tests.conftest import make_tiny_config


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_each_term_against_numpy():
    rng = np.random.default_rng(0)
    logits, teacher = rng.normal(size=(2, 3, 7)) * 3, rng.normal(size=(2, 3, 7)) * 3
    targets, mask = rng.integers(0, 7, size=(2, 3)), np.array([[1, 1, 0], [1, 0, 1]], np.float64)
    eps, c, a, t = 0.1, 1e-2, 0.3, 2.0
    labels = np.eye(7)[targets] * (1 - eps) + eps / 7
    ce = -(labels * _log_softmax(logits)).sum(-1)
    log_z = np.log(np.exp(logits).sum(-1))
    p_teacher = np.exp(_log_softmax(teacher / t))
    kl = (p_teacher * (np.log(p_teacher) - _log_softmax(logits / t))).sum(-1)
    expected = ((1 - a) * ce + a * t**2 * kl + c * log_z**2) * mask
    got = losses.Objective(label_smoothing=eps, z_loss=c, distill_weight=a, temperature=t).sums(
        jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask, jnp.float32),
        jnp.asarray(teacher, jnp.float32))
    np.testing.assert_allclose(got["objective"], expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(got["distill_kl"], (kl * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(got["log_z_squared"], (log_z**2 * mask).sum(), rtol=1e-5)


def _ce(logits, targets):
    return -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("terms", ["none", "z_loss", "distill"])
def test_the_objective_is_the_whole_batchs_mean_over_micro_batches_with_its_gradient(terms):
    """LanguageModelling.loss (and Distillation's, reading a teacher through `frozen_logits`): each micro-batch's
    share is its summed objective over the whole batch's count, so the shares add up to the batch mean; the
    gradient against logits is the per-token one over that count (plain CE: (softmax - onehot) mask / count)."""
    rng = np.random.default_rng(3)
    logits, teacher = rng.normal(size=(2, 4, 6)) * 2, rng.normal(size=(2, 4, 6)) * 2
    targets, mask = rng.integers(0, 6, size=(2, 4)), np.array([[1, 1, 0, 1], [0, 1, 1, 1]], np.float64)
    c, a, t = 0.05, 0.3, 2.0
    objective = {"none": language_modelling.LanguageModelling(),
                 "z_loss": language_modelling.LanguageModelling(losses.Objective(z_loss=c)),
                 "distill": distillation.Distillation(losses.Objective(distill_weight=a, temperature=t))}[terms]
    per_token = _ce(logits, targets)
    if terms == "z_loss":
        per_token = per_token + c * np.log(np.exp(logits).sum(-1)) ** 2
    if terms == "distill":
        p = np.exp(_log_softmax(teacher / t))
        per_token = (1 - a) * per_token + a * t**2 * (p * (np.log(p) - _log_softmax(logits / t))).sum(-1)
    count = mask.sum()
    as32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    def share(lg, rows):
        batch = {"inputs": jnp.asarray(rows), "targets": jnp.asarray(targets[rows]), "loss_mask": as32(mask[rows])}
        return objective.loss(lg, batch, as32(count), 2, frozen_logits=lambda r: as32(teacher)[r])[0]

    got = sum(share(as32(logits[[r]]), np.asarray([r])) for r in (0, 1))
    np.testing.assert_allclose(got, (per_token * mask).sum() / count, rtol=1e-5)
    if terms == "none":
        grad = jax.grad(share)(as32(logits), np.asarray([0, 1]))
        softmax = np.exp(_log_softmax(logits))
        np.testing.assert_allclose(grad, (softmax - np.eye(6)[targets]) * mask[..., None] / count, atol=1e-6)


def test_every_objective_but_grpo_trains_with_dropout_and_the_steps_default_terms_are_the_configs():
    """The policy's pass draws the model's dropout from the step's rng for every objective but GRPO (its importance
    ratios compare the policy with the sampler that drew the rollouts, which ran without dropout); the train step's
    default sown terms weigh MTP as the default config does over a 1-step run."""
    rng = jax.random.key(0)
    for name, entry in objectives.OBJECTIVES.items():
        assert entry().dropout_rngs(rng) == ({} if name == "grpo" else {"dropout": rng}), name
    train = base.get_config().train
    train.steps = 1
    configured = sown.SownLosses.from_config(train)
    for step in range(3):
        assert float(sown.SownLosses().mtp_weight(step)) == float(configured.mtp_weight(step)), step


def test_sown_terms_join_the_objective_with_their_weights_and_counts():
    """SownLosses.add: MTP adds w(step) / D sum_k (depth k's CE sum / its whole-batch count); early exits make the
    objective sum_j j / sum_i i L_j over the exits' and the final mean CEs; the auxiliary losses add their sum over
    `accumulate` micro-batches."""
    rng = np.random.default_rng(4)
    targets, mask = rng.integers(0, 5, size=(2, 6)), np.array([[1, 1, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1]], np.float64)
    batch = {"targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask, jnp.float32)}
    depth = [rng.normal(size=(2, 6 - k, 5)) for k in (1, 2)]
    exits = [rng.normal(size=(2, 6, 5)) for _ in range(2)]
    aux = {"a": jnp.asarray([0.5, 0.25]), "b": jnp.asarray(0.125)}
    count, base = mask.sum(), 1.7
    terms = sown.SownLosses(losses.mtp_weight_schedule(0.3, 0.1, 0.5, 10))
    as32 = lambda xs: tuple(jnp.asarray(x, jnp.float32) for x in xs)  # noqa: E731

    mtp = [(_ce(lg, targets[:, k:]) * mask[:, k:]).sum() / mask[:, k:].sum() for k, lg in enumerate(depth, 1)]
    for step, weight in ((4, 0.3), (5, 0.1)):
        total, sums = terms.add(jnp.float32(base), {}, {"mtp": {"logits": as32(depth)}, "losses": aux}, batch, batch,
                                count, 2, step)
        np.testing.assert_allclose(total, base + weight * np.mean(mtp) + 0.875 / 2, rtol=1e-5)
        np.testing.assert_allclose(terms.metrics(sums, batch, count)["mtp_loss/2"], mtp[1], rtol=1e-5)

    total, sums = terms.add(jnp.float32(base), {}, {"exits": {"logits": as32(exits)}}, batch, batch, count, 1, 0)
    means = [(_ce(lg, targets) * mask).sum() / count for lg in exits] + [base]
    np.testing.assert_allclose(total, sum(j / 6 * m for j, m in enumerate(means, 1)), rtol=1e-5)
    np.testing.assert_allclose(terms.metrics(sums, batch, count)["exit_loss/1"], means[0], rtol=1e-5)


@pytest.mark.slow  # by default each term against NumPy, and each objective's loss and gradient
def test_the_train_step_descends_the_objective_it_names():
    """SGD at lr 1 without momentum: the step's update is minus the gradient of the objective written out."""
    from tests.experiments.test_optimizers import _tiny_lm_and_batch
    import flax.linen as nn
    model, batch = _tiny_lm_and_batch(np.random.default_rng(1))
    teacher_variables = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(7), batch["inputs"])["params"])}
    opt = base.get_config().optimizer
    opt.update(name="sgd", lr=1.0, warmup_steps=0)
    opt.sgd.update(momentum=0.0)
    objective = distillation.Distillation(losses.Objective(label_smoothing=0.2, z_loss=1e-3, distill_weight=0.4,
                                                           temperature=1.5))
    state = nn.meta.unbox(train_state.init_state(model, optimizers.build(opt, 3), batch["inputs"], jax.random.PRNGKey(0)))
    new_state, metrics = jax.jit(lambda s, b, t: trainer.train_step(
        s, b, t, schedule=optimizers.learning_rate_schedule(opt, 3), objective=objective,
        frozen_apply=model.apply))(state, batch, teacher_variables)

    def by_hand(params):
        logits = model.apply({"params": params}, batch["inputs"])
        teacher = model.apply(teacher_variables, batch["inputs"])
        labels = jax.nn.one_hot(batch["targets"], 11) * 0.8 + 0.2 / 11
        ce = -jnp.sum(labels * jax.nn.log_softmax(logits), -1)
        p_teacher = jax.nn.softmax(teacher / 1.5)
        kl = jnp.sum(p_teacher * (jnp.log(p_teacher) - jax.nn.log_softmax(logits / 1.5)), -1)
        z = jax.scipy.special.logsumexp(logits, -1)
        return jnp.mean(0.6 * ce + 0.4 * 1.5**2 * kl + 1e-3 * z**2)

    expected = jax.tree.map(lambda p, g: p - g, state.params, jax.jit(jax.grad(by_hand))(state.params))
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    logits = model.apply({"params": state.params}, batch["inputs"])
    np.testing.assert_allclose(metrics["loss"], optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["targets"]).mean(), rtol=1e-5)  # the logged loss stays the plain cross-entropy


@pytest.mark.slow  # by default distillation's loss with a teacher's logits against NumPy
def test_distillation_from_a_finished_run_on_the_mesh(tmp_path, finished_tiny_run):
    teacher_dir = str(finished_tiny_run)
    config = make_tiny_config(steps=4)
    config.model.update(num_layers=1)
    config.train.update(log_every=1, eval_every=4, checkpoint_every=4)
    config.train.distill.update(teacher=teacher_dir, weight=0.7, temperature=2.0)
    config.mesh.update(data=2, fsdp=2, tensor=2, expert=1)
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    events = metrics_writer.read(str(tmp_path), "train")
    assert len(events) == 4 and all(np.isfinite(e["distill_kl"]) and e["distill_kl"] > 0 for e in events)


@pytest.mark.parametrize("teacher, change, message", [
    ("missing", {}, "has no config.json; pass the workdir of a finished training run"),
    ("run", dict(vocab_size=5), "has model.vocab_size=14, the trained model 5: they need the same vocabulary"),
    ("run", dict(longer_by=1), "shorter than the trained model's"),  # one position past the teacher's length
    ("run", dict(longer_by=0), None),  # the teacher's own length: valid
])
def test_bad_teachers_are_one_line_errors(tmp_path, finished_tiny_run, teacher, change, message):
    config = make_tiny_config(steps=2)
    config.train.distill.teacher = str(tmp_path / "nothing") if teacher == "missing" else str(finished_tiny_run)
    config = trainer.resolve(config, data.load(config.data, seed=0))
    if "longer_by" in change:
        teacher_len = restore.load_config(str(finished_tiny_run)).model.max_len
        change = dict(max_len=teacher_len + change["longer_by"])
    config.model.update(**change)
    if message is None:
        assert frozen.check(config, config.train.distill.teacher, "train.distill.teacher").model.max_len == \
            config.model.max_len
        return
    with pytest.raises(ConfigError, match=message):
        frozen.check(config, config.train.distill.teacher, "train.distill.teacher")


@pytest.mark.parametrize("objective, keys, message", [
    ("", dict(distill=dict(teacher="runs/t"), preference=dict(kind="dpo")),
     r"train.objective='distill', but train.preference.kind selects \['preference'\] too"),
    ("grpo", dict(distill=dict(teacher="runs/t")), r"train.distill.teacher selects \['distill'\] too"),
    ("distill", {}, "needs train.distill.teacher"),
    ("preference", {}, "needs train.preference.kind"),
    ("grpo", {}, "needs train.grpo.group_size >= 2"),
])
def test_an_objective_chosen_without_its_keys_or_beside_anothers_is_one_line(objective, keys, message):
    config = make_tiny_config(steps=2)
    config.train.objective = objective
    for section, values in keys.items():
        config.train[section].update(**values)
    with pytest.raises(ConfigError, match=message) as error:
        validation.validate(config, 8)
    assert "\n" not in str(error.value)


def test_older_configs_select_their_objective_by_their_keys():
    train = make_tiny_config().train
    assert objectives.name(train) == "lm"
    train.preference.kind = "simpo"
    assert objectives.name(train) == "preference" and isinstance(
        objectives.OBJECTIVES["preference"].from_config(make_tiny_config()), objectives.OBJECTIVES["lm"])
