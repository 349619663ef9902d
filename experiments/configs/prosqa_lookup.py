"""The lookup diagnostic (issue 24): one-hop questions about ProsQA graphs of the official distribution
(data/prosqa_lookup.py), answered without steps by the small model of experiments/configs/coconut_prosqa.py.

    python -m experiments.train --config=experiments/configs/prosqa_lookup.py:CA --workdir=runs/lookup_CA
    python -m experiments.reasoning_eval --workdir=runs/lookup_CA        (answer accuracy on 500 new graphs)

The argument is the backbone's layer pattern: "A" the plain transformer (3 attention blocks), "CA" a short conv
before each of the 3 attention blocks (models/coconut.py; the MQAR study's fix for the in-context lookup).
"""

from experiments.configs import base, coconut_prosqa

PATTERNS = ("A", "CA")


def get_config(arg=None):
    pattern = arg or "CA"
    if pattern not in PATTERNS:
        raise ValueError(f"prosqa_lookup config argument {arg!r} is not one of {list(PATTERNS)}")
    config = coconut_prosqa.get_config("nocot")
    config.data = base.get_config("coconut", "prosqa_lookup").data
    config.data.update(batch_size=32, eval_batch_size=100)
    config.model.update(layer_pattern=pattern, num_layers=3 * len(pattern))
    config.train.update(steps=3_000, log_every=100, eval_every=500, checkpoint_every=500)
    return config
