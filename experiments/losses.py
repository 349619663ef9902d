"""Masked next-token losses: only positions with loss_mask = 1 count.

    loss = sum_i m_i * CE(logits_i, target_i) / sum_i m_i      accuracy likewise with [argmax == target]

The training objective may add, per token (`Objective`, from `config.train`):

    label smoothing   CE against (1 - eps) onehot(target) + eps / V                     (Szegedy et al. 2016)
    z-loss            + c log^2 Z,  Z = sum_v exp(logits_v)                              (PaLM: c = 1e-4)
    distillation      (1 - a) CE + a T^2 KL(softmax(teacher / T) || softmax(logits / T))  (Hinton et al. 2015)

`loss` in the metrics stays the plain cross-entropy, so runs with and without them compare.

Multi-token prediction (models/mtp.py) adds lambda / D * sum_k CE_k, depth k's logits at position i scored
against target i + k; lambda steps from `train.mtp_weight` to `train.mtp_weight_late` at `train.mtp_switch_fraction`
of the run (DeepSeek-V3: 0.3, then 0.1 for the last third).

Early exit (models/early_exit.py) trains N exits (the last: the model's output) with CALM's depth weights:

    L = sum_j w_j CE_j,   w_j = j / sum_i i      (j = 1..N; CE_N the final logits')

Preference optimisation (`preference_loss`, docs/interfaces.md) scores a chosen response y_w against a rejected one y_l
of the same prompt from summed sequence log-probabilities; with a frozen reference model's, the implicit rewards
are r = log pi(y) - log pi_ref(y) and h = r_w - r_l:

    dpo     -(1 - eps) log sig(beta h) - eps log sig(-beta h)           (Rafailov et al. 2023; eps > 0: conservative DPO)
    ipo     (h - 1 / (2 beta))^2                                         (Azar et al. 2023, tau = beta)
            with `ipo_per_token`, r = (log pi(y) - log pi_ref(y)) / |y| on each side (TRL's IPO, which the IPO
            authors use for multi-token responses; the trainer's default, train.preference.ipo_per_token)
    kto     (w_D (1 - sig(beta (r_w - z))) + w_U (1 - sig(beta (z - r_l)))) / 2          (Ethayarajh et al. 2024)
            z = max(0, mean over the batch of log pi(y'_i | x_i) - log pi_ref(y'_i | x_i)), no gradient: the
            reference point, a KL estimate from mismatched pairs (x_i with another row's response y'_i,
            `kl_logps` / `ref_kl_logps`; the trainer pairs each prompt with the previous row's chosen response,
            as TRL's KL completions do)
    simpo   -log sig(beta (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma)     (Meng et al. 2024; no reference)
    orpo    -beta log sig(log odds(y_w) - log odds(y_l)),  log odds(y) = p - log(1 - e^p),  p = log pi(y) / |y|
            (p clamped to <= -1e-6: a response learned to P = 1 has infinite odds)
            (Hong et al. 2024, the odds-ratio term; the trainer adds the SFT term on y_w, train.preference.sft_weight)
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax


def masked_sums(logits, targets, loss_mask) -> dict:
    """Sums over the batch (so shards and eval batches add up exactly): loss, correct, count."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss": jnp.sum(ce * loss_mask), "correct": jnp.sum(correct * loss_mask), "count": jnp.sum(loss_mask)}


def masked_mean(logits, targets, loss_mask):
    """(mean loss, {"accuracy"}) over the masked positions."""
    sums = masked_sums(logits, targets, loss_mask)
    count = jnp.maximum(sums["count"], 1.0)
    return sums["loss"] / count, {"accuracy": sums["correct"] / count}


