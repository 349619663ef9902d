"""Mixture-of-Recursions (`model.name = "mor"`; Bae et al. 2025): a shared stack of layers applied up to
`recursions` (N_r) times, a router choosing how many times for each token.

    x = First(x_0)                                 unshared first block (middle-cycle sharing)
    for r = 1..N_r:  x <- x + g_r (F(x) - x)  on the tokens active at recursion r, x unchanged elsewhere
                     (expert-choice with `expert_update = "reference"`: x <- x + g_r F(x), below)
    logits = norm(Last(x)) U                        unshared last block
    F: the shared stack, num_layers - 2 blocks, the same parameters at every recursion

Routers (`router`):
- "expert" (expert-choice, hierarchical): recursion 1 takes every token; at recursion r >= 2 a linear router
  s_i = w_r . x_i picks, among the tokens active at r - 1, the top k_r = round(c_r T) of each sequence,
  c_r = (N_r - r + 1) / N_r (3/3, 2/3, 1/3 for N_r = 3), and g_r = sigmoid(s_i). Top-k reads future tokens,
  so an auxiliary loss (`router_weight` x BCE(s_i, [i chosen]) over the eligible tokens) teaches the router
  to decide alone: decoding, and full passes with `routing = "threshold"`, keep token i iff s_i > 0.
  `expert_update = "reference"` is the update of Bae et al.'s code instead: a router at every recursion,
  recursion 1's included (it keeps every token, c_1 = 1, and has no BCE: there is nothing to choose), and
  x <- x + alpha sigmoid(s_i) F(x) with F's output including its residual (alpha = `router_alpha`, 0.1),
  where "delta" (the default) interpolates, x + sigmoid(s_i) (F(x) - x), and leaves recursion 1 ungated.
- "token" (token-choice): after the first block a router p = softmax(W x_i) over N_r depths gives each token
  its depth d_i = argmax p (causal from the start); g = 1 on recursions before d_i and p_{d_i} on the last
  one (the router's path to the gradient), with the switch-style balancing loss
  `router_weight` x N_r sum_j f_j P_j (f_j: the fraction of tokens at depth j, P_j: the mean p_j).

KV strategies (`kv_sharing`):
- "recursion" (recursion-wise caching): at recursion r the shared layers attend only among tokens active at r;
  decoding keeps one cache per recursion and layer (and which positions were active at each recursion).
- "share" (recursive KV sharing): every token runs recursion 1, whose keys and values every later recursion's
  queries attend to; one cache per shared layer.

Training with expert-choice top-k and recursion-wise caching runs each recursion on its k_r tokens only,
gathered at their own positions (RoPE), like models/mod.py. The other combinations, threshold routing and
decoding run the shared stack on every token and mask the keys and updates (the same values; no FLOPs
saved), except that decoding skips a recursion (`lax.cond`) when no token of the batch is active in it;
decoding with the cache equals that full pass.

FLOPs: a token runs the shared stack sum_r c_r = (N_r + 1) / 2 times on average (expert-choice by
construction, token-choice at balance); `active_share` counts the shared parameters that many times.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data.config_fields import field
from models import blocks, layers, lm, mod, transformer

ROUTERS = ("expert", "token")
EXPERT_UPDATES = ("delta", "reference")
ROUTINGS = ("topk", "threshold")
KV_SHARING = ("recursion", "share")
ACTIVE = "active"  # the decoding cache's record of the positions active at each recursion: bool[B, N_r, max_len]


@dataclasses.dataclass(frozen=True)
class MoRConfig(transformer.TransformerConfig):
    """The transformer's keys (num_layers: the unique blocks, first + shared + last) and the recursion's."""

    name: str = "mor"
    num_layers: int = field(3, min=3)
    recursions: int = field(3, min=1)  # N_r: the most times a token runs the shared stack
    router: str = field("expert", choices=ROUTERS)  # expert-choice (hierarchical top-k) or token-choice (a depth)
    routing: str = field("topk", choices=ROUTINGS)  # expert-choice full passes: top-k (training) or the threshold
    kv_sharing: str = field("recursion", choices=KV_SHARING)  # per-recursion caches, or recursion 1's for all
    router_weight: float = field(0.1, min=0)  # the expert router's BCE, or the token router's balancing loss
    expert_update: str = field("delta", choices=EXPERT_UPDATES)  # expert-choice: x + g (F(x) - x) | x + g F(x)
    router_alpha: float = field(0.1, above=0)  # "reference": g = alpha sigmoid(s)


def capacities(recursions: int) -> tuple[float, ...]:
    """c_r = (N_r - r + 1) / N_r, r = 1..N_r: the fraction of tokens expert-choice keeps at recursion r."""
    return tuple((recursions - r) / recursions for r in range(recursions))


def mean_recursions(recursions: int) -> float:
    """sum_r c_r = (N_r + 1) / 2: the shared stack's runs per token on average."""
    return (recursions + 1) / 2


