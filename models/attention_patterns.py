"""Which keys a query sees (`model.attention_pattern`): full causal, a sliding window, or Child et al.'s sparse patterns.

For a query at position i and a key at position j (always j <= i):

    causal    every j
    sliding   i - j < W                                        W = model.attention_window (Mistral, Longformer's local)
    strided   i - j < l  or  (i - j) mod l = 0                 l = model.sparse_stride   (Child et al. 2019, images / audio)
    fixed     floor(j / l) = floor(i / l)  or  j mod l >= l - c   c = model.sparse_summary (Child et al., text)

Child et al. give each sparse pattern's two halves to different heads or layers; here every head sees their union
(their "merged" head). Masks are built from absolute positions, so one function masks a full pass, a chunk decoded
after a cache, and a ring buffer whose slots hold positions out of order.

Sliding-window decoding keeps a **ring buffer** of R = min(W, max_len) slots: position p lives in slot p mod R, so
the cache holds R keys and values whatever the length. A chunk of new tokens attends to the ring as it was before
them and to itself; then its last min(T, R) tokens overwrite their slots (`kv_cache.write_ring`).
"""

import jax.numpy as jnp

PATTERNS = ("causal", "sliding", "strided", "fixed")


def visible(cfg, q_positions, k_positions):
    """bool[Lq, Lk]: query at q_positions[a] sees the key at k_positions[b] (a negative key position: an empty slot);
    [B, Lq, Lk] for per-row positions [B, L] (a packed row's documents, models/packing.py)."""
    i, j = q_positions[..., :, None], k_positions[..., None, :]
    seen = (j <= i) & (j >= 0)
    if cfg.attention_pattern == "sliding":
        return seen & (i - j < cfg.attention_window)
    stride = cfg.sparse_stride
    if cfg.attention_pattern == "strided":
        return seen & ((i - j < stride) | ((i - j) % stride == 0))
    if cfg.attention_pattern == "fixed":
        return seen & ((j // stride == i // stride) | (j % stride >= stride - cfg.sparse_summary))
    return seen


def uses_ring(cfg) -> bool:
    return cfg.attention_pattern == "sliding"


def cache_length(cfg, max_len: int) -> int:
    """Slots of a decoding cache for sequences of up to max_len tokens: the window's ring, or every position."""
    return min(cfg.attention_window, max_len) if uses_ring(cfg) else max_len


def ring_positions(start, slots: int):
    """int[slots]: the position each ring slot holds before position `start` is written (negative: still empty),
    the largest p < start with p mod slots = slot."""
    slot = jnp.arange(slots)
    return slot + slots * ((start - 1 - slot) // slots)


def validate(m) -> list[str]:
    """Cross-field problems of the pattern keys."""
    p = []
    if m.attention_pattern == "sliding" and m.attention_window < 1:
        p.append(f"model.attention_pattern='sliding' needs model.attention_window >= 1, got {m.attention_window}")
    if m.attention_pattern != "sliding" and m.attention_window:
        p.append(f"model.attention_window={m.attention_window} is read only by model.attention_pattern='sliding', "
                 f"not {m.attention_pattern!r}")
    if m.attention_pattern in ("strided", "fixed") and m.sparse_stride < 2:
        p.append(f"model.attention_pattern={m.attention_pattern!r} needs model.sparse_stride >= 2, got {m.sparse_stride}")
    if m.attention_pattern == "fixed" and m.sparse_summary > m.sparse_stride:
        p.append(f"model.sparse_summary={m.sparse_summary} must be at most model.sparse_stride={m.sparse_stride}")
    if m.attention_pattern not in ("causal", "sliding") and m.attention_impl != "xla":
        p.append(f"model.attention_pattern={m.attention_pattern!r} needs model.attention_impl='xla' (the flash kernels "
                 "mask causally or by a sliding window)")
    return p
