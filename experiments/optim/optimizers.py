"""Optimizers by name (`optimizer.name`), each with its own typed keys, and what composes around any of them:
the learning-rate schedule (linear warmup, then constant, cosine, linear, inverse square root or
warmup-stable-decay), which parameters weight decay touches (`optimizer.decay`), global-norm gradient
clipping and Grokfast gradient filtering (experiments/optim/grokfast.py) in front, per-group learning-rate
multipliers by parameter path (`optimizer.lr_multipliers`) after; and around it all, freezing by path
(`optimizer.freeze`, `optimizer.train_only`: frozen parameters get no update and no optimizer state).

    config.optimizer = {name, lr, schedule, warmup_steps, min_lr_ratio, decay_fraction, decay, grad_clip,
                        lr_multipliers, freeze, train_only,
                        grokfast: {alpha, lamb}, adamw: {...}, adam: {...}, sgd: {...}, lion: {...}, adafactor: {...},
                        schedule_free_adamw: {...}, muon: {...}, shampoo: {...}}

    adamw      Loshchilov & Hutter 2019: Adam, then  p -= lr * wd * p  (decoupled)
    adam       Kingma & Ba 2015, with L2 regularisation coupled into the gradient:  g += wd * p
    sgd        g += wd * p;  m = momentum * m + g;  p -= lr * (g + momentum * m if nesterov else m)
    lion       Chen et al. 2023: p -= lr * (sign(b1 m + (1 - b1) g) + wd * p);  m = b2 m + (1 - b2) g
    adafactor  Shazeer & Stern 2018: factored second moments, update clipping, relative step scale
    schedule_free_adamw  Defazio et al. 2024: no decay schedule; evaluated at the averaged iterate
    muon       Jordan et al. 2024: orthogonalised momentum for hidden matrices, AdamW for the rest
    shampoo    Gupta et al. 2018: block-diagonal Kronecker preconditioners grafted to Adam (experiments/optim/shampoo.py)

Every optimizer has `weight_decay` (the vmapped sweep sweeps it). Adding one: its keys as a dataclass and one
entry in OPTIMIZERS, (keys, build(lr_schedule, keys, decay_mask)).
"""

import dataclasses
import fnmatch
import re

import jax
import optax

from experiments.optim import grokfast, shampoo
from data.config_fields import field


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay (optax.adamw)."""

    b1: float = field(0.9, min=0, below=1)
    b2: float = field(0.999, min=0, below=1)
    eps: float = field(1e-8, min=0)
    weight_decay: float = field(0.0, min=0)


@dataclasses.dataclass(frozen=True)
class AdamConfig(AdamWConfig):
    """Adam (Kingma & Ba 2015) with coupled L2 regularisation: the decay joins the gradient before the moments.
    The same keys as AdamW's."""


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    """SGD with (heavy-ball or Nesterov) momentum and coupled weight decay (optax.sgd)."""

    momentum: float = field(0.9, min=0, below=1)  # 0: plain SGD
    nesterov: bool = False
    weight_decay: float = field(0.0, min=0)


