"""Mixture-of-Depths (`model.name = "mod"`; Raposo et al. 2024): every `route_every`-th block processes only the top
`capacity` fraction of each sequence's tokens; the others ride the residual stream past it.

    period = (route_every - 1) plain blocks, then one routed block        scanned num_layers / route_every times
    routed block:  r_i = w . x_i                                          a linear router: one score per token
                   S = top-k_i(r),  k = max(1, round(capacity T))         per sequence (training: looks ahead)
                   x_i <- x_i + r_i (f(x_S)_i - x_i)   for i in S         f: the block on the gathered tokens,
                   x_i <- x_i                          otherwise              at their own positions (RoPE)
    predictor:     p_i = w_2 . relu(W_1 stopgrad(x_i)),  BCE(p_i, [i in S]) x predictor_weight   (sown "losses")

The block's update is multiplied by r_i, which puts the router on the gradient path. The block runs on k tokens
(gathered in order, causal among themselves), so its FLOPs are `capacity` of a dense block's.

Top-k over the sequence reads future tokens, which sampling cannot: the paper's remedy is the auxiliary predictor,
trained on top-k membership from the same (stop-gradient) input. Decoding, and a full pass with
`routing = "predictor"`, route token i iff p_i > 0: the block runs on every token, with only routed tokens as keys
(the cache remembers which positions were routed) and only routed tokens updated; the cached decode equals that
full pass. Metrics per routed block: the predictor's agreement with top-k (`predictor_agreement`), the fraction it
routes (`predicted_fraction`), the router's mean |r| on the chosen tokens.

Router tuning: `train.init_from` a transformer run with the same blocks (`from_dense` maps its layers onto the
periods; routers and predictors start fresh) and `optimizer.train_only = "*router*,*predictor*"`.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data.config_fields import field
from models import blocks, layers, lm, packing, transformer

ROUTINGS = ("topk", "predictor")
ROUTED = "routed"  # the routed block's name in each period


@dataclasses.dataclass(frozen=True)
class MoDConfig(transformer.TransformerConfig):
    """The transformer's keys and where and how much Mixture-of-Depths routes."""

    name: str = "mod"
    capacity: float = field(0.125, above=0, max=1)  # the fraction of each sequence's tokens a routed block processes
    route_every: int = field(2, min=1)  # every route_every-th block is routed (the paper: 2); 1: every block
    routing: str = field("topk", choices=ROUTINGS)  # full passes: top-k (training) or the causal predictor
    predictor_hidden: int = field(0, min=0)  # the predictor MLP's width; 0: d_model // 2
    predictor_weight: float = field(0.1, min=0)  # its BCE's weight in the loss (its input is stop-gradient)


def capacity_tokens(capacity: float, length: int) -> int:
    """k: the tokens of a length-T sequence a routed block processes."""
    return max(1, min(length, int(round(capacity * length))))


def gathered_update(x, weight, chosen_idx, key_mask, run, segments=None, subtract_input: bool = True):
    """x_i + weight_i (f(x_S)_i - x_i) at the positions chosen_idx [B, k] (increasing), x_i elsewhere (without
    `subtract_input`: x_i + weight_i f(x_S)_i): f = run(x_S, its key mask or None, its packed-row segments or None,
    its positions [B, k]) on the gathered tokens; weight [B, T] float32."""
    xs = jnp.take_along_axis(x, chosen_idx[..., None], axis=1)
    keys = None if key_mask is None else jnp.take_along_axis(key_mask, chosen_idx, axis=1)
    if segments is None:
        ys = run(xs, keys, None, chosen_idx)
    else:  # the chosen tokens keep their documents and their positions in them
        chosen = packing.Segments(*(jnp.take_along_axis(t, chosen_idx, axis=1) for t in segments))
        ys = run(xs, keys, chosen, chosen.positions)
    update = jnp.take_along_axis(weight, chosen_idx, axis=1)[..., None] * (
        ys - xs if subtract_input else ys).astype(jnp.float32)
    rows = jnp.arange(x.shape[0])[:, None]
    return x + jnp.zeros(x.shape, jnp.float32).at[rows, chosen_idx].add(update).astype(x.dtype)


