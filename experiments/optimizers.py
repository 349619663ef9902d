"""Optimizers by name (`optimizer.name`), each with its own typed keys, and what composes around any of them:
the learning-rate schedule (linear warmup, then constant or cosine), global-norm gradient clipping and
Grokfast gradient filtering (experiments/grokfast.py) in front.

    config.optimizer = {name, lr, schedule, warmup_steps, min_lr_ratio, grad_clip,
                        grokfast: {alpha, lamb}, adamw: {b1, b2, eps, weight_decay}, <other optimizers' keys>}

Adding an optimizer: its keys as a dataclass and one entry in OPTIMIZERS, (keys, build(lr_schedule, keys)).
"""

import dataclasses

import optax

from experiments import grokfast
from data.config_fields import field


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay (optax.adamw)."""

    b1: float = field(0.9, min=0, below=1)
    b2: float = field(0.999, min=0, below=1)
    eps: float = field(1e-8, min=0)
    weight_decay: float = field(0.0, min=0)


OPTIMIZERS = {
    "adamw": (AdamWConfig, lambda lr, c: optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)),
}


@dataclasses.dataclass(frozen=True)
class GrokfastConfig:
    alpha: float = field(0.98, min=0, below=1)  # Grokfast's EMA decay
    lamb: float = field(0.0, min=0)  # Grokfast's amplification of the slow gradient; 0: off


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`config.optimizer`: the optimizer's name and what composes around it; one key group per optimizer."""

    name: str = field("adamw", choices=tuple(OPTIMIZERS))
    lr: float = field(1e-3, above=0)  # peak learning rate
    schedule: str = field("constant", choices=("constant", "cosine"))  # both after linear warmup
    warmup_steps: int = field(0, min=0)
    min_lr_ratio: float = field(0.0, min=0)  # cosine: final lr = lr * min_lr_ratio
    grad_clip: float = field(0.0, min=0)  # global-norm clipping; 0: none
    grokfast: GrokfastConfig = field(GrokfastConfig())
    adamw: AdamWConfig = field(AdamWConfig())


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
    """lr(t) = lr * t / warmup during warmup, then lr (constant) or cosine decay to lr * min_lr_ratio."""
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, opt.lr, opt.warmup_steps, max(total_steps, opt.warmup_steps + 1), end_value=opt.lr * opt.min_lr_ratio)
    warmup = optax.linear_schedule(0.0, opt.lr, max(opt.warmup_steps, 1))
    return optax.join_schedules([warmup, optax.constant_schedule(opt.lr)], [opt.warmup_steps])


def build(opt, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation of `config.optimizer` (a ConfigDict or a mapping of the same keys)."""
    keys_cls, make = OPTIMIZERS[opt.name]
    optimizer = make(learning_rate_schedule(opt, total_steps), keys_cls(**opt[opt.name]))
    chain = []
    if opt.grokfast.lamb > 0:
        chain.append(grokfast.grokfast_ema(opt.grokfast.alpha, opt.grokfast.lamb))
    if opt.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(opt.grad_clip))
    return optax.chain(*chain, optimizer) if chain else optimizer
