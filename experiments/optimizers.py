"""The optax optimizer built from `config.optimizer`: AdamW after linear warmup, constant or cosine,
with optional global-norm gradient clipping and optional Grokfast gradient filtering in front."""

import optax

from experiments import grokfast


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
    """lr(t) = lr * t / warmup during warmup, then lr (constant) or cosine decay to lr * min_lr_ratio."""
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, opt.lr, opt.warmup_steps, max(total_steps, opt.warmup_steps + 1), end_value=opt.lr * opt.min_lr_ratio)
    warmup = optax.linear_schedule(0.0, opt.lr, max(opt.warmup_steps, 1))
    return optax.join_schedules([warmup, optax.constant_schedule(opt.lr)], [opt.warmup_steps])


def build(opt, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay)
    chain = []
    if opt.get("grokfast_lambda", 0.0) > 0:
        chain.append(grokfast.grokfast_ema(opt.grokfast_alpha, opt.grokfast_lambda))
    if opt.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(opt.grad_clip))
    return optax.chain(*chain, adamw) if chain else adamw