class RoutedBlock(nn.Module):
    """One block behind a router (and the predictor that stands in for top-k when decoding)."""

    cfg: MoDConfig

    def setup(self):
        cfg = self.cfg
        self.router = nn.Dense(1, use_bias=False, dtype=jnp.float32, kernel_init=layers.dense_init("embed", None))
        hidden = cfg.predictor_hidden or max(1, cfg.d_model // 2)
        self.predictor_in = nn.Dense(hidden, dtype=jnp.float32, kernel_init=layers.dense_init("embed", None),
                                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
        self.predictor_out = nn.Dense(1, dtype=jnp.float32, kernel_init=layers.dense_init(None, None),
                                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
        self.block = blocks.Block(cfg)

    def scores(self, x):
        """(router scores r [B, T], predictor logits p [B, T]), float32."""
        r = self.router(x.astype(jnp.float32))[..., 0]
        p = self.predictor_out(nn.relu(self.predictor_in(jax.lax.stop_gradient(x).astype(jnp.float32))))[..., 0]
        return r, p

    def gathered(self, x, r, chosen_idx, key_mask=None, segments=None):
        """The top-k form: the block on the tokens at chosen_idx [B, k] (increasing), their updates scaled by r."""
        return gathered_update(x, r, chosen_idx, key_mask, lambda xs, keys, segs, at: self.block(
            xs, None, 0, keys, segments=segs, positions=at)[0], segments)

    def masked(self, x, r, routed, cache=None, start=0, key_mask=None, segments=None):
        """The causal form: the block on every token, only routed ones [B, T] as keys and updated. With a cache
        ({"block", "routed": bool[B, max_len]}) the decisions of earlier positions come from it."""
        if cache is None:
            keys = routed if key_mask is None else routed & key_mask
            y, block_cache = self.block(x, None, start, keys, segments)
        else:
            history = jax.lax.dynamic_update_slice(cache[ROUTED], routed, (0, start))
            keys = history if key_mask is None else history & key_mask
            y, block_cache = self.block(x, cache["block"], start, keys)
            cache = {"block": block_cache, ROUTED: history}
        update = jnp.where(routed[..., None], r[..., None] * (y - x).astype(jnp.float32), 0.0)
        return x + update.astype(x.dtype), cache

    def __call__(self, x, cache, start, key_mask=None, segments=None):
        cfg = self.cfg
        r, p = self.scores(x)
        if cache is not None or cfg.routing == "predictor":
            return self.masked(x, r, p > 0, cache, start, key_mask, segments)
        _, chosen_idx = jax.lax.top_k(r, capacity_tokens(cfg.capacity, x.shape[1]))
        chosen_idx = jnp.sort(chosen_idx, axis=-1)
        chosen = jnp.zeros(r.shape, bool).at[jnp.arange(r.shape[0])[:, None], chosen_idx].set(True)
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(p, chosen.astype(jnp.float32)))
        self.sow("losses", "predictor_bce", cfg.predictor_weight * bce)
        self.sow("metrics", "predictor_bce", bce)
        self.sow("metrics", "predictor_agreement", jnp.mean(((p > 0) == chosen).astype(jnp.float32)))
        self.sow("metrics", "predicted_fraction", jnp.mean((p > 0).astype(jnp.float32)))
        return self.gathered(x, r, chosen_idx, key_mask, segments), None

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype):
        return {"block": blocks.Block.init_cache(cfg, batch, max_len, dtype), ROUTED: jnp.zeros((batch, max_len), bool)}


class MoDTransformer(lm.LM):
    cfg: MoDConfig

    @staticmethod
    def active_share(cfg, path: tuple) -> float:
        return routed_share(path, cfg.capacity)

    @staticmethod
    def from_family(source: str, params: dict, cfg) -> dict:
        """A transformer run's blocks as the periods (router tuning); the routers start fresh."""
        return from_dense(params, cfg.route_every) if source == "transformer" else None

    @staticmethod
    def starts_fresh(source: str, path: str) -> bool:
        return source == "transformer" and is_routing_parameter(path)

    def unit(self):
        plain = tuple((f"block_{i}", blocks.Block, ()) for i in range(self.cfg.route_every - 1))
        return blocks.Period, {"members": (*plain, (ROUTED, RoutedBlock, ()))}

    @property
    def num_units(self) -> int:
        return self.cfg.num_layers // self.cfg.route_every


ROUTING_PARAMETERS = ("router", "predictor_in", "predictor_out")


def from_dense(params: dict, route_every: int) -> dict:
    """A transformer's parameters (blocks stacked [L, ...] under "layers") in an MoD's layout with the same blocks:
    layer u * route_every + i becomes period u's block_i, the last one the routed block's "block". The routers and
    predictors (ROUTING_PARAMETERS) are not there: they start fresh (experiments/training/warm_start.py)."""
    periods = jax.tree.map(lambda w: w.reshape(w.shape[0] // route_every, route_every, *w.shape[1:]), params["layers"])
    unit = {f"block_{i}": jax.tree.map(lambda w, i=i: w[:, i], periods) for i in range(route_every - 1)}
    unit[ROUTED] = {"block": jax.tree.map(lambda w: w[:, -1], periods)}
    return {**params, "layers": unit}


def is_routing_parameter(path: str) -> bool:
    """Whether a parameter path (a jax.tree_util.keystr, as experiments/training/warm_start.py compares) is a router's or
    predictor's."""
    return any(f"['{name}']" in path for name in ROUTING_PARAMETERS)


def validate(m) -> list[str]:
    """Cross-field problems of an MoD config.model."""
    p = transformer.validate(m)
    if m.num_layers % m.route_every:
        p.append(f"model.num_layers={m.num_layers} must be a multiple of model.route_every={m.route_every}")
    return p + gathering_problems(m, "MoD")


def gathering_problems(m, family: str) -> list[str]:
    """What blocks run on gathered tokens (a subsequence at its own positions: MoD, models/mor.py) cannot have."""
    p = []
    if m.attention in blocks.ATTENTIONS and not blocks.ATTENTIONS[m.attention].positions_per_row:
        gathered = [name for name, kind in blocks.ATTENTIONS.items() if kind.positions_per_row]
        p.append(f"model.attention={m.attention!r} cannot run on gathered tokens; {family} needs one of {gathered}")
    if m.positional in ("alibi", "t5"):
        p.append(f"model.positional={m.positional!r} biases scores by position, which the gathered block does not "
                 "pass on; use 'rope', 'learned', 'sinusoidal' or 'none'")
    if m.attention_pattern != "causal":
        p.append(f"model.attention_pattern={m.attention_pattern!r} would apply to the gathered order, not positions; "
                 f"{family} needs 'causal'")
    if m.short_conv:
        p.append(f"model.short_conv={m.short_conv} would convolve gathered tokens as neighbours; {family} needs 0")
    return p


def routed_share(path: tuple, capacity: float) -> float:
    """The fraction of tokens a parameter at `path` (keys) processes: `capacity` inside a routed block, else 1."""
    keys = [getattr(k, "key", k) for k in path]
    return capacity if ROUTED in keys and "block" in keys else 1.0
