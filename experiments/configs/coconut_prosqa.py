"""Coconut on ProsQA-style problems (Hao et al. 2024, Table 1), a small transformer trained from scratch.

    python -m experiments.train --config=experiments/configs/coconut_prosqa.py:coconut --workdir=runs/coconut

The argument picks the method of the paper's comparison:
    nocot        question -> answer
    cot          question -> the reasoning steps -> answer
    coconut      the curriculum: stage s replaces the first s steps by s * c continuous thoughts
    coconut_flat Coconut without the curriculum: the last stage (all steps as thoughts) from the start
    pause        the curriculum with pause tokens (<thought> embedded as a token, no hidden state fed back)
"""

from experiments.configs import base

VARIANTS = ("nocot", "cot", "coconut", "coconut_flat", "pause")


def get_config(arg=None):
    variant = arg or "coconut"
    if variant not in VARIANTS:
        raise ValueError(f"coconut_prosqa config argument {arg!r} is not one of {list(VARIANTS)}")
    config = base.get_config("coconut", "prosqa")
    config.seed = 0
    config.model.update(d_model=64, num_layers=3, num_heads=4, d_mlp=256, activation="gelu", norm="rmsnorm",
                        positional="rope", thoughts="pause" if variant == "pause" else "latent")
    config.data.update(method={"nocot": "nocot", "cot": "cot"}.get(variant, "coconut"),
                       curriculum=variant != "coconut_flat", last_stage=3, thoughts_per_step=1, epochs_per_stage=1,
                       min_hops=2, max_hops=3, branches=1, train_examples=10_000, eval_examples=500,
                       test_examples=500, batch_size=32, eval_batch_size=-1)
    # 312 batches per epoch: stages 0-2 take 1 epoch each (936 steps), the last stage (3 thoughts) the rest.
    config.train.update(steps=2_500, log_every=100, eval_every=500, checkpoint_every=500)
    config.optimizer.update(lr=1e-3, schedule="constant", warmup_steps=100, grad_clip=1.0)
    config.optimizer.adamw.update(b1=0.9, b2=0.98, weight_decay=0.01)
    return config
