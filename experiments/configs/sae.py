"""A sparse autoencoder (models/sae.py) on the rows of an activation store, through the one trainer.

    python -m experiments.analysis.activation_store --workdir=runs/grokking --out=runs/grokking_store --site=mlp_hidden \
        --split=train,eval --position=-1
    python -m experiments.train --config=experiments/configs/sae.py:topk --workdir=runs/grokking_sae \
        --config.data.store=runs/grokking_store
    python -m experiments.analysis.sae_eval --workdir=runs/grokking_sae

The rows are scaled by the data's sqrt(D / E||x||^2) inside the SAE (model.input_scale = -1), so the penalties'
coefficients mean the same at every site. Adam at lr 1e-3 with no weight decay (an SAE's sparsity comes from its
penalty or its k; Gao et al. use Adam and no decay), batches of 1,024 rows, 4,096 latents by default.
"""

from experiments.configs import base
from models import sae


def get_config(arg=None):
    """arg: the SAE kind, one of relu, topk (the default), batchtopk, jumprelu."""
    kind = arg or "topk"
    if kind not in sae.KINDS:
        raise ValueError(f"sae config argument {arg!r} is not one of {list(sae.KINDS)}")
    config = base.get_config("sae", "activations")
    config.model.update(kind=kind, num_latents=4096, k=32, input_scale=-1)
    config.data.update(batch_size=1024)
    config.train.update(steps=2_000, log_every=100, eval_every=0, checkpoint_every=1_000)
    config.optimizer.update(name="adam", lr=1e-3, schedule="constant", warmup_steps=50)
    return config
