"""The keys every experiment has (CONTRACTS §1), with defaults; experiment configs start from here.

`config.model` and `config.data` take their keys and defaults from the family's config dataclass
(`models.MODELS`, `data.DATASETS`), so the config and the code cannot drift apart.
"""

import dataclasses

import ml_collections

import data
import models


def get_config(model: str = "transformer", dataset: str = "algorithmic") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = dataclasses.asdict(models.MODELS[model][1]())
    config.data = dataclasses.asdict(data.DATASETS[dataset][1]())
    config.train = dict(
        steps=1000,
        log_every=100,
        eval_every=500,  # 0: evaluate only at the end
        checkpoint_every=1000,
        keep_checkpoints=3,
        plot_log_x=False,  # log-scale step axis in the workdir's curves.png
    )
    config.optimizer = dict(
        name="adamw",
        lr=1e-3,  # peak learning rate
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        schedule="constant",  # constant | cosine (both after linear warmup)
        warmup_steps=0,
        min_lr_ratio=0.0,  # cosine: final lr = lr * min_lr_ratio
        grad_clip=0.0,  # global-norm clipping; 0: none
        grokfast_alpha=0.98,  # Grokfast's EMA decay (experiments/grokfast.py)
        grokfast_lambda=0.0,  # Grokfast's amplification of the slow gradient; 0: off
    )
    config.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)  # -1: all devices left over
    return config
