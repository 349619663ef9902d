"""Grokking modular addition, as in Nanda et al. 2023 ("Progress measures for grokking via
mechanistic interpretability"): p = 113, a+b, 30% of pairs for training, a 1-layer transformer
(d_model 128, 4 heads, d_mlp 512, ReLU, no norm, learned positions, untied embeddings), full batch,
AdamW lr 1e-3, weight decay 1.0, betas (0.9, 0.98), 10-step linear warmup, loss on the answer only.

    python -m experiments.train --config=experiments/configs/grokking.py --workdir=runs/grokking
"""

from experiments.configs import base


def get_config(arg=None):
    """arg: "" (the paper's transformer), "ssd" or "hybrid" (Mamba-2 layers of the same width), or "deq"
    (the paper's layer as a deep-equilibrium cell)."""
    if arg not in (None, "", "ssd", "hybrid", "deq"):
        raise ValueError(f"grokking config argument {arg!r} is not one of ['', 'ssd', 'hybrid', 'deq']")
    config = base.get_config(arg or "transformer", "algorithmic")
    config.seed = 0
    if arg == "deq":  # a norm keeps the iteration bounded
        config.model.update(d_model=128, num_layers=1, num_heads=4, d_mlp=512, activation="relu", norm="rmsnorm",
                            positional="learned", tie_embeddings=False, mlp_bias=True)
    elif not arg:
        config.model.update(d_model=128, num_layers=1, num_heads=4, d_mlp=512, activation="relu", norm="none",
                            positional="learned", tie_embeddings=False, mlp_bias=True)
    else:  # the sequence is 3 tokens long: one chunk
        config.model.update(d_model=128, num_layers=2 if arg == "hybrid" else 1, layer_pattern="SA" if arg == "hybrid"
                            else "S", num_heads=4, d_mlp=512, chunk_size=4)
    config.data.update(p=113, op="a+b", train_fraction=0.3, batch_size=-1, eval_batch_size=-1)
    config.train.update(steps=20_000, log_every=100, eval_every=100, checkpoint_every=2_000, plot_log_x=True)
    config.optimizer.update(lr=1e-3, schedule="constant", warmup_steps=10)
    config.optimizer.adamw.update(b1=0.9, b2=0.98, weight_decay=1.0)
    return config
