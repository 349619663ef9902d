"""Packed rows: several documents in one row of T tokens, told apart by segment ids (data.packing builds them).

    segment_ids  int32[B, T]   1, 2, ... per document in the row, 0 for padding
    positions    int32[B, T]   0, 1, ... restarting at every document

Given them, a model computes each document of a row as it computes that document alone:

    attention      query t sees key s only if segment_ids[t] = segment_ids[s] (and its pattern lets it);
                   RoPE rotates by `positions`, learned and sinusoidal tables are read at `positions`; ALiBi and
                   T5 biases depend on t - s only, which inside one document is the same in the row as alone
    recurrences    SSD / Mamba-2, Mamba-1 and linear attention, H_t = exp(a_t) H_{t-1} + ..., forget the previous
                   document at each document's first token: a_t = RESET there, so exp(a_t) = 0
    convolutions   a causal conv's tap at lag j reads position t - j only if it is in t's document

Padding (segment 0) forms one more segment: what it computes is never scored. Routing that is per row (MoE's
capacity, Mixture-of-Depths' and Mixture-of-Recursions' top-k) still sees the whole row: a packed document's
logits equal its logits alone there only when nothing is dropped (MoE with dispatch "dense" or enough capacity).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

RESET = -1e30  # a log decay whose exp is 0: finite, so sums of a_k (SSD's segsum) never meet inf - inf
PALLAS_SSD = ("model.ssd_impl='pallas' takes decays as differences of prefix sums, which a packed row's state resets "
              "would cancel; use model.ssd_impl='chunked' (or 'associative_scan', 'sequential') with packed rows")


class Segments(NamedTuple):
    ids: jax.Array  # int32[B, T]
    positions: jax.Array  # int32[B, T]


def make(segment_ids, positions):
    """The model's `segment_ids` / `positions` arguments -> Segments, or None for one document per row."""
    if segment_ids is None and positions is None:
        return None
    if segment_ids is None or positions is None:
        raise ValueError("segment_ids and positions come together (both int32[B, T]) or not at all")
    if segment_ids.shape != positions.shape or segment_ids.ndim != 2:
        raise ValueError(f"segment_ids {segment_ids.shape} and positions {positions.shape} must both be [B, T]")
    return Segments(jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32))


def same_segment(segments: Segments):
    """bool[B, T, T]: token t and token s are in the same document."""
    return segments.ids[:, :, None] == segments.ids[:, None, :]


def starts(segments: Segments):
    """bool[B, T]: the token opens a segment (the row's first token, or its id differs from its predecessor's)."""
    ids = segments.ids
    return jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def reset_decay(a, segments):
    """Log decays a [B, T, ...] with RESET at every segment's first token (unchanged for segments=None)."""
    if segments is None:
        return a
    opens = starts(segments).reshape(*segments.ids.shape, *(1,) * (a.ndim - 2))
    return jnp.where(opens, RESET, a)


def same_segment_at_lag(segments: Segments, lag: int):
    """bool[B, T]: position t - lag exists and is in t's document (lag 0: always)."""
    ids = segments.ids
    if lag == 0:
        return jnp.ones_like(ids, bool)
    earlier = jnp.pad(ids, ((0, 0), (lag, 0)), constant_values=-1)[:, :ids.shape[1]]
    return earlier == ids


def problems(m) -> list[str]:
    """Why config.model `m` cannot train on packed rows (data.packing), as one-line messages."""
    p = []
    if m.name == "coconut":
        p.append("model.name='coconut' reads one question per row (its thoughts start at model.bot_position); train it "
                 "on a reasoning dataset, not on packed rows")
    if m.get("mtp_depth"):
        p.append(f"model.mtp_depth={m.mtp_depth} reads tokens across a packed row's document boundaries; use 0 with "
                 "packed rows")
    if m.get("ssd_impl") == "pallas" and "S" in m.get("layer_pattern", ""):
        p.append(PALLAS_SSD)
    if m.name == "mor" and m.get("kv_sharing") == "share" and m.get("attention_pattern") == "sliding":
        p.append("model.kv_sharing='share' with model.attention_pattern='sliding' keeps the shared keys in a ring that "
                 "cannot tell a packed row's documents apart; use kv_sharing='recursion' or another pattern")
    return p
