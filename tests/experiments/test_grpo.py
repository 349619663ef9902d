"""GRPO (experiments/objectives/grpo.py): advantages and the clipped objective against float64 NumPy, scoring rollouts
against the reference responses, and a run through the trainer from an SFT start."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
import models
from data.config_fields import ConfigError
from experiments.training import trainer
from experiments.objectives import grpo
from experiments.configs import base, preference as preference_configs


def numpy_outcome_advantages(rewards, eps):
    """TRL's: the group's mean and sample (Bessel-corrected, torch.std's default) standard deviation."""
    return (rewards - rewards.mean(-1, keepdims=True)) / (rewards.std(-1, keepdims=True, ddof=1) + eps)


def numpy_process_advantages(step_rewards, step_mask, eps):
    """DeepSeekMath 4.1.3 as a loop: normalise every step reward of the group, then each token's advantage sums
    the normalised rewards of the steps closing at or after it."""
    out = np.zeros_like(step_rewards, np.float64)
    for p in range(step_rewards.shape[0]):
        closed = step_rewards[p][step_mask[p] > 0]
        mean, std = closed.mean(), closed.std(ddof=1)
        for i in range(step_rewards.shape[1]):
            for t in range(step_rewards.shape[2]):
                out[p, i, t] = sum((step_rewards[p, i, k] - mean) / (std + eps)
                                   for k in range(t, step_rewards.shape[2]) if step_mask[p, i, k])
    return out


def numpy_objective(logps, old_logps, ref_logps, advantages, mask, clip, beta):
    ratio = np.exp(logps - old_logps)
    surrogate = np.minimum(ratio * advantages, np.clip(ratio, 1 - clip, 1 + clip) * advantages)
    kl = np.exp(ref_logps - logps) - (ref_logps - logps) - 1
    per_sequence = ((surrogate - beta * kl) * mask).sum(-1) / mask.sum(-1)
    return -per_sequence.mean()


def test_minibatches_split_every_group_evenly():
    rows = {"x": jnp.arange(12 * 3).reshape(12, 3)}  # 3 prompts x G = 4 completions, row = prompt * 4 + g
    halves = [jax.device_get(grpo.minibatch(rows, j, 2))["x"][:, 0] // 3 for j in range(2)]
    np.testing.assert_array_equal(halves[0], [0, 2, 4, 6, 8, 10])  # completions 0 and 2 of every prompt
    np.testing.assert_array_equal(np.sort(np.concatenate(halves)), np.arange(12))


def test_outcome_and_process_advantages_match_numpy():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, (3, 5)).astype(np.float64)
    rewards[1] = 1.0  # a group of equal rewards: zero advantage
    np.testing.assert_allclose(grpo.outcome_advantages(jnp.asarray(rewards, jnp.float32), 1e-4),
                               numpy_outcome_advantages(rewards, 1e-4), atol=1e-5)
    assert np.all(np.asarray(grpo.outcome_advantages(jnp.asarray(rewards), 1e-4))[1] == 0)
    step_rewards = rng.integers(0, 2, (2, 3, 7)).astype(np.float64)
    step_mask = (rng.random((2, 3, 7)) < 0.6).astype(np.float64)
    step_mask[:, :, 0] = 1.0
    np.testing.assert_allclose(
        grpo.process_advantages(jnp.asarray(step_rewards, jnp.float32), jnp.asarray(step_mask, jnp.float32), 1e-4),
        numpy_process_advantages(step_rewards, step_mask, 1e-4), atol=1e-4)


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.04, 0.7)])
def test_clipped_objective_matches_numpy_and_its_gradient_finite_differences(beta, temperature):
    """Every probability at the rollouts' temperature: log softmax(logits / T) of policy and reference."""
    rng = np.random.default_rng(1)
    rows, length, vocab = 6, 5, 7
    logits = rng.normal(size=(rows, length, vocab))
    ref_logits = rng.normal(size=(rows, length, vocab))
    targets = rng.integers(0, vocab, (rows, length))
    mask = np.ones((rows, length))
    mask[:, :2] = 0.0  # the prompt
    mask[0, 4] = 0.0  # a shorter response
    log_softmax = lambda x: x / temperature - np.log(np.exp(x / temperature).sum(-1, keepdims=True))  # noqa: E731
    logps = np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
    old_logps = logps + rng.normal(scale=0.3, size=logps.shape)  # ratios far enough from 1 that some clip
    advantages = rng.normal(size=(rows, length))
    batch = {"targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask, jnp.float32),
             "old_logps": jnp.asarray(old_logps, jnp.float32), "advantages": jnp.asarray(advantages, jnp.float32),
             "rewards": jnp.zeros(rows), "solved": jnp.zeros(rows)}
    config = grpo.GRPOConfig(group_size=2, clip=0.2, kl_beta=beta, temperature=temperature)
    ref_logps = np.take_along_axis(log_softmax(ref_logits), targets[..., None], -1)[..., 0]
    expected = numpy_objective(logps, old_logps, ref_logps, advantages, mask, 0.2, beta)
    loss, metrics = grpo.objective(config, jnp.asarray(logits, jnp.float32), jnp.asarray(ref_logits, jnp.float32), batch)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert 0 < float(metrics["clip_fraction"]) < 1
    # The gradient along a random direction of the logits against central differences of the NumPy objective.
    direction = rng.normal(size=logits.shape)
    with jax.enable_x64():
        grad = jax.grad(lambda x: grpo.objective(config, x, jnp.asarray(ref_logits), {
            **batch, "old_logps": jnp.asarray(old_logps), "advantages": jnp.asarray(advantages),
            "loss_mask": jnp.asarray(mask)})[0])(jnp.asarray(logits))
        h = 1e-6

        def at(x):
            lp = np.take_along_axis(log_softmax(x), targets[..., None], -1)[..., 0]
            return numpy_objective(lp, old_logps, ref_logps, advantages, mask, 0.2, beta)

        numeric = (at(logits + h * direction) - at(logits - h * direction)) / (2 * h)
        assert float(jnp.sum(grad * direction)) == pytest.approx(numeric, rel=1e-5)