@dataclasses.dataclass(frozen=True)
class LionConfig:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolated
    momentum, decoupled weight decay; the paper uses a 3-10x smaller lr and a 3-10x larger decay than AdamW."""

    b1: float = field(0.9, min=0, below=1)
    b2: float = field(0.99, min=0, below=1)
    weight_decay: float = field(0.0, min=0)


@dataclasses.dataclass(frozen=True)
class AdafactorConfig:
    """Adafactor (Shazeer & Stern 2018) as optax.adafactor: row / column second-moment factors for matrices
    whose dimensions reach `min_dim_size_to_factor`, updates clipped to RMS `clipping_threshold`, steps scaled
    by the parameter's RMS (`multiply_by_parameter_scale`); `weight_decay` is decoupled and, as for every
    optimizer here, times the lr (optax.adafactor's own `weight_decay_rate` is per step, not times the lr)."""

    decay_rate: float = field(0.8, above=0, below=1)  # second-moment decay 1 - t^-decay_rate
    clipping_threshold: float = field(1.0, above=0)
    min_dim_size_to_factor: int = field(128, min=1)
    multiply_by_parameter_scale: bool = True
    momentum: float = field(0.0, min=0, below=1)  # 0: none (the paper's default)
    weight_decay: float = field(0.0, min=0)


@dataclasses.dataclass(frozen=True)
class ScheduleFreeAdamWConfig:
    """Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled"): no decay schedule (warmup, then
    constant); gradients at y = (1 - b1) z + b1 x, AdamW's step (without momentum) on z, x the average of the
    z's weighted by lr^weight_lr_power; evaluation at x (`evaluation_params`)."""

    b1: float = field(0.9, above=0, below=1)
    b2: float = field(0.999, min=0, below=1)
    eps: float = field(1e-8, min=0)
    weight_decay: float = field(0.0, min=0)
    weight_lr_power: float = field(2.0, min=0)


@dataclasses.dataclass(frozen=True)
class MuonConfig:
    """Muon (Jordan et al. 2024; optax.contrib.muon): Nesterov momentum orthogonalised by 5 Newton-Schulz steps
    for the hidden matrices (`muon_dimensions`: by logical axis names), AdamW for the rest (embeddings, position
    embeddings, unembedding, norms, biases, SSM dynamics, routers, predictors and gates, depthwise conv filters);
    `adam_lr_ratio` scales the lr of that AdamW group."""

    beta: float = field(0.95, min=0, below=1)
    ns_steps: int = field(5, min=1)
    nesterov: bool = True
    weight_decay: float = field(0.0, min=0)
    adam_b1: float = field(0.9, min=0, below=1)
    adam_b2: float = field(0.95, min=0, below=1)
    adam_lr_ratio: float = field(0.1, above=0)  # the AdamW group's lr = adam_lr_ratio * the schedule's lr
    adam_weight_decay: float = field(0.0, min=0)


@dataclasses.dataclass(frozen=True)
class ShampooConfig:
    """Shampoo with Adam grafting (experiments/optim/shampoo.py): preconditioner blocks of at most `block_size`
    rows and columns, inverse 4th roots recomputed every `precondition_every` steps; decoupled weight decay."""

    b1: float = field(0.9, min=0, below=1)
    b2: float = field(0.999, min=0, below=1)  # Adam's second moment and the preconditioner statistics
    eps: float = field(1e-8, min=0)
    block_size: int = field(128, min=1)
    precondition_every: int = field(10, min=1)
    matrix_eps: float = field(1e-6, above=0)  # ridge added before the root, times the statistic's Frobenius norm
    weight_decay: float = field(0.0, min=0)


def _adamw(lr, c, mask):
    return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)


def _adam(lr, c, mask):
    return optax.chain(optax.add_decayed_weights(c.weight_decay, mask), optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps))


def _sgd(lr, c, mask):
    return optax.chain(optax.add_decayed_weights(c.weight_decay, mask),
                       optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov))


def _lion(lr, c, mask):
    return optax.lion(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=mask)


def _adafactor(lr, c, mask):
    """optax.adafactor's descent direction d without a learning rate, then  p -= lr * (d + wd * p)."""
    direction = optax.adafactor(None, min_dim_size_to_factor=c.min_dim_size_to_factor, decay_rate=c.decay_rate,
                                multiply_by_parameter_scale=c.multiply_by_parameter_scale,
                                clipping_threshold=c.clipping_threshold, momentum=c.momentum or None)
    return optax.chain(direction, optax.scale(-1.0), optax.add_decayed_weights(c.weight_decay, mask),
                       optax.scale_by_learning_rate(lr))


