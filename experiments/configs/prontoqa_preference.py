"""Preference optimisation on ProntoQA with a programmatic ground truth: correct chains of thought chosen over
derailed ones (data/prontoqa.py), from a supervised (SFT) start.

    python -m experiments.train --config=experiments/configs/prontoqa_preference.py:sft --workdir=runs/sft
    python -m experiments.train --config=experiments/configs/prontoqa_preference.py:dpo --workdir=runs/dpo \\
        --config.train.init_from=runs/sft --config.train.preference.beta=0.1

The argument is `sft` (chain-of-thought training on the chosen responses; the rejected ones ride along unused,
so both runs see one row geometry) or a preference kind of experiments/preference.py (`dpo`, `ipo`, `kto`,
`simpo`, `orpo`), which starts from `train.init_from` (the SFT run; also the frozen reference). Each kind's
default beta is its paper's usual value; scripts/preference_study.py sweeps it.
"""

from experiments import losses
from experiments.configs import base

VARIANTS = ("sft", *losses.PREFERENCE_KINDS)
BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}


def get_config(arg=None):
    variant = arg or "sft"
    if variant not in VARIANTS:
        raise ValueError(f"prontoqa_preference config argument {arg!r} is not one of {list(VARIANTS)}")
    config = base.get_config("coconut", "prontoqa")
    config.model.update(d_model=64, num_layers=2, num_heads=4, d_mlp=256, activation="gelu", norm="rmsnorm",
                        positional="rope", thoughts="latent")
    config.data.update(method="cot", rejected="derailed", min_hops=3, max_hops=4, branches=3, train_examples=4_000,
                       eval_examples=256, test_examples=500, batch_size=32, eval_batch_size=-1)
    config.train.update(steps=600, log_every=50, eval_every=200, checkpoint_every=600)
    config.optimizer.update(lr=1e-3, schedule="constant", warmup_steps=50, grad_clip=1.0)
    config.optimizer.adamw.update(b1=0.9, b2=0.98, weight_decay=0.01)
    if variant != "sft":
        config.train.preference.update(kind=variant, beta=BETA[variant], sft_weight=1.0 if variant == "orpo" else 0.0,
                                       gamma=1.0 if variant == "simpo" else 0.0)
        config.train.update(steps=200, log_every=20, eval_every=100, checkpoint_every=200)
        config.optimizer.update(lr=1e-4, warmup_steps=20)
    return config
