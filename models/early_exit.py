"""Early exit (`model.exit_every = k` on the transformer; CALM, Schuster et al. 2022): an exit after every k-th block
through the model's own final norm and unembedding, trained with depth-weighted losses; at inference a token whose
exit is confident enough stops there.

    segments:   x^j = Segment_j(x^{j-1})          k blocks each (one nn.scan per segment), j = 1..N, N = L / k
    exits:      logits^j = norm(x^j) U            the shared head (U = E^T when tied); logits^N is the model's
    training:   L = sum_j w_j CE(logits^j),  w_j = j / sum_i i         (CALM's weights; experiments/losses.py)
    inference:  token t exits at the first j < N with  c(logits^j_t) passing tau, by exit_criterion:
                    max_prob      p_(1) >= tau                  p = softmax(logits^j_t), p_(1) >= p_(2) >= ... sorted
                    softmax_diff  p_(1) - p_(2) >= tau          (CALM's "softmax response", its top-1 minus top-2)
                    entropy       -sum_v p_v log p_v <= tau

An exited token's hidden state is frozen: every later block still computes its keys and values, from the frozen
state, and leaves it unchanged (CALM's propagation of the exit state, which fills the KV the deeper layers need for
the tokens that do go on), so its final logits are its exit's logits, and decoding with the cache equals the full
pass at every threshold. `exit_threshold = 0` turns early exit off (every token runs every layer), and so does
training (the forward pass that sows the exits' logits).

The blocks here still run (masked) for exited tokens, so batched wall-clock time does not fall; what early exit
saves is counted in layers: `layers_used` gives each position's depth, and the FLOPs a token-by-token deployment
would spend follow from it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn

from data.config_fields import field
from models import blocks

COLLECTION = "exits"  # the exits' logits, sown in training (experiments/training/trainer.py adds their losses)
CRITERIA = ("max_prob", "softmax_diff", "entropy")


@dataclasses.dataclass(frozen=True)
class EarlyExitOptions:
    """The `config.model` keys of early exit (on the transformer)."""

    exit_every: int = field(0, min=0)  # k > 0: an exit after every k-th block (num_layers a multiple of k)
    exit_criterion: str = field("max_prob", choices=CRITERIA)
    exit_threshold: float = field(0.0, min=0)  # tau; 0: no early exit at inference


class FreezingBlock(blocks.Block):
    """A block whose carry is (x, exited [B, T]): exited positions keep x (their keys and values still come from it)."""

    def __call__(self, carry, cache, start, key_mask=None, packed=None):
        """packed: packed rows (models/packing.py; "segments" here are groups of blocks)."""
        x, exited = carry
        y, cache = super().__call__(x, cache, start, key_mask, packed)
        return (jnp.where(exited[..., None], x, y), exited), cache


def confident(cfg, logits):
    """bool[B, T]: whether each position's exit logits pass the threshold."""
    log_p = nn.log_softmax(logits.astype(jnp.float32))
    if cfg.exit_criterion == "max_prob":
        return jnp.exp(jnp.max(log_p, axis=-1)) >= cfg.exit_threshold
    if cfg.exit_criterion == "softmax_diff":
        top2 = jnp.exp(jax.lax.top_k(log_p, 2)[0])
        return top2[..., 0] - top2[..., 1] >= cfg.exit_threshold
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1) <= cfg.exit_threshold


def run(lm, x, cache, start, key_mask, packed=None):
    """The segments over embeddings x [B, T, D] (lm: the transformer, its `segments` and head) -> (final-norm hidden
    [B, T, D], cache, layers used [B, T]). Exit logits are sown into COLLECTION when it is mutable."""
    cfg = lm.cfg
    exited = jnp.zeros(x.shape[:2], bool)
    layers_used = jnp.full(x.shape[:2], cfg.num_layers, jnp.int32)
    new_cache = {}
    for j, segment in enumerate(lm.segments):
        name = f"segment_{j}"
        (x, exited), new_cache[name] = segment((x, exited), None if cache is None else cache[name], start, key_mask,
                                               packed)
        if j == len(lm.segments) - 1:
            break
        training = lm.is_mutable_collection(COLLECTION)  # every token through every layer, each exit scored
        if training or cfg.exit_threshold:
            logits = lm.logits(lm.final_norm(x))
            lm.sow(COLLECTION, "logits", logits)
            if cfg.exit_threshold and not training:
                leaving = confident(cfg, logits) & ~exited
                layers_used = jnp.where(leaving, (j + 1) * cfg.exit_every, layers_used)
                exited = exited | leaving
    return lm.final_norm(x), None if cache is None else new_cache, layers_used


def segment_names(cfg) -> list[str]:
    return [f"segment_{j}" for j in range(cfg.num_layers // cfg.exit_every)]


def validate(m) -> list[str]:
    """Cross-field problems of the early-exit keys."""
    if not m.exit_every:
        return [f"model.exit_threshold={m.exit_threshold} needs model.exit_every > 0"] if m.exit_threshold else []
    if m.name != "transformer":
        return [f"model.exit_every={m.exit_every} is the transformer's; model.name={m.name!r} needs 0"]
    p = []
    if m.num_layers % m.exit_every:
        p.append(f"model.num_layers={m.num_layers} must be a multiple of model.exit_every={m.exit_every}")
    if m.exit_criterion in ("max_prob", "softmax_diff") and m.exit_threshold > 1:
        p.append(f"model.exit_threshold={m.exit_threshold} is a probability under "
                 f"exit_criterion={m.exit_criterion!r}: 0..1")
    if m.mtp_depth:
        p.append(f"model.mtp_depth={m.mtp_depth} reads the final layer only; early exit (model.exit_every) needs 0")
    return p