def _schedule_free_adamw(lr, c, mask, per_group=()):
    """per_group: the lr multipliers (`lr_multipliers`), inside the wrapper: they scale the step of z, whose average
    is the evaluated x, so each group is schedule-free at its own lr (the reference's per-group learning rates)."""
    adamw_without_momentum = optax.chain(
        optax.scale_by_rms(decay=c.b2, eps=c.eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(c.weight_decay, mask), optax.scale_by_learning_rate(lr), *per_group)
    return optax.contrib.schedule_free(adamw_without_momentum, learning_rate=lr, b1=c.b1,
                                       weight_lr_power=c.weight_lr_power)


BATCH_AXES = ("layers", "expert")  # stacked copies of a matrix: Muon and Shampoo treat each on its own


def leading_batch_axes(names: tuple) -> int:
    """How many of a parameter's leading axes stack copies (BATCH_AXES)."""
    count = 0
    while count < len(names) and names[count] in BATCH_AXES:
        count += 1
    return count


def _shampoo(lr, c, mask, axis_names=None):
    batch_dims = None if axis_names is None else jax.tree.map(
        leading_batch_axes, axis_names, is_leaf=lambda x: isinstance(x, tuple))
    return optax.chain(shampoo.scale_by_shampoo(c.b1, c.b2, c.eps, c.block_size, c.precondition_every, c.matrix_eps,
                                                batch_dims),
                       optax.add_decayed_weights(c.weight_decay, mask), optax.scale_by_learning_rate(lr))


NOT_HIDDEN_MATRICES = ("router", "depth_router", "predictor_in", "predictor_out", "gate", "position_embedding",
                       "short_conv", "conv_kernel")  # parameter names Muon leaves to AdamW (also router_1, ...)


def muon_dimensions(names: tuple, path: tuple = ()) -> "optax.contrib.MuonDimensionNumbers | None":
    """Muon's view of a parameter from its logical axis names (models use DenseGeneral's (inputs..., outputs...)
    order): with the stacking axes (`layers`, `expert`) set aside, a matrix whose first axis is `embed` maps
    it to the rest (query, wi, in_proj), one whose last axis is `embed` maps the rest to it (out, wo,
    out_proj). Everything else, anything over `vocab` (embeddings, unembedding), and what is a matrix by its shape
    but not a hidden linear map, by a name on its `path` (NOT_HIDDEN_MATRICES: routers and predictors, which score
    tokens, experts or depths, MoE / MoD / MoR; the linear-attention gate, one scalar per head; position
    embeddings; depthwise short-conv filters) goes to AdamW (None), as Muon's authors keep scalar-valued heads and
    embeddings there."""
    if any(n in NOT_HIDDEN_MATRICES or re.fullmatch(r"router_\d+", n) for n in map(str, path)):
        return None
    names = tuple(names)
    kept = [i for i, n in enumerate(names) if n not in BATCH_AXES]
    if len(kept) < 2 or "vocab" in names or "embed" not in names:
        return None
    if names[kept[0]] == "embed":
        return optax.contrib.MuonDimensionNumbers(reduction_axis=(kept[0],), output_axis=tuple(kept[1:]))
    if names[kept[-1]] == "embed":
        return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(kept[:-1]), output_axis=(kept[-1],))
    return None


def _muon_dimensions_at(path, names):
    """muon_dimensions of the parameter at a pytree key path."""
    return muon_dimensions(names, _path_names(path))


def _muon(lr, c, mask, axis_names=None):
    if axis_names is None:
        raise ValueError("optimizer.name='muon' needs the parameters' logical axis names (optimizers.build's "
                         "axis_names)")
    dims = jax.tree_util.tree_map_with_path(_muon_dimensions_at, axis_names, is_leaf=lambda x: isinstance(x, tuple))
    return optax.contrib.muon(lr, ns_steps=c.ns_steps, beta=c.beta, nesterov=c.nesterov, weight_decay=c.weight_decay,
                              weight_decay_mask=mask, adam_b1=c.adam_b1, adam_b2=c.adam_b2,
                              adam_learning_rate=lambda t: c.adam_lr_ratio * lr(t),
                              adam_weight_decay=c.adam_weight_decay, muon_weight_dimension_numbers=dims)


OPTIMIZERS = {
    "adamw": (AdamWConfig, _adamw),
    "adam": (AdamConfig, _adam),
    "sgd": (SGDConfig, _sgd),
    "lion": (LionConfig, _lion),
    "adafactor": (AdafactorConfig, _adafactor),
    "schedule_free_adamw": (ScheduleFreeAdamWConfig, _schedule_free_adamw),
    "muon": (MuonConfig, _muon),
    "shampoo": (ShampooConfig, _shampoo),
}

NEEDS_AXIS_NAMES = ("muon", "shampoo")  # optimizers that read the parameters' logical axis names
EVALUATED_ELSEWHERE = ("schedule_free_adamw",)  # optimizers whose evaluated weights come from their state
MULTIPLIERS_INSIDE = ("schedule_free_adamw",)  # optimizers that take `lr_multipliers` inside (`per_group`)
DECAY_GROUPS = ("all", "weights", "hidden_weights")
SCHEDULES = ("constant", "cosine", "linear", "inverse_sqrt", "wsd")


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


NOT_WEIGHTS = ("bias", "scale", "conv_bias", "dt_bias", "A_log", "D", "gains")  # gains, offsets, SSM dynamics
EMBEDDINGS = ("embed", "position_embedding", "unembed")


