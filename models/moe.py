"""Mixture-of-experts FFN: a router picks k of E SwiGLU experts per token; shared experts see every token.

Routers, with affinities from logits u = x W_r [T, E]:
- "softmax" (Switch / GShard): p = softmax(u); the top-k of p are chosen; gates are the chosen p
  (renormalised over the chosen when `normalise_gates`). Auxiliary loss (Switch Transformer):
      L_aux = alpha * E * sum_i f_i P_i,  f_i = (assignments to i) / (k T),  P_i = mean_t p_{t,i}.
- "sigmoid" (DeepSeek-V3, auxiliary-loss-free balancing): s = sigmoid(u); the top-k of s + b are
  chosen, b a per-expert bias that no gradient trains; gates g = route_scale * s_chosen / sum s_chosen
  (route_scale * s_chosen without `normalise_gates`: DeepSeek's `norm_topk_prob=False`). After each
  training step b_i <- b_i - gamma sign(load_i - mean load) (the load of the step's whole batch);
  b lives in the "router_bias" collection (train state, checkpointed). Optional sequence-wise balance
  loss, per sequence of length L then averaged:
      L_bal = alpha * sum_i f_i P_i,  f_i = E / (k L) * (assignments to i),  P_i = mean_t s_{t,i} / sum_j s_{t,j}.

  Group-limited (node-limited) routing: the E experts form `n_groups` groups; each group is scored by the sum
  of its two best biased scores s + b, and only the experts of the `topk_groups` best groups may be chosen.

Metrics sown per layer: `load` (assignments per expert in the batch), `max_violation`
MaxVio = (max_i load_i - mean load) / mean load, `dropped_fraction` of assignments, and for the
sigmoid router the bias range `bias_min` / `bias_max`.

    y = sum_j g_j FFN_{e_j}(x) + SharedFFN(x)           (models/moe_dispatch.py sends the tokens)
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, moe_dispatch
from data.config_fields import field

ROUTERS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    num_experts: int = field(8, min=1)
    top_k: int = field(2, min=1)
    d_expert: int = field(0, min=0)  # hidden width of each routed expert; 0: d_mlp (smaller = fine-grained experts)
    num_shared_experts: int = field(1, min=0)  # always-active experts of width d_expert, run as one SwiGLU
    router: str = field("sigmoid", choices=ROUTERS)  # softmax (+ auxiliary loss) | sigmoid (DeepSeek-V3 balancing)
    normalise_gates: bool = True  # renormalise the chosen gates to sum 1 (softmax: probabilities; sigmoid: affinities)
    aux_loss_weight: float = field(0.01, min=0)  # alpha of the softmax router's auxiliary loss
    balance_loss_weight: float = field(1e-4, min=0)  # alpha of the sigmoid router's sequence-wise loss; 0: off
    bias_update_rate: float = field(1e-3, min=0)  # gamma of the bias update
    dispatch: str = field("capacity", choices=moe_dispatch.DISPATCHES)  # dense | capacity | ragged
    capacity_factor: float = field(0.0, min=0)  # slots per expert = factor * tokens * k / E per shard; 0: tokens
    n_groups: int = field(1, min=1)  # sigmoid router: groups of experts (DeepSeek-V3: nodes), 1: no restriction
    topk_groups: int = field(1, min=1)  # sigmoid router with n_groups > 1: groups whose experts are eligible
    route_scale: float = field(1.0, above=0)  # sigmoid router: scale of the normalised gates (DeepSeek-V3: 2.5)


def route_softmax(logits, top_k: int, normalise: bool):
    """(experts [T, k], gates [T, k], probabilities [T, E])."""
    probs = jax.nn.softmax(logits, axis=-1)
    gates, experts = jax.lax.top_k(probs, top_k)
    if normalise:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return experts, gates, probs


def route_sigmoid(logits, bias, top_k: int, n_groups: int = 1, topk_groups: int = 1, route_scale: float = 1.0,
                  normalise: bool = True):
    """(experts [T, k], gates [T, k], affinities s [T, E]); the bias only chooses (which groups and experts),
    the unbiased affinities weight (normalised over the chosen when `normalise`)."""
    scores = jax.nn.sigmoid(logits)
    biased = scores + jax.lax.stop_gradient(bias)
    if n_groups > 1:
        grouped = biased.reshape(*biased.shape[:-1], n_groups, -1)  # [T, G, E/G]
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
        _, best_groups = jax.lax.top_k(group_scores, topk_groups)
        eligible = jnp.any(jax.nn.one_hot(best_groups, n_groups, dtype=bool), axis=-2)  # [T, G]
        biased = jnp.where(eligible[..., None], grouped, -jnp.inf).reshape(biased.shape)
    _, experts = jax.lax.top_k(biased, top_k)
    chosen = jnp.take_along_axis(scores, experts, axis=-1)
    if normalise:
        chosen = chosen / jnp.sum(chosen, axis=-1, keepdims=True)
    return experts, route_scale * chosen, scores


def expert_load(experts, num_experts: int):
    """Assignments per expert: experts [..., k] -> float32 [E]."""
    return jnp.sum(jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.float32), axis=0)


def switch_aux_loss(experts, probs, weight: float):
    """alpha * E * sum_i f_i P_i over all tokens (experts [T, k], probs [T, E])."""
    num_experts = probs.shape[-1]
    fraction = expert_load(experts, num_experts) / experts.size
    return weight * num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))


def sequence_balance_loss(experts, scores, weight: float):
    """DeepSeek-V3's sequence-wise loss; experts [B, L, k], scores [B, L, E]."""
    batch, length, top_k = experts.shape
    num_experts = scores.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(1, 2))  # [B, E]
    fraction = counts * num_experts / (top_k * length)
    share = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)  # [B, E]
    return weight * jnp.mean(jnp.sum(fraction * share, axis=-1))


