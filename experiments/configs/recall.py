"""Multi-query associative recall (MQAR, `data/recall.py`) for a transformer, Mamba-2 or a hybrid.

    python -m experiments.train --config=experiments/configs/recall.py:ssd --workdir=runs/recall_ssd \
        --config.data.seq_len=128 --config.data.num_pairs=16 --config.model.ssm_state=64

arg: transformer (default) | ssd | hybrid. Sizes are matched roughly in parameters (110-131k with
vocabulary 256, embeddings included):
2 attention layers of width 64; 3 Mamba-2 layers of width 64 (expand 2, head_dim 32); the hybrid
one Mamba-2 and one attention layer. `scripts/recall_study.py` runs the grid of the README's table.
"""

from experiments.configs import base

MODELS = ("transformer", "ssd", "hybrid")


def get_config(arg=None):
    name = arg or "transformer"
    if name not in MODELS:
        raise ValueError(f"recall config argument {arg!r} is not one of {list(MODELS)}")
    config = base.get_config(name, "recall")
    if name == "transformer":
        config.model.update(d_model=64, num_layers=2, num_heads=4, d_mlp=256, activation="gelu", norm="rmsnorm",
                            positional="rope")
    else:
        config.model.update(d_model=64, num_layers=3 if name == "ssd" else 2, layer_pattern="S" if name == "ssd" else "SA",
                            ssm_head_dim=32, ssm_state=16, num_heads=4, d_mlp=256, activation="gelu")
    config.data.update(seq_len=64, num_pairs=8, vocab_size=256, train_examples=20_000, test_examples=1_000,
                       batch_size=64, eval_batch_size=500)
    config.train.update(steps=2000, log_every=100, eval_every=500, checkpoint_every=2000)
    config.optimizer.update(lr=3e-3, b1=0.9, b2=0.98, weight_decay=0.1, schedule="cosine", warmup_steps=100,
                            min_lr_ratio=0.05, grad_clip=1.0)
    return config