def decay_mask(group: str):
    """Which parameters weight decay touches, as an optax mask function (by parameter name):
        all             every parameter
        weights         not norms, biases, Mamba's A_log / D / dt_bias or DEQ gains (GPT-2 / nanoGPT's rule)
        hidden_weights  nor the embeddings, positions and unembedding"""
    def is_decayed(path, leaf) -> bool:
        names = _path_names(path)
        if group == "all":
            return True
        if names[-1] in NOT_WEIGHTS or any("norm" in n for n in names):
            return False
        return group == "weights" or not any(n in EMBEDDINGS for n in names)

    return lambda params: jax.tree_util.tree_map_with_path(is_decayed, params)


def parse_lr_multipliers(spec: str) -> list[tuple[str, float]]:
    """`optimizer.lr_multipliers` "PATTERN=M,PATTERN=M" -> [(pattern, M)]; ValueError names a bad entry."""
    pairs = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        pattern, equals, value = entry.rpartition("=")
        try:
            multiplier = float(value)
        except ValueError:
            multiplier = -1.0
        if not equals or not pattern or multiplier < 0:
            raise ValueError(f"optimizer.lr_multipliers entry {entry!r} is not PATTERN=M with M >= 0 (e.g. "
                             "'embed/*=0.1,*norm*=0')")
        pairs.append((pattern, multiplier))
    return pairs


def lr_multipliers(spec: str):
    """Per-group learning-rate multipliers as an optax transformation chained after the optimizer: each
    parameter's update is scaled by the multiplier of the first PATTERN (an fnmatch glob over its '/'-joined
    path, e.g. `layers/attention/query`) that matches it, 1 if none does. Every optimizer here but schedule-free
    is linear in the lr (decoupled decay included), so this is that group's lr times M; schedule-free takes it
    inside its wrapper (the step of z, whose average is evaluated), which again is that group's lr times M."""
    pairs = parse_lr_multipliers(spec)

    def multiplier(path) -> float:
        name = "/".join(_path_names(path))
        return next((m for pattern, m in pairs if fnmatch.fnmatchcase(name, pattern)), 1.0)

    return optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(
        lambda path, u: u * multiplier(path) if multiplier(path) != 1.0 else u, updates))


def _globs(spec: str) -> list[str]:
    return [g.strip() for g in spec.split(",") if g.strip()]


def trained_mask(freeze: str, train_only: str):
    """params -> a tree of labels, "trained" or "frozen": a parameter (its '/'-joined path) is trained when it
    matches a `train_only` glob (or none is given) and no `freeze` glob."""
    frozen, only = _globs(freeze), _globs(train_only)

    def label(path, leaf) -> str:
        name = "/".join(_path_names(path))
        matches = lambda globs: any(fnmatch.fnmatchcase(name, g) for g in globs)  # noqa: E731
        return "trained" if (not only or matches(only)) and not matches(frozen) else "frozen"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


@dataclasses.dataclass(frozen=True)
class GrokfastConfig:
    alpha: float = field(0.98, min=0, below=1)  # Grokfast's EMA decay
    lamb: float = field(0.0, min=0)  # Grokfast's amplification of the slow gradient; 0: off


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`config.optimizer`: the optimizer's name and what composes around it; one key group per optimizer."""

    name: str = field("adamw", choices=tuple(OPTIMIZERS))
    lr: float = field(1e-3, above=0)  # peak learning rate
    schedule: str = field("constant", choices=SCHEDULES)  # every one after linear warmup
    warmup_steps: int = field(0, min=0)
    min_lr_ratio: float = field(0.0, min=0)  # cosine, linear, wsd: final lr = lr * min_lr_ratio
    decay_fraction: float = field(0.2, above=0, max=1)  # wsd: the last fraction of the steps decays
    decay: str = field("all", choices=DECAY_GROUPS)  # which parameters weight decay touches
    grad_clip: float = field(0.0, min=0)  # global-norm clipping; 0: none
    lr_multipliers: str = ""  # "PATTERN=M,...": per-group lr multipliers by parameter path (`lr_multipliers`)
    freeze: str = ""  # "PATTERN,...": parameters left as they are, with no optimizer state (`trained_mask`)
    train_only: str = ""  # "PATTERN,...": when set, every other parameter is frozen (LoRA sets "lora/*")
    grokfast: GrokfastConfig = field(GrokfastConfig())
    adamw: AdamWConfig = field(AdamWConfig())
    adam: AdamConfig = field(AdamConfig())
    sgd: SGDConfig = field(SGDConfig())
    lion: LionConfig = field(LionConfig())
    adafactor: AdafactorConfig = field(AdafactorConfig())
    schedule_free_adamw: ScheduleFreeAdamWConfig = field(ScheduleFreeAdamWConfig())
    muon: MuonConfig = field(MuonConfig())
    shampoo: ShampooConfig = field(ShampooConfig())


