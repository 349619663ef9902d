"""The lookup diagnostic (issue 24): one-hop questions about ProsQA graphs of the official distribution
(data/prosqa_lookup.py), answered without steps by the small model of experiments/configs/coconut_prosqa.py.

    python -m experiments.train --config=experiments/configs/prosqa_lookup.py:conv --workdir=runs/lookup_conv
    python -m experiments.evaluation.reasoning_eval --workdir=runs/lookup_conv        (answer accuracy on 500 new graphs)

The argument picks the model, trained on whole graphs from scratch: "plain", the 3-block transformer, or "conv",
the same with a short causal conv of width 4 before each attention (`model.short_conv = 4`, models/short_conv.py:
the MQAR study's fix for in-context lookups, where the key at Y of "every X is a Y" then knows X).

Or a stage of the conv model's curriculum over the number of facts in context (`data.facts`), each stage
starting from the previous one's weights:

    python -m experiments.train --config=experiments/configs/prosqa_lookup.py:facts4 --workdir=runs/lookup_facts4
    python -m experiments.train --config=experiments/configs/prosqa_lookup.py:facts16 --workdir=runs/lookup_facts16 \
        --config.train.init_from=runs/lookup_facts4
    python -m experiments.train --config=experiments/configs/prosqa_lookup.py:whole --workdir=runs/lookup_whole \
        --config.train.init_from=runs/lookup_facts16
    python -m experiments.evaluation.reasoning_eval --workdir=runs/lookup_whole --set=seed=777,data.train_examples=10

Every stage draws its problems with seed 0, so later stages revisit earlier stages' graphs with more facts;
score on another seed's graphs (seed 777: graphs no stage drew; 10 training problems drawn before the test split
instead of 40,000, the Coconut study page's figures; add data.facts=K to score the model with K facts in context).
"""

from experiments.configs import base, coconut_prosqa

MODELS = {"plain": 0, "conv": 4}  # -> model.short_conv
# the curriculum of the conv model: facts in context (0: the whole graph), steps, peak lr (cosine), problems
STAGES = {"facts4": (4, 6_000, 3e-3, 200_000), "facts16": (16, 1_500, 1e-3, 60_000), "whole": (0, 1_000, 1e-3, 40_000)}


def get_config(arg=None):
    name = arg or "conv"
    if name not in MODELS and name not in STAGES:
        raise ValueError(f"prosqa_lookup config argument {arg!r} is not one of {list(MODELS) + list(STAGES)}")
    config = coconut_prosqa.get_config("nocot")
    config.data = base.get_config("coconut", "prosqa_lookup").data
    config.data.update(batch_size=32, eval_batch_size=100)
    config.model.update(short_conv=MODELS.get(name, 4))
    config.train.update(steps=1_000, log_every=100, eval_every=500, checkpoint_every=500)
    if name in STAGES:
        facts, steps, lr, problems = STAGES[name]
        config.data.update(facts=facts, train_examples=problems)
        config.train.update(steps=steps, log_every=50, eval_every=250)
        config.optimizer.update(lr=lr, schedule="cosine")
    return config
