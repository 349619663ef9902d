"""RL with verifiable rewards (GRPO, experiments/grpo.py) from a supervised start, on chained modular addition.

    python -m experiments.train --config=experiments/configs/grpo.py:sft --workdir=runs/grpo_sft
    python -m experiments.train --config=experiments/configs/grpo.py:outcome --workdir=runs/grpo_outcome \\
        --config.train.init_from=runs/grpo_sft

The task: x_1 + x_2 + x_3 mod 23 written with its chain of thought, `x_1 x_2 x_3 = s_1 s_2` (data/algorithmic.py,
terms = 3), 30% of the 12,167 chains to train; a program checks every step. VARIANT:
    sft       cross-entropy on the chains (the start; a short run, so that it is partly right)
    outcome   GRPO with the outcome reward (1 when the whole chain is right), from train.init_from
    process   GRPO with the per-step process reward (each step right when the chain up to it is)
The model is the grokking transformer with two layers and RMSNorm. The study is scripts/studies/grpo_study.py.
"""

from experiments.configs import default

VARIANTS = ("sft", "outcome", "process")


def get_config(arg=None):
    variant = arg or "sft"
    if variant not in VARIANTS:
        raise ValueError(f"grpo config argument {arg!r} is not one of {list(VARIANTS)}")
    config = default.get_config()
    config.model.update(num_layers=2, norm="rmsnorm")
    config.data.update(p=23, terms=3, train_fraction=0.3, batch_size=256)
    config.train.update(steps=100, log_every=20, eval_every=100, checkpoint_every=100, plot_log_x=False)
    config.optimizer.update(lr=3e-4, schedule="constant", warmup_steps=10)
    if variant != "sft":  # 32 prompts x 8 completions per step
        config.data.batch_size = 32
        config.train.grpo.update(group_size=8, reward=variant, kl_beta=0.04, epochs=1, temperature=1.0)
        config.train.update(steps=300, checkpoint_every=300)
        config.optimizer.update(lr=1e-4, warmup_steps=10)
    return config