class MoRTransformer(lm.LM):
    cfg: MoRConfig

    @staticmethod
    def active_share(cfg, path: tuple) -> float:
        return active_share(path, cfg.recursions)

    def unit(self):
        return None

    def setup(self):
        super().setup()
        cfg = self.cfg
        self.first = blocks.Block(cfg, name="first")
        self.shared = [blocks.Block(cfg, name=f"shared_{j}") for j in range(cfg.num_layers - 2)]
        self.last = blocks.Block(cfg, name="last")
        dense = lambda width, name: nn.Dense(width, use_bias=False, dtype=jnp.float32, name=name,  # noqa: E731
                                             kernel_init=layers.dense_init("embed", None))
        if cfg.router == "expert":  # the router deciding recursion r + 1 (the reference form gates recursion 1 too)
            first = 0 if cfg.expert_update == "reference" else 1
            self.routers = {r: dense(1, f"router_{r}") for r in range(first, cfg.recursions)}
        else:
            self.depth_router = dense(cfg.recursions, "depth_router")

    def shared_stack(self, x, caches, start, key_mask, positions=None, reuse_cache=False, segments=None):
        """F: the shared blocks in order; caches: None or {"shared_j": block cache}."""
        new = {}
        for j, block in enumerate(self.shared):
            name = f"shared_{j}"
            x, new[name] = block(x, None if caches is None else caches[name], start, key_mask, segments,
                                   positions=positions, reuse_cache=reuse_cache)
        return x, None if caches is None else new

    def hidden(self, x, cache=None, start=0, key_mask=None, segments=None):
        h, cache, _ = self.run(x, cache, start, key_mask, segments)
        return h, cache

    def run(self, x, cache, start, key_mask, segments=None):
        """(final-norm hidden, cache, each position's recursion count int32[B, T])."""
        cfg = self.cfg
        x, first_cache = self.first(x, None if cache is None else cache["first"], start, key_mask, segments)
        if cfg.router == "expert" and cfg.routing == "topk" and cfg.kv_sharing == "recursion" and cache is None:
            x, depth = self.gathered_recursions(x, key_mask, segments)
            recursion_caches, history = None, None
        else:
            x, recursion_caches, history, depth = self.masked_recursions(x, cache, start, key_mask, segments)
        x, last_cache = self.last(x, None if cache is None else cache["last"], start, key_mask, segments)
        if cache is not None:
            cache = {"first": first_cache, "last": last_cache, "recursions": recursion_caches, ACTIVE: history}
        return self.final_norm(x), cache, depth

    def gathered_recursions(self, x, key_mask, segments=None):
        """Expert-choice top-k: recursion r runs F on its k_r chosen tokens only (chosen among r - 1's).
        Returns (x, each token's recursion count)."""
        reference = self.cfg.expert_update == "reference"
        y, _ = self.shared_stack(x, None, 0, key_mask, segments=segments)
        x = x + self.gate(0, x)[..., None].astype(x.dtype) * y if reference else y
        eligible = jnp.ones(x.shape[:2], bool)
        depth = jnp.ones(x.shape[:2], jnp.int32)
        for r in range(1, self.cfg.recursions):
            score = self.routers[r](x.astype(jnp.float32))[..., 0]
            chosen_idx, chosen = self.top_k_choice(r, score, eligible)
            x = mod.gathered_update(x, self.gate(r, x, score), chosen_idx, key_mask, lambda xs, keys, segs, at:
                                    self.shared_stack(xs, None, 0, keys, positions=at, segments=segs)[0], segments,
                                    subtract_input=not reference)
            eligible, depth = chosen, depth + chosen
        return x, depth

    def gate(self, r, x, score=None):
        """float32[B, T]: expert-choice's g at recursion r + 1 (0-based r): sigmoid(s), or alpha sigmoid(s) for the
        reference update, whose recursion 1 has a router too (`score`: its s, computed here when None)."""
        if score is None:
            score = self.routers[r](x.astype(jnp.float32))[..., 0]
        g = jax.nn.sigmoid(score)
        return self.cfg.router_alpha * g if self.cfg.expert_update == "reference" else g

    def top_k_choice(self, r, score, eligible):
        """Recursion r + 1's top k_r = round(c_{r+1} T) eligible tokens by score: (their positions int[B, k] in
        increasing order, bool[B, T]); sows the router's statistics."""
        k = mod.capacity_tokens(capacities(self.cfg.recursions)[r], score.shape[1])
        chosen_idx = jnp.sort(jax.lax.top_k(jnp.where(eligible, score, -jnp.inf), k)[1], axis=-1)
        chosen = jnp.zeros(eligible.shape, bool).at[jnp.arange(score.shape[0])[:, None], chosen_idx].set(True)
        self.router_statistics(r, score, eligible, chosen)
        return chosen_idx, chosen

    def expert_choice(self, r, score, eligible, causal):
        """bool[B, T]: the tokens recursion r + 1 keeps: top-k_r of the eligible ones, or, when `causal` (decoding)
        or routing = "threshold", those eligible with s > 0."""
        if causal or self.cfg.routing == "threshold":
            return eligible & (score > 0)
        return self.top_k_choice(r, score, eligible)[1]

    def router_statistics(self, r, score, eligible, chosen):
        """Sows the expert router's BCE on top-k membership (over eligible tokens) and how often s > 0 agrees."""
        weight = eligible.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(weight), 1.0)
        bce = jnp.sum(weight * optax.sigmoid_binary_cross_entropy(score, chosen.astype(jnp.float32))) / count
        self.sow("losses", f"router_bce_{r}", self.cfg.router_weight * bce)
        self.sow("metrics", f"router_bce_{r}", bce)
        self.sow("metrics", f"router_agreement_{r}", jnp.sum(weight * ((score > 0) == chosen)) / count)

    def token_depths(self, x):
        """Token-choice: (depth d_i in 1..N_r [B, T], the router's probability of it [B, T]); sows the balance."""
        cfg = self.cfg
        probs = jax.nn.softmax(self.depth_router(x.astype(jnp.float32)), axis=-1)
        choice = jnp.argmax(probs, axis=-1)
        if self.is_mutable_collection("losses"):
            fraction = jnp.mean(jax.nn.one_hot(choice, cfg.recursions), axis=(0, 1))
            balance = cfg.recursions * jnp.sum(fraction * jnp.mean(probs, axis=(0, 1)))
            self.sow("losses", "router_balance", cfg.router_weight * balance)
            self.sow("metrics", "router_balance", balance)
            self.sow("metrics", "depth_fraction", fraction)
        return choice + 1, jnp.take_along_axis(probs, choice[..., None], axis=-1)[..., 0]

    def masked_recursions(self, x, cache, start, key_mask, segments=None):
        """Every recursion runs F on all tokens, keys and updates masked to the active ones. With a cache the
        earlier positions' activity comes from it. Returns (x, recursion caches, activity history, recursion counts)."""
        cfg = self.cfg
        active = jnp.ones(x.shape[:2], bool)
        gate = jnp.ones(x.shape[:2], jnp.float32)
        runs = jnp.zeros(x.shape[:2], jnp.int32)
        if cfg.router == "token":
            depth, depth_gate = self.token_depths(x)
        caches, history = [], None if cache is None else cache[ACTIVE]
        if cfg.kv_sharing == "share":  # recursion 1 writes its keys and values where the later ones read them
            first_kv = self.empty_shared_cache(x) if cache is None else cache["recursions"][0]
        reference = cfg.router == "expert" and cfg.expert_update == "reference"
        for r in range(cfg.recursions):
            if r and cfg.router == "expert":
                score = self.routers[r](x.astype(jnp.float32))[..., 0]
                active, gate = self.expert_choice(r, score, active, causal=cache is not None), self.gate(r, x, score)
            elif reference:  # recursion 1: every token, gated by its own router
                gate = self.gate(0, x)
            elif cfg.router == "token":
                active, gate = depth > r, jnp.where(depth == r + 1, depth_gate, 1.0)
            keys = active
            if history is not None:
                history = jax.lax.dynamic_update_slice(history, active[:, None], (0, r, start))
                keys = history[:, r]
            skippable = cache is not None and r > 0  # decoding: no token of the batch active, nothing to run
            if cfg.kv_sharing == "share":
                y, written = self.recursion(x, first_kv, start, key_mask, r > 0, active if skippable else None, segments)
                if r == 0:
                    caches, first_kv = [written], written
            else:
                layer_caches = None if cache is None else cache["recursions"][r]
                keys = keys if key_mask is None else keys & key_mask
                y, written = self.recursion(x, layer_caches, start, keys, False, active if skippable else None, segments)
                caches.append(written)
            change = y if reference else y - x
            update = jnp.where(active[..., None], gate[..., None] * change.astype(jnp.float32), 0.0)
            x, runs = x + update.astype(x.dtype), runs + active
        return x, None if cache is None else tuple(caches), history, runs

    def recursion(self, x, caches, start, keys, reuse_cache, skip_unless=None, segments=None):
        """F(x) with its caches; with `skip_unless` (bool[B, T]), only when one of its tokens is active (a
        `lax.cond`: decoding then saves the recursion's compute; skipped positions are inactive, so the caches
        they leave unwritten are never read)."""
        if skip_unless is None:
            return self.shared_stack(x, caches, start, keys, reuse_cache=reuse_cache, segments=segments)
        return nn.cond(jnp.any(skip_unless),
                       lambda module, x, c: module.shared_stack(x, c, start, keys, reuse_cache=reuse_cache,
                                                                segments=segments),
                       lambda module, x, c: (x, c), self, x, caches)

    def empty_shared_cache(self, x):
        """A cache for recursion 1's keys and values over this pass's positions (recursive KV sharing)."""
        one = blocks.Block.init_cache(self.cfg, x.shape[0], x.shape[1], self.cfg.compute_dtype)
        return {f"shared_{j}": one for j in range(len(self.shared))}

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        cfg = self.cfg
        block = blocks.Block.init_cache(cfg, batch, max_len, dtype)
        stack = {f"shared_{j}": block for j in range(cfg.num_layers - 2)}
        copies = 1 if cfg.kv_sharing == "share" else cfg.recursions
        return {"first": block, "last": block, "recursions": (stack,) * copies,
                ACTIVE: jnp.zeros((batch, cfg.recursions, max_len), bool)}

    def recursion_depths(self, tokens):
        """int32[B, T]: the recursions each position runs in a full pass (1..N_r)."""
        return self.run(self.embed_tokens(tokens), None, 0, None)[2]


def active_share(path: tuple, recursions: int) -> float:
    """How many times a token uses the parameter at `path` (keys) on average: (N_r + 1) / 2 in the shared stack."""
    keys = [getattr(k, "key", k) for k in path]
    return mean_recursions(recursions) if keys and str(keys[0]).startswith("shared_") else 1.0


def validate(m) -> list[str]:
    """Cross-field problems of an MoR config.model."""
    p = transformer.validate(m) + mod.gathering_problems(m, "MoR")
    if m.remat != "none":
        p.append(f"model.remat={m.remat!r}: MoR's blocks are not scanned; use 'none'")
    if m.mtp_depth:
        p.append(f"model.mtp_depth={m.mtp_depth}: MoR has no multi-token prediction; use 0")
    return p
