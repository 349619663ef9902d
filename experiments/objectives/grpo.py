"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath; DeepSeek-R1) through the one trainer
(`train.objective = "grpo"`, or `train.grpo.group_size` = G > 0): RL with a verifiable reward and no value model.

Every `epochs * minibatches` steps the trainer rolls out: each prompt of the batch (the rows' tokens before their
first loss-masked target) is continued G times by the KV-cached sampler (models/sampling.py) at
`temperature`, and a program scores each completion o_i (`reward`):
    outcome   r_i = 1 if o_i's response tokens equal the reference response (the data's masked targets), else 0
    process   r_i^k = 1 if o_i's first k response tokens all equal the reference's, else 0: every token closes
              a step, and a step is right when the chain up to it is (steps after a wrong one score 0). This is
              the finest process supervision a chain with one right form admits (the generators write one).

Advantages (DeepSeekMath section 4.1.2 / 4.1.3), per group of G completions of one prompt, std the sample
standard deviation (Bessel-corrected, as TRL's):
    outcome   A_{i,t} = (r_i - mean_j r_j) / (std_j r_j + eps)                     (every token of o_i)
    process   r~ = (r - mean R) / (std R + eps) over R, every step reward of the group;
              A_{i,t} = sum of r~_i^k over the steps k of o_i that end at or after token t
(a one-token response, e.g. modular arithmetic's answer, makes the two the same).

then trains `epochs` passes over the rollout, each pass `minibatches` optimizer steps on rows j, j + k, ... (PPO's
minibatch epochs). The objective maximised (loss = its negative), pi_old the policy that rolled out (ratio 1 at
the first step):
    J = 1/G sum_i 1/|o_i| sum_t [ min(rho A, clip(rho, 1 - eps_c, 1 + eps_c) A) - beta KL_t ]
    rho_{i,t} = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
    KL_t = pi_ref / pi - log(pi_ref / pi) - 1          (the unbiased k3 estimator of KL(pi || pi_ref), >= 0)
averaged over the prompts of the batch. The reference is the run `train.init_from` starts from (beta > 0). Every
probability (pi, pi_old, pi_ref) is the softmax of the logits over `temperature`, the distribution the rollouts
sample from (as TRL), and the policy's pass runs without dropout, like the old and reference passes (TRL turns
dropout off in its RL trainers), so rho is 1 at each rollout's first step.
Logged: grpo/reward (the mean outcome reward), grpo/kl, grpo/clip_fraction, grpo/loss, grpo/solved (the
fraction of groups with any correct completion: a group of equal rewards has zero advantage and no gradient).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import models
from data.config_fields import ConfigError, field
from experiments import losses
from experiments.posttrain import lora
from experiments.objectives import language_modelling
from models import sampling

REWARDS = ("outcome", "process")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """`config.train.grpo`: group_size 0 trains as usual."""

    group_size: int = field(0, min=0)  # G completions per prompt
    reward: str = field("outcome", choices=REWARDS)
    clip: float = field(0.2, above=0, below=1)  # eps_c of the clipped ratio
    kl_beta: float = field(0.04, min=0)  # beta of the KL penalty to the reference (DeepSeekMath: 0.04)
    epochs: int = field(1, min=1)  # passes over each rollout (PPO-style; > 1 makes the clip matter)
    minibatches: int = field(1, min=1)  # k: each pass is k optimizer steps on rows j, j + k, ... (G / k completions
    # of every prompt); a rollout every epochs * k steps
    temperature: float = field(1.0, above=0)  # of the rollouts
    eps: float = field(1e-4, above=0)  # in the advantages' denominators
    seed: int = 0  # folded into the rollouts' rng (the runs of a study differ in their samples, not their data)


def minibatch(rollout: dict, index: int, count: int) -> dict:
    """Rows index, index + count, ... of every rollout array (count divides G: each prompt keeps G / count)."""
    return {k: v.reshape(-1, count, *v.shape[1:])[:, index] for k, v in rollout.items()}


@dataclasses.dataclass(frozen=True)
class GRPO(language_modelling.LanguageModelling):
    """The entry of the objectives table: the batch is a rollout of the current policy, the loss -J."""

    config: GRPOConfig = GRPOConfig()
    selecting_key = "train.grpo.group_size"
    section, keys = "grpo", GRPOConfig()
    policy_dropout = False

    @staticmethod
    def problems(config) -> list[str]:
        return problems(config)

    @classmethod
    def from_config(cls, config) -> "GRPO":
        keys = GRPOConfig(**config.train.grpo.to_dict())
        reference = config.train.init_from if keys.kl_beta else ""
        return cls(terms=language_modelling.terms(config.train), frozen_folder=reference,
                   frozen_key="train.init_from" if reference else "", config=keys)

    def check_data(self, config, examples: dict) -> None:
        prompt_length(examples)  # every row's response must start at one position

    def batch_preparer(self, *, model, splits, lora_config, state_shardings, batch_spec, **context):
        return Rollouts(self.config, model, prompt_length(splits.train), lora_config, state_shardings, batch_spec)

    def loss(self, logits, batch: dict, count, accumulate: int, frozen_logits=None):
        """-J alone: the sampled completions' cross-entropy is logged as `loss`, not trained on."""
        ref_logits = frozen_logits(batch["inputs"]) if frozen_logits is not None else None
        rl_loss, rl_metrics = objective(self.config, logits, ref_logits, batch)
        _, sums = super().loss(logits, batch, count, accumulate)
        return rl_loss, {**sums, **{f"grpo/{k}": v for k, v in rl_metrics.items()}}

    def metrics(self, sums: dict, count) -> dict:
        return {**super().metrics(sums, count), **{k: v for k, v in sums.items() if k.startswith("grpo/")}}


class Rollouts:
    """The step's batch: every `epochs * minibatches` steps each prompt of the data's batch continued by the
    current policy and scored (a compiled rollout), then minibatch `step % minibatches` of it."""

    def __init__(self, config: GRPOConfig, model, prompt_len: int, lora_config, state_shardings, batch_spec):
        self.config, self.rollout_batch = config, None
        generate = functools.partial(rollout, model, config=config, prompt_len=prompt_len)

        def rollout_step(state, batch):
            params = lora.merged(state.params, lora_config.alpha) if lora_config.rank else state.params
            model_state = {k: v for k, v in state.model_state.items() if k != models.PROBES}
            rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
            if config.seed:
                rng = jax.random.fold_in(rng, config.seed)
            return generate({"params": params, **model_state}, batch, rng)

        self.compiled_rollout = jax.jit(rollout_step, in_shardings=(state_shardings, batch_spec),
                                        out_shardings=batch_spec)
        self.compiled_minibatch = jax.jit(functools.partial(minibatch, count=config.minibatches), static_argnums=1,
                                          in_shardings=(batch_spec,), out_shardings=batch_spec)

    def __call__(self, state, batch, step: int):
        if self.rollout_batch is None or step % (self.config.epochs * self.config.minibatches) == 0:
            self.rollout_batch = self.compiled_rollout(state, batch)
        if self.config.minibatches == 1:
            return self.rollout_batch
        return self.compiled_minibatch(self.rollout_batch, step % self.config.minibatches)

    def reset(self) -> None:
        """After a rollback: the next step rolls out again."""
        self.rollout_batch = None


def problems(config) -> list[str]:
    train, g = config.train, config.train.grpo
    if not g.group_size:
        return ["train.objective='grpo' needs train.grpo.group_size >= 2, the completions per prompt"]
    p = []
    if config.model.name == "coconut":
        p.append("train.grpo with model.name='coconut' decodes without the padding mask its forward pass applies, so "
                 "the rollouts would not be the policy's samples; use model.name='transformer'")
    if g.kl_beta and not train.init_from:
        p.append(f"train.grpo.kl_beta={g.kl_beta} needs a reference model: set train.init_from to the run it starts "
                 "from (the SFT run), or kl_beta=0")
    if g.group_size < 2:
        p.append(f"train.grpo.group_size={g.group_size} gives every completion zero advantage; use >= 2")
    if g.group_size % g.minibatches:
        p.append(f"train.grpo.minibatches={g.minibatches} must divide train.grpo.group_size={g.group_size} (each "
                 "minibatch holds an equal share of every prompt's completions)")
    if train.grad_accum_steps > 1:
        p.append(f"train.grpo with train.grad_accum_steps={train.grad_accum_steps}: roll out a smaller batch instead")
    return p


# Advantages and the objective ---------------------------------------------------------------------------------

def outcome_advantages(rewards, eps: float):
    """float[P, G] rewards -> float[P, G] group-normalised advantages (the group's sample std)."""
    mean = jnp.mean(rewards, axis=-1, keepdims=True)
    return (rewards - mean) / (jnp.std(rewards, axis=-1, keepdims=True, ddof=1) + eps)


def process_advantages(step_rewards, step_mask, eps: float):
    """step_rewards, step_mask float[P, G, N] (the reward of the step closing at response token n of completion i,
    and 1 where a step closes) -> float[P, G, N] advantages: each token's, the normalised rewards of the steps
    closing at or after it."""
    count = jnp.maximum(jnp.sum(step_mask, axis=(1, 2), keepdims=True), 1.0)
    mean = jnp.sum(step_rewards * step_mask, axis=(1, 2), keepdims=True) / count
    std = jnp.sqrt(jnp.sum((step_rewards - mean) ** 2 * step_mask, axis=(1, 2), keepdims=True)
                   / jnp.maximum(count - 1, 1.0))
    normalised = (step_rewards - mean) / (std + eps) * step_mask
    return jnp.flip(jnp.cumsum(jnp.flip(normalised, -1), axis=-1), -1)


def objective(config: GRPOConfig, logits, ref_logits, batch: dict):
    """(loss = -J, metrics) from the policy's (and the reference's, or None) logits [R, L, V] over the rollout
    rows `batch` (inputs, targets, loss_mask, advantages [R, L], old_logps [R, L], rewards [R])."""
    mask = batch["loss_mask"]
    logps = losses.token_logps(logits / config.temperature, batch["targets"])
    ratio = jnp.exp(logps - batch["old_logps"])
    advantages = batch["advantages"]
    clipped = jnp.clip(ratio, 1 - config.clip, 1 + config.clip)
    surrogate = jnp.minimum(ratio * advantages, clipped * advantages)
    per_token = surrogate
    kl = jnp.zeros_like(logps)
    if ref_logits is not None and config.kl_beta:
        log_ref_over_pi = losses.token_logps(ref_logits / config.temperature, batch["targets"]) - logps
        kl = jnp.exp(log_ref_over_pi) - log_ref_over_pi - 1.0
        per_token = surrogate - config.kl_beta * kl
    lengths = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    per_sequence = lambda x: jnp.sum(x * mask, axis=-1) / lengths  # noqa: E731
    loss = -jnp.mean(per_sequence(per_token))
    is_clipped = (ratio * advantages > clipped * advantages).astype(jnp.float32)
    return loss, {"loss": loss, "kl": jnp.mean(per_sequence(kl)), "clip_fraction": jnp.mean(per_sequence(is_clipped)),
                  "reward": jnp.mean(batch["rewards"]), "solved": jnp.mean(batch["solved"])}


# Rollouts -------------------------------------------------------------------------------------------------------

def prompt_length(examples: dict) -> int:
    """The prompt every row shares: the tokens up to its first loss-masked target (inclusive of the input there)."""
    first = np.argmax(examples["loss_mask"] > 0, axis=1)
    if not np.all(first == first[0]):
        raise ConfigError(f"train.grpo needs every row's response to start at one position; here it starts at "
                          f"{sorted(set(first.tolist()))[:5]} (left-pad the prompts)")
    return int(first[0]) + 1


def rollout(model, variables, batch: dict, rng, *, config: GRPOConfig, prompt_len: int):
    """The rollout rows of `batch`'s prompts: each continued G times by the policy `variables`, then scored."""
    prompts = batch["inputs"][:, :prompt_len]
    batch_size, row_len = batch["inputs"].shape
    new_tokens = row_len - prompt_len + 1  # prompt + completion = row_len + 1 tokens
    repeated = jnp.repeat(prompts, config.group_size, axis=0)
    cache = model.init_cache(batch_size * config.group_size, prompt_len + new_tokens)
    completions = sampling.generate(model, variables, repeated, cache, rng, num_tokens=new_tokens,
                                    temperature=config.temperature)
    rows = jnp.concatenate([repeated, completions], axis=1)
    scored = score(rows, batch, config=config, prompt_len=prompt_len)
    old_logits = model.apply(variables, scored["inputs"])
    scored["old_logps"] = losses.token_logps(old_logits / config.temperature, scored["targets"])
    return scored


def score(rows, batch: dict, *, config: GRPOConfig, prompt_len: int) -> dict:
    """Rollout rows int32[B G, L + 1] (group i of G continues batch row i) against the batch's reference responses
    -> inputs / targets / loss_mask / advantages [B G, L], rewards (outcome) and solved (the group's best) [B G]."""
    batch_size, row_len = batch["inputs"].shape
    group = config.group_size
    inputs, targets = rows[:, :-1], rows[:, 1:]
    response_mask = jnp.repeat(batch["loss_mask"], group, axis=0)
    matches = (targets == jnp.repeat(batch["targets"], group, axis=0)) | (response_mask == 0)
    outcome = jnp.all(matches, axis=-1).astype(jnp.float32)
    grouped = outcome.reshape(batch_size, group)
    loss_mask = response_mask * (jnp.arange(row_len) >= prompt_len - 1)
    if config.reward == "outcome":
        advantages = jnp.repeat(outcome_advantages(grouped, config.eps).reshape(-1)[:, None], row_len, axis=1)
    else:  # every response position is a step: right when every response token up to it is
        right_so_far = jnp.cumprod(matches.astype(jnp.float32), axis=-1)
        shape = (batch_size, group, row_len)
        advantages = process_advantages(right_so_far.reshape(shape), loss_mask.reshape(shape), config.eps)
        advantages = advantages.reshape(batch_size * group, row_len)
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "advantages": advantages,
            "rewards": outcome, "solved": jnp.repeat(jnp.max(grouped, axis=-1), group)}
