"""LoRA (Hu et al. 2021) as a transformation of the parameters, so every model family takes adapters unchanged.

For each kernel W whose path matches `train.lora.targets` (fnmatch globs over the '/'-joined path, e.g.
`*attention/query`), a rank-r pair is trained while W stays frozen:

    W' = W + (alpha / r) A B,    A [in, r] ~ N(0, 1 / in),  B [r, out] = 0      (so W' = W at the start)

The kernel's logical axis names say which axes are its input and output: a leading `layers` axis (stacked
layers) is a batch of independent adapters; then the input is the first axis when it is `embed` (projections
out of the residual stream: query, key, value, MLP in, unembedding), else every axis but the last (projections
into it: attention out [heads, head_dim, embed], MLP out [mlp, embed], the embedding [vocab, embed]). A and B carry
those names, so they shard like their kernel.

The adapters live beside the weights, in `params["lora"]` (the kernel's path, then {"a", "b"}); the train
state's apply function merges them into the kernels before every call (`merged`), so training, evaluation,
decoding and every analysis see W', and `experiments.restore` hands out merged weights: a LoRA run's folder
samples and fine-tunes like any other. The optimizer trains `lora/*` only (experiments/optim/optimizers.py's
`train_only`): no optimizer state for the frozen weights.

Adapter dropout (`dropout` = p > 0, on the adapter's input as in the paper and peft) has no merged form, since each
token draws its own mask:

    y = x W + (alpha / r) (m * x / (1 - p)) A B,     m ~ Bernoulli(1 - p) per element, per kernel, per call

so training forward passes (those given a "dropout" rng) run the adapters unmerged: they travel in the "lora"
collection, {"a", "b" (alpha / r folded in), "rate"} per kernel, and the kernels that read it (DROPOUT_SITES:
every attention projection of gqa / qk_norm attention, every MLP kernel: `models.layers.lora_delta`) add the
branch; evaluation and decoding stay merged.
"""

import dataclasses
import fnmatch
import math

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from data.config_fields import field
from models import blocks

KEY = "lora"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """`config.train.lora`: rank 0 trains every parameter as usual."""

    rank: int = field(0, min=0)
    alpha: float = field(16.0, above=0)  # the update is alpha / rank * A B
    targets: str = "*attention/query,*attention/value"  # fnmatch globs over parameter paths (the paper: W_q, W_v)
    dropout: float = field(0.0, min=0, below=1)  # on the adapter's input, training only (the kernels of DROPOUT_SITES)


DROPOUT_SITES = ("*attention/query", "*attention/key", "*attention/value", "*attention/out", "*/wi/kernel",
                 "*/wg/kernel", "*/wo/kernel")  # the kernels that read the unmerged "lora" collection


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _split(names: tuple, shape: tuple) -> tuple[int, tuple, tuple]:
    """(stacked axes, input axes, output axes) of a kernel by its logical names."""
    stacked = 1 if names and names[0] == "layers" else 0
    inputs = 1 if names[stacked] == "embed" else len(names) - stacked - 1
    return stacked, tuple(range(stacked, stacked + inputs)), tuple(range(stacked + inputs, len(names)))


def targeted(boxed_params, targets: str) -> dict:
    """{path: (names, shape)} of the kernels the globs in `targets` select (matrices and beyond only)."""
    patterns = [t.strip() for t in targets.split(",") if t.strip()]
    found = {}
    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=is_boxed)[0]:
        name = _path(path)
        if is_boxed(leaf) and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            stacked, _, _ = _split(tuple(leaf.names), leaf.value.shape)
            if len(leaf.value.shape) - stacked >= 2:
                found[name] = (tuple(leaf.names), tuple(leaf.value.shape))
    return found


