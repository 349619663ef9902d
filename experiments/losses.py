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


def mtp_sums(depth_logits, targets, loss_mask) -> dict:
    """{"mtp_loss_k": masked CE sum} of each depth k's logits [B, L - k, V] against targets[:, k:]."""
    return {f"mtp_loss_{k}": masked_sums(logits, targets[:, k:], loss_mask[:, k:])["loss"]
            for k, logits in enumerate(depth_logits, 1)}


def mtp_counts(loss_mask, depth: int) -> dict:
    """{"mtp_loss_k": the number of masked positions depth k scores}."""
    return {f"mtp_loss_{k}": jnp.maximum(jnp.sum(loss_mask[:, k:]), 1.0) for k in range(1, depth + 1)}


def mtp_weight_schedule(weight: float, weight_late: float, switch_fraction: float, total_steps: int):
    """step -> lambda: `weight` before switch_fraction * total_steps, `weight_late` from there."""
    switch = switch_fraction * total_steps
    return lambda step: jnp.where(step < switch, weight, weight_late)
