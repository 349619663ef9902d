"""Masked next-token losses: only positions with loss_mask = 1 count.

    loss = sum_i m_i * CE(logits_i, target_i) / sum_i m_i      accuracy likewise with [argmax == target]
"""

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