def add_adapters(boxed_params: dict, config: LoRAConfig, rng) -> dict:
    """The parameters with params["lora"] holding a boxed pair per targeted kernel: A [*L, in, r], B [*L, r, out]
    (the kernel's input and output axes flattened; an axis keeps its logical name when it is the only one)."""
    adapters = {}
    for i, (name, (names, shape)) in enumerate(sorted(targeted(boxed_params, config.targets).items())):
        stacked, inputs, outputs = _split(names, shape)
        fan_in, fan_out = math.prod(shape[k] for k in inputs), math.prod(shape[k] for k in outputs)
        one_name = lambda axes: names[axes[0]] if len(axes) == 1 else None  # noqa: E731
        a = jax.random.normal(jax.random.fold_in(rng, i), (*shape[:stacked], fan_in, config.rank)) / math.sqrt(fan_in)
        node = adapters
        for part in name.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[name.split("/")[-1]] = {
            "a": nn.LogicallyPartitioned(a, (*names[:stacked], one_name(inputs), None)),
            "b": nn.LogicallyPartitioned(jnp.zeros((*shape[:stacked], config.rank, fan_out)), (*names[:stacked], None,
                                                                                     one_name(outputs)))}
    if not adapters:
        raise ValueError(f"train.lora.targets={config.targets!r} matches no kernel")
    if config.dropout and (unread := [n for n in sorted(targeted(boxed_params, config.targets))
                                      if not any(fnmatch.fnmatchcase(n, p) for p in DROPOUT_SITES)]):
        raise ValueError(f"train.lora.dropout={config.dropout} needs every target among {list(DROPOUT_SITES)}; "
                         f"{unread[0]!r} is not (narrow train.lora.targets or set train.lora.dropout=0)")
    return {**boxed_params, KEY: adapters}


def adapters_paths(adapters: dict) -> list[str]:
    """The '/'-joined kernel paths of an adapter tree (params["lora"])."""
    return sorted({_path(p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]})


def problems(config) -> list[str]:
    """Cross-field problems of `config.train.lora` (adapter dropout needs projections that read it unmerged)."""
    lora_config = config.train.get("lora", {})
    kind = blocks.ATTENTIONS.get(config.model.get("attention"))
    if lora_config.get("rank") and lora_config.get("dropout") and not (kind and kind.lora_dropout):
        return [f"train.lora.dropout={lora_config['dropout']} needs model.attention in "
                f"{[name for name, k in blocks.ATTENTIONS.items() if k.lora_dropout]}, "
                f"not {config.model.get('attention')!r} (its projections read only merged adapters)"]
    return []


def merged(params: dict, alpha: float) -> dict:
    """The parameters without params["lora"], each targeted kernel W replaced by W + (alpha / r) A B."""
    if KEY not in params:
        return params
    adapters = set(adapters_paths(params[KEY]))

    def merge(path, kernel):
        name = _path(path)
        if name not in adapters:
            return kernel
        pair = params[KEY]
        for part in name.split("/"):
            pair = pair[part]
        update = (alpha / pair["a"].shape[-1]) * (pair["a"] @ pair["b"])  # [*L, in, out]
        return kernel + update.reshape(kernel.shape).astype(kernel.dtype)

    return jax.tree_util.tree_map_with_path(merge, {k: v for k, v in params.items() if k != KEY})


def unmerged(params: dict, alpha: float, rate: float) -> dict:
    """The "lora" collection: per kernel {"a" [*L, in, r], "b" (alpha / r) B [*L, r, out], "rate" [*L]}."""

    def entry(pair):
        stacked = pair["a"].shape[:-2]
        return {"a": pair["a"], "b": (alpha / pair["a"].shape[-1]) * pair["b"], "rate": jnp.full(stacked, rate)}

    return jax.tree.map(entry, params[KEY], is_leaf=lambda node: isinstance(node, dict) and "a" in node)


@dataclasses.dataclass(frozen=True)
class MergedApply:
    """model.apply with the adapters merged into the kernels first, or, for a call given a "dropout" rng when
    `dropout` > 0 (training), unmerged in the "lora" collection (a value, so that train states built twice carry
    equal apply functions)."""

    apply: Callable
    alpha: float
    dropout: float = 0.0

    def __call__(self, variables, *args, **kwargs):
        params = variables["params"]
        if self.dropout and "dropout" in (kwargs.get("rngs") or {}):
            base = {k: v for k, v in params.items() if k != KEY}
            return self.apply({**variables, "params": base, KEY: unmerged(params, self.alpha, self.dropout)},
                              *args, **kwargs)
        return self.apply({**variables, "params": merged(params, self.alpha)}, *args, **kwargs)


def optimizer_config(config):
    """`config.optimizer`, training only the adapters when `config.train.lora.rank` > 0."""
    if not config.train.get("lora", {}).get("rank"):
        return config.optimizer
    opt = config.optimizer.copy_and_resolve_references()
    with opt.unlocked():
        opt.train_only = f"{KEY}/*"
    return opt
