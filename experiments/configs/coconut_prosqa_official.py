"""Coconut on ProsQA as the paper runs it: training problems drawn to the official distribution
(data/prosqa_dag.py), evaluation on the official validation (300) and test (500) splits, 6 stages of c = 1
thought, the optimizer reset at every stage (Hao et al. 2024; the official `args/prosqa_coconut.yaml`).

    python -m experiments.train --config=experiments/configs/coconut_prosqa_official.py:coconut --workdir=runs/c
    python -m experiments.evaluation.reasoning_eval ...  (accuracy on the official test split)

The argument picks the method, as in experiments/configs/coconut_prosqa.py. The model is that config's small
transformer with a short conv of width 4 before each attention, the model of the lookup diagnostic
(experiments/configs/prosqa_lookup.py); where the paper fine-tunes GPT-2, each method here starts from the lookup
curriculum's last stage (`--config.train.init_from=runs/lookup_whole`), a model that finds a fact in context.
The official questions are ~36 facts long, so rows are ~330 tokens.
"""

from experiments.configs import base, coconut_prosqa


def get_config(arg=None):
    config = coconut_prosqa.get_config(arg)
    data = base.get_config("coconut", "prosqa_official").data
    data.update(method=config.data.method, curriculum=config.data.curriculum, thoughts_per_step=1, last_stage=6,
                epochs_per_stage=1, batch_size=32, eval_batch_size=100)
    config.data = data
    config.model.update(short_conv=4)
    return config