def tiny():
    """ProntoQA chains of thought (multi-token responses) on a one-layer transformer."""
    config = preference_configs.get_config("prontoqa,sft")
    config.data.rejected = ""
    with config.unlocked():
        config.model = base.get_config("transformer", "prontoqa").model
    config.model.update(d_model=32, num_layers=1, num_heads=2, d_mlp=64)
    config.data.update(min_hops=2, max_hops=3, branches=2, train_examples=64, eval_examples=16, test_examples=16,
                       batch_size=8)
    config.train.update(steps=3, log_every=1, eval_every=0, checkpoint_every=3)
    return config


@pytest.fixture(scope="module")
def rows():
    splits = data.load(tiny().data, seed=0)
    return {k: v[:3] for k, v in splits.train.items()}, grpo.prompt_length(splits.train)


@pytest.mark.parametrize("reward", grpo.REWARDS)
def test_scoring_compares_completions_with_the_reference_chain(rows, reward):
    batch, prompt_len = rows
    group = 4
    reference = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)  # the whole right row
    completions = np.repeat(reference, group, axis=0)
    response = [np.nonzero(m)[0] + 1 for m in batch["loss_mask"]]  # row positions of each response's tokens
    wrong_at = {1: 0, 2: 3, 5: -1, 9: 1, 10: 2}  # completion -> the response token it gets wrong
    for i, j in wrong_at.items():
        position = response[i // group][j]
        completions[i, position] = (completions[i, position] + 1) % 50
    config = grpo.GRPOConfig(group_size=group, reward=reward)
    scored = jax.device_get(grpo.score(jnp.asarray(completions), jax.tree.map(jnp.asarray, batch), config=config,
                                       prompt_len=prompt_len))
    outcome = np.array([0.0 if i in wrong_at else 1.0 for i in range(3 * group)])
    np.testing.assert_array_equal(scored["rewards"], outcome)
    np.testing.assert_array_equal(scored["solved"], np.ones(3 * group))
    mask = np.repeat(batch["loss_mask"], group, axis=0) * (np.arange(batch["inputs"].shape[1]) >= prompt_len - 1)
    np.testing.assert_array_equal(scored["loss_mask"], mask)
    if reward == "outcome":
        expected = np.repeat(numpy_outcome_advantages(outcome.reshape(3, group), 1e-4).reshape(-1, 1), mask.shape[1], 1)
    else:  # the step closing at token t is right when every response token up to t is
        steps = np.ones_like(mask)
        for i, j in wrong_at.items():
            steps[i, response[i // group][j] - 1:] = 0.0
        shape = (3, group, mask.shape[1])
        expected = numpy_process_advantages(steps.reshape(shape), mask.reshape(shape), 1e-4).reshape(mask.shape)
    np.testing.assert_allclose(scored["advantages"] * mask, expected * mask, atol=1e-4)


@pytest.mark.slow
def test_rollout_keeps_the_prompts_and_logs_the_samplers_log_probs(rows):
    batch, prompt_len = rows
    config = trainer.resolve(tiny(), data.load(tiny().data, seed=0))
    model = models.build(config.model)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(batch["inputs"]))
    grpo_config = grpo.GRPOConfig(group_size=2, temperature=0.7)
    out = grpo.rollout(model, variables, jax.tree.map(jnp.asarray, batch), jax.random.key(1), config=grpo_config,
                       prompt_len=prompt_len)
    np.testing.assert_array_equal(out["inputs"][:, :prompt_len], np.repeat(batch["inputs"][:, :prompt_len], 2, axis=0))
    np.testing.assert_array_equal(out["inputs"][:, 1:], out["targets"][:, :-1])
    log_probs = jax.nn.log_softmax(model.apply(variables, out["inputs"]) / 0.7)  # the sampler's distribution
    expected = np.take_along_axis(np.asarray(log_probs), np.asarray(out["targets"])[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["old_logps"], expected, atol=1e-5)


def metrics(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow  # GRPO's pieces are checked above; this is the whole loop
def test_grpo_runs_from_an_sft_start_on_a_sharded_mesh(tmp_path):
    sft = str(tmp_path / "sft")
    trainer.train_and_evaluate(tiny(), sft, verbose=False)
    config = tiny()
    config.train.update(init_from=sft, steps=4)
    config.train.grpo.update(group_size=4, epochs=2, minibatches=2, reward="process", temperature=0.8)  # 4 steps
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.model.update(residual_dropout=0.3, attention_dropout=0.3)  # off in the policy pass, as in the others
    trainer.train_and_evaluate(config, str(tmp_path / "grpo"), verbose=False)
    first, *_, last = metrics(tmp_path / "grpo")
    # Step 1's policy is the reference and the sampler's: no KL, no ratio away from 1.
    assert abs(first["grpo/kl"]) < 1e-5 and first["grpo/clip_fraction"] == 0.0
    assert 0.0 <= last["grpo/reward"] <= 1.0 and np.isfinite(last["grpo/loss"]) and last["grpo/kl"] > 0


def test_the_smallest_grpo_config_is_accepted():
    """Two completions per prompt in one minibatch, no reference, no accumulation: the boundaries, not refused."""
    config = tiny()
    config.train.grpo.update(group_size=2, minibatches=1, kl_beta=0.0)
    assert grpo.problems(config) == []


@pytest.mark.parametrize("change,message", [
    (dict(kl_beta=0.04), "needs a reference model: set train.init_from"),
    (dict(group_size=1, kl_beta=0.0), "group_size=1 gives every completion zero advantage"),
    (dict(kl_beta=0.0, model="coconut"), "model.name='coconut' decodes without the padding mask"),
    (dict(kl_beta=0.0, minibatches=3), "minibatches=3 must divide train.grpo.group_size=4"),
    (dict(kl_beta=0.0, grad_accum_steps=2), "train.grad_accum_steps=2: roll out a smaller batch instead"),
])
def test_bad_grpo_configs_are_one_line_errors(tmp_path, change, message):
    change = dict(change)
    config = preference_configs.get_config("prontoqa,sft") if change.pop("model", None) else tiny()
    config.train.grad_accum_steps = change.pop("grad_accum_steps", 1)
    config.train.grpo.update(**{"group_size": 4, **change})
    with pytest.raises(ConfigError, match=message) as error:
        trainer.train_and_evaluate(config, str(tmp_path / "run"), verbose=False)
    assert "\n" not in str(error.value)