@dataclasses.dataclass(frozen=True)
class Objective:
    """The per-token training objective's terms beyond cross-entropy (all off by default)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    distill_weight: float = 0.0  # a: the KL's share; needs teacher logits
    temperature: float = 1.0  # T

    def sums(self, logits, targets, loss_mask, teacher_logits=None) -> dict:
        """{"objective": the objective summed over masked tokens, and the sums of its extra terms}."""
        labels = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
        if self.label_smoothing:
            labels = optax.smooth_labels(labels, self.label_smoothing)
        per_token = optax.softmax_cross_entropy(logits, labels)
        extra = {}
        if teacher_logits is not None:
            kl = distillation_kl(logits, teacher_logits, self.temperature)
            per_token = (1 - self.distill_weight) * per_token + self.distill_weight * self.temperature**2 * kl
            extra["distill_kl"] = jnp.sum(kl * loss_mask)
        if self.z_loss:
            log_z_squared = jax.nn.logsumexp(logits, axis=-1) ** 2
            per_token = per_token + self.z_loss * log_z_squared
            extra["log_z_squared"] = jnp.sum(log_z_squared * loss_mask)
        return {"objective": jnp.sum(per_token * loss_mask), **extra}


def distillation_kl(logits, teacher_logits, temperature: float):
    """KL(softmax(teacher / T) || softmax(logits / T)) per position, the teacher held fixed."""
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
    student = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


PREFERENCE_KINDS = ("dpo", "ipo", "kto", "simpo", "orpo")
NEEDS_REFERENCE = ("dpo", "ipo", "kto")


def token_logps(logits, targets):
    """log softmax(logits)[target] at every position: float[B, L]."""
    return -optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def sequence_logps(logits, targets, loss_mask):
    """(sum over masked positions of log softmax(logits)[target], the number of masked positions): float[B] each."""
    return jnp.sum(token_logps(logits, targets) * loss_mask, axis=-1), jnp.sum(loss_mask, axis=-1)


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, kind: str,
                    beta: float, label_smoothing: float = 0.0, gamma: float = 0.0, chosen_lengths=None,
                    rejected_lengths=None, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                    kl_logps=None, ref_kl_logps=None, ipo_per_token: bool = False):
    """(mean loss over the batch, metrics) of the paired preference loss `kind` (the module docstring's formulas).

    metrics: reward_margin, the mean of what the sigmoid compares before any offset (beta h; simpo: beta times
    the difference of mean log-probabilities; orpo: the log odds ratio), accuracy (the fraction where it is > 0),
    chosen_reward / rejected_reward (beta r) with a reference, and kto's reference point z."""
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"preference kind {kind!r} is not one of {list(PREFERENCE_KINDS)}")
    if kind in NEEDS_REFERENCE and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"preference kind {kind!r} needs the reference model's log-probabilities")
    if (kind in ("simpo", "orpo") or (kind == "ipo" and ipo_per_token)) and (
            chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"preference kind {kind!r} needs chosen_lengths and rejected_lengths")
    if kind == "kto" and (kl_logps is None or ref_kl_logps is None):
        raise ValueError("preference kind 'kto' needs kl_logps and ref_kl_logps (mismatched prompt / response pairs "
                         "under the policy and the reference) for its reference point")
    metrics = {}
    if kind in NEEDS_REFERENCE:
        chosen_reward, rejected_reward = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        if kind == "ipo" and ipo_per_token:
            chosen_reward, rejected_reward = chosen_reward / chosen_lengths, rejected_reward / rejected_lengths
        score = beta * (chosen_reward - rejected_reward)  # beta h
        metrics = {"chosen_reward": jnp.mean(beta * chosen_reward), "rejected_reward": jnp.mean(beta * rejected_reward)}
    else:
        chosen_mean, rejected_mean = chosen_logps / chosen_lengths, rejected_logps / rejected_lengths
    if kind == "dpo":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(score) - label_smoothing * jax.nn.log_sigmoid(-score)
    elif kind == "ipo":
        losses = (score / beta - 1 / (2 * beta)) ** 2
    elif kind == "kto":
        z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_logps - ref_kl_logps), 0.0))
        losses = (desirable_weight * (1 - jax.nn.sigmoid(beta * (chosen_reward - z)))
                  + undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - rejected_reward)))) / 2
        metrics["reference_point"] = z
    elif kind == "simpo":
        score = beta * (chosen_mean - rejected_mean)
        losses = -jax.nn.log_sigmoid(score - gamma)
    else:
        def log_odds(p):  # log(P / (1 - P)), P = e^p, clamped below 1 - 1e-6: at P = 1 (float32 rounds a learned
            p = jnp.minimum(p, -1e-6)  # answer's log P to 0) the odds are infinite and the gradient NaN
            return p - jnp.log(-jnp.expm1(p))

        score = log_odds(chosen_mean) - log_odds(rejected_mean)
        losses = -beta * jax.nn.log_sigmoid(score)
    metrics.update(reward_margin=jnp.mean(score), accuracy=jnp.mean((score > 0).astype(jnp.float32)))
    return jnp.mean(losses), metrics


def mtp_sums(depth_logits, targets, loss_mask) -> dict:
    """{"mtp_loss_k": masked CE sum} of each depth k's logits [B, L - k, V] against targets[:, k:]."""
    return {f"mtp_loss_{k}": masked_sums(logits, targets[:, k:], loss_mask[:, k:])["loss"]
            for k, logits in enumerate(depth_logits, 1)}


def mtp_counts(loss_mask, depth: int) -> dict:
    """{"mtp_loss_k": the number of masked positions depth k scores}."""
    return {f"mtp_loss_{k}": jnp.maximum(jnp.sum(loss_mask[:, k:]), 1.0) for k in range(1, depth + 1)}


def exit_sums(exit_logits, targets, loss_mask) -> dict:
    """{"exit_loss_j": masked CE sum} of each early exit j = 1..N-1's logits [B, L, V]."""
    return {f"exit_loss_{j}": masked_sums(logits, targets, loss_mask)["loss"] for j, logits in enumerate(exit_logits, 1)}


def exit_weighted(final_loss, exit_losses: list):
    """sum_j w_j CE_j with w_j = j / sum_i i over the exits' mean CEs (j = 1..N-1) and the final one (j = N)."""
    depth_losses = [*exit_losses, final_loss]
    weights = [j / (len(depth_losses) * (len(depth_losses) + 1) / 2) for j in range(1, len(depth_losses) + 1)]
    return sum(w * loss for w, loss in zip(weights, depth_losses))


def mtp_weight_schedule(weight: float, weight_late: float, switch_fraction: float, total_steps: int):
    """step -> lambda: `weight` before switch_fraction * total_steps, `weight_late` from there."""
    switch = switch_fraction * total_steps
    return lambda step: jnp.where(step < switch, weight, weight_late)