def bias_update(bias, load, rate: float):
    """b_i - gamma sign(load_i - mean load): over-loaded experts get less attractive."""
    return bias - rate * jnp.sign(load - jnp.mean(load))


def max_violation(load):
    """(max load - mean load) / mean load."""
    mean = jnp.mean(load)
    return (jnp.max(load) - mean) / jnp.maximum(mean, 1e-9)


class MoEFfn(nn.Module):
    """The MoE FFN of a block: [B, L, D] -> [B, L, D]."""

    d_model: int
    d_expert: int
    options: MoEOptions
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        opt, (batch, length, d) = self.options, x.shape
        tokens = x.reshape(-1, d)
        router = self.param("router", layers.dense_init("embed", None), (d, opt.num_experts))
        logits = tokens.astype(jnp.float32) @ router  # routing in float32
        if opt.router == "softmax":
            experts, gates, probs = route_softmax(logits, opt.top_k, opt.normalise_gates)
            self.sow("losses", "aux_loss", switch_aux_loss(experts, probs, opt.aux_loss_weight))
        else:
            bias = self.variable("router_bias", "bias", jnp.zeros, (opt.num_experts,))
            experts, gates, scores = route_sigmoid(logits, bias.value, opt.top_k, opt.n_groups, opt.topk_groups,
                                                   opt.route_scale, opt.normalise_gates)
            if opt.balance_loss_weight:
                self.sow("losses", "balance_loss", sequence_balance_loss(
                    experts.reshape(batch, length, -1), scores.reshape(batch, length, -1), opt.balance_loss_weight))
        load = expert_load(experts, opt.num_experts)
        if opt.router == "sigmoid" and self.is_mutable_collection("router_bias") and not self.is_initializing():
            bias.value = bias_update(bias.value, load, opt.bias_update_rate)

        def expert_weights(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,)), axes), shape).astype(self.dtype)

        weights = (expert_weights("w_gate", (opt.num_experts, d, self.d_expert), ("expert", "embed", "mlp")),
                   expert_weights("w_in", (opt.num_experts, d, self.d_expert), ("expert", "embed", "mlp")),
                   expert_weights("w_out", (opt.num_experts, self.d_expert, d), ("expert", "mlp", "embed")))
        if layers.calibrating(self):
            self._record_expert_inputs(tokens.astype(self.dtype), experts, weights)
        y, dropped = moe_dispatch.dispatch(opt.dispatch, tokens.astype(self.dtype), experts,
                                           gates.astype(self.dtype), weights, capacity_factor=opt.capacity_factor)
        y = y.reshape(x.shape)
        if opt.num_shared_experts:
            y = y + layers.Mlp(opt.num_shared_experts * self.d_expert, "swiglu", dtype=self.dtype, name="shared")(x)
        self.sow("metrics", "load", load)
        self.sow("metrics", "max_violation", max_violation(load))
        self.sow("metrics", "dropped_fraction", dropped / experts.size)
        if opt.router == "sigmoid":
            self.sow("metrics", "bias_min", jnp.min(bias.value))
            self.sow("metrics", "bias_max", jnp.max(bias.value))
        return y

    def _record_expert_inputs(self, tokens, experts, weights):
        """Compression's calibration (models/layers.record_input): each expert's kernels see the tokens routed to
        it, and its output kernel their hidden activations (every expert run on every token, so only here)."""
        routed = jnp.sum(jax.nn.one_hot(experts, self.options.num_experts), axis=1).T  # [E, T] in {0, 1}
        each = jnp.broadcast_to(tokens, (self.options.num_experts, *tokens.shape))  # [E, T, D]
        layers.record_input(self, ("w_gate",), each, routed)
        layers.record_input(self, ("w_in",), each, routed)
        layers.record_input(self, ("w_out",), moe_dispatch.expert_hidden(each, *weights[:2]), routed)


def validate(m) -> list[str]:
    """Cross-field problems of the MoE keys of a config.model (each key's range is declared with it)."""
    p = []
    if m.top_k > m.num_experts:
        p.append(f"model.top_k={m.top_k} must be <= model.num_experts={m.num_experts}")
    if m.router != "sigmoid" and (m.n_groups > 1 or m.route_scale != 1.0):
        p.append(f"model.n_groups={m.n_groups} and model.route_scale={m.route_scale} need model.router='sigmoid'")
    if m.n_groups > 1:
        per_group = m.num_experts // m.n_groups
        if m.num_experts % m.n_groups or per_group < 2:
            p.append(f"model.n_groups={m.n_groups} must divide model.num_experts={m.num_experts} into groups of >= 2")
        elif m.topk_groups > m.n_groups or m.top_k > m.topk_groups * per_group:
            p.append(f"model.topk_groups={m.topk_groups} must be <= model.n_groups={m.n_groups} and leave at least "
                     f"model.top_k={m.top_k} eligible experts ({per_group} per group)")
    return p
