"""Preference optimisation from a supervised start, on tasks where a program knows the right answer.

    python -m experiments.train --config=experiments/configs/preference.py:arithmetic,sft --workdir=runs/sft
    python -m experiments.train --config=experiments/configs/preference.py:arithmetic,dpo --workdir=runs/dpo \\
        --config.train.init_from=runs/sft --config.train.preference.beta=0.1

The argument is "TASK,VARIANT". TASK:
    arithmetic  the default experiment's a+b mod 59 (half the pairs to train); the rejected answer of each pair is
                a random wrong one (data/algorithmic.py)
    prontoqa    chains of thought: the correct chain chosen over a derailed one (data/prontoqa.py)
VARIANT: `sft` (cross-entropy on the chosen answers; the rejected ones ride along unused, so both runs read the
same rows) or a preference kind of experiments/preference.py (`dpo`, `ipo`, `kto`, `simpo`, `orpo`), started from
`train.init_from` (the SFT run, also the frozen reference); each kind at its paper's usual beta. The study
(scripts/studies/preference_study.py) sweeps beta.
"""

from experiments import losses
from experiments.configs import base, default

TASKS = ("arithmetic", "prontoqa")
VARIANTS = ("sft", *losses.PREFERENCE_KINDS)
BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}


def task_config(task: str):
    if task == "arithmetic":
        config = default.get_config()
        config.data.rejected = "random"
        config.train.update(steps=300, log_every=50, eval_every=100, checkpoint_every=300)
        return config
    config = base.get_config("coconut", "prontoqa")
    config.model.update(d_model=64, num_layers=2, num_heads=4, d_mlp=256, activation="gelu", norm="rmsnorm",
                        positional="rope", thoughts="latent")
    config.data.update(method="cot", rejected="derailed", min_hops=3, max_hops=4, branches=3, train_examples=4_000,
                       eval_examples=256, test_examples=500, batch_size=32, eval_batch_size=-1)
    config.train.update(steps=600, log_every=50, eval_every=200, checkpoint_every=600)
    config.optimizer.update(lr=1e-3, schedule="constant", warmup_steps=50, grad_clip=1.0)
    config.optimizer.adamw.update(b1=0.9, b2=0.98, weight_decay=0.01)
    return config


def get_config(arg=None):
    task, _, variant = (arg or "arithmetic,sft").partition(",")
    variant = variant or "sft"
    if task not in TASKS or variant not in VARIANTS:
        raise ValueError(f"preference config argument {arg!r} is not TASK,VARIANT with TASK in {list(TASKS)} and "
                         f"VARIANT in {list(VARIANTS)}")
    config = task_config(task)
    if variant != "sft":
        config.train.preference.update(kind=variant, beta=BETA[variant], sft_weight=1.0 if variant == "orpo" else 0.0,
                                       gamma=1.0 if variant == "simpo" else 0.0)
        config.train.update(steps=1_000 if task == "arithmetic" else 200, checkpoint_every=1_000 if task == "arithmetic" else 200)
    return config
