"""The lookup diagnostic (issue 24): one-hop questions about ProsQA graphs of the official distribution
(data/prosqa_lookup.py), answered without steps by the small model of experiments/configs/coconut_prosqa.py.

    python -m experiments.train --config=experiments/configs/prosqa_lookup.py:conv --workdir=runs/lookup_conv
    python -m experiments.reasoning_eval --workdir=runs/lookup_conv        (answer accuracy on 500 new graphs)

The argument picks the model: "plain", the 3-block transformer, or "conv", the same with a short causal conv of
width 4 before each attention (`model.short_conv = 4`, models/short_conv.py: the MQAR study's fix for in-context
lookups, where the key at Y of "every X is a Y" then knows X).
"""

from experiments.configs import base, coconut_prosqa

VARIANTS = {"plain": 0, "conv": 4}  # -> model.short_conv


def get_config(arg=None):
    variant = arg or "conv"
    if variant not in VARIANTS:
        raise ValueError(f"prosqa_lookup config argument {arg!r} is not one of {list(VARIANTS)}")
    config = coconut_prosqa.get_config("nocot")
    config.data = base.get_config("coconut", "prosqa_lookup").data
    config.data.update(batch_size=32, eval_batch_size=100)
    config.model.update(short_conv=VARIANTS[variant])
    config.train.update(steps=1_000, log_every=100, eval_every=500, checkpoint_every=500)
    return config