def validate(opt) -> list[str]:
    """Cross-field rules of `config.optimizer`."""
    try:
        parse_lr_multipliers(opt.lr_multipliers)
    except ValueError as error:
        return [str(error)]
    if (opt.freeze or opt.train_only) and (opt.name in NEEDS_AXIS_NAMES or opt.name in EVALUATED_ELSEWHERE):
        return [f"optimizer.name={opt.name!r} with frozen parameters (optimizer.freeze / train_only, or train.lora): "
                "only the element-wise optimizers (adamw, adam, sgd, lion, adafactor) take a frozen group"]
    if opt.name == "schedule_free_adamw" and opt.schedule != "constant":
        return [f"optimizer.schedule={opt.schedule!r} with optimizer.name='schedule_free_adamw': schedule-free "
                "training replaces the decay schedule; use optimizer.schedule='constant' (warmup still applies)"]
    return []


def evaluation_params(opt_state, params):
    """The parameters to evaluate: schedule-free's average x = (y - (1 - b1) z) / b1, else `params`."""
    is_schedule_free = lambda x: isinstance(x, optax.contrib.ScheduleFreeState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule_free) if is_schedule_free(s)]
    return optax.contrib.schedule_free_eval_params(found[0], params) if found else params


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then, with T = total_steps, w = warmup_steps,
    r = min_lr_ratio:
        constant      lr
        cosine        r lr + (1 - r) lr (1 + cos(pi (t - w) / (T - w))) / 2
        linear        lr - (1 - r) lr (t - w) / (T - w)
        inverse_sqrt  lr sqrt(max(w, 1) / t)                          (the Transformer's rsqrt decay)
        wsd           lr until T - d, then linear to r lr at T; d = decay_fraction T (warmup-stable-decay)
    """
    w, T, lr, r = opt.warmup_steps, max(total_steps, opt.warmup_steps + 1), opt.lr, opt.min_lr_ratio
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, w, T, end_value=lr * r)
    warmup = optax.linear_schedule(0.0, lr, max(w, 1))
    if opt.schedule == "constant":
        after, boundaries = [optax.constant_schedule(lr)], [w]
    elif opt.schedule == "linear":
        after, boundaries = [optax.linear_schedule(lr, lr * r, T - w)], [w]
    elif opt.schedule == "inverse_sqrt":
        after, boundaries = [lambda t: lr * jax.numpy.sqrt(max(w, 1) / jax.numpy.maximum(t + w, 1))], [w]
    else:  # wsd
        decay_start = max(w, T - int(round(opt.decay_fraction * T)))
        after = [optax.constant_schedule(lr), optax.linear_schedule(lr, lr * r, T - decay_start)]
        boundaries = [w, decay_start]
    return optax.join_schedules([warmup, *after], boundaries)


def build(opt, total_steps: int, axis_names=None) -> optax.GradientTransformation:
    """The optax transformation of `config.optimizer` (a ConfigDict or a mapping of the same keys);
    `axis_names`: the parameters' logical axis names (a tree of tuples, `models.axis_names`), which Muon needs
    and Shampoo reads its stacked copies from."""
    keys_cls, make = OPTIMIZERS[opt.name]
    after = [lr_multipliers(opt.lr_multipliers)] if opt.lr_multipliers else []
    extra = {"axis_names": axis_names} if opt.name in NEEDS_AXIS_NAMES else {}
    if opt.name in MULTIPLIERS_INSIDE:  # the multipliers act inside the wrapper (_schedule_free_adamw)
        extra, after = {"per_group": after}, []
    optimizer = make(learning_rate_schedule(opt, total_steps), keys_cls(**opt[opt.name]), decay_mask(opt.decay),
                     **extra)
    chain = []
    if opt.grokfast.lamb > 0:
        chain.append(grokfast.grokfast_ema(opt.grokfast.alpha, opt.grokfast.lamb))
    if opt.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(opt.grad_clip))
    optimizer = optax.chain(*chain, optimizer, *after) if chain or after else optimizer
    if opt.freeze or opt.train_only:  # the frozen group gets zero updates and keeps no state
        return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()},
                                     trained_mask(opt.freeze, opt.train_only))
    return optimizer
