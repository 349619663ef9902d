"""Multi-query associative recall (MQAR, `data/recall.py`) for attention, Mamba-2 or a hybrid.

    python -m experiments.train --config=experiments/configs/recall.py:ssd --workdir=runs/recall_ssd \
        --config.data.seq_len=128 --config.data.num_pairs=16 --config.model.ssm_state=64

arg, sized to 110-140k parameters with vocabulary 256 (embeddings included):
  attention    Zoology's attention baseline: short conv, attention, short conv, attention
               (hybrid pattern "CA" x 2; width 64, 4 heads, MLP 256)
  transformer  the same two attention blocks without the short convs (models/transformer.py)
  ssd          3 Mamba-2 layers of width 64 (expand 2, head_dim 32, state 16)
  hybrid       one Mamba-2 layer and one attention block (pattern "SA")
Every run sees fresh examples (train_examples = steps x batch), as Zoology's large training sets do;
`scripts/studies/recall_study.py` runs the grid of docs/studies/recall.md's table.
"""

from experiments.configs import base

MODELS = ("attention", "transformer", "ssd", "hybrid")


def get_config(arg=None):
    name = arg or "attention"
    if name not in MODELS:
        raise ValueError(f"recall config argument {arg!r} is not one of {list(MODELS)}")
    config = base.get_config("hybrid" if name == "attention" else name, "recall")  # CA x 2 is a hybrid pattern
    attention = dict(d_model=64, num_heads=4, d_mlp=256, activation="gelu", norm="rmsnorm")
    if name == "transformer":
        config.model.update(num_layers=2, positional="rope", **attention)
    else:
        pattern, layers = {"attention": ("CA", 4), "ssd": ("S", 3), "hybrid": ("SA", 2)}[name]
        config.model.update(num_layers=layers, layer_pattern=pattern, ssm_head_dim=32, ssm_state=16, conv_width=4,
                            **attention)
    steps, batch = 1500, 64
    config.data.update(seq_len=64, num_pairs=8, vocab_size=256, train_examples=steps * batch, test_examples=1_000,
                       batch_size=batch, eval_batch_size=-1)
    config.train.update(steps=steps, log_every=100, eval_every=500, checkpoint_every=steps)
    config.optimizer.update(lr=3e-3, schedule="cosine", warmup_steps=100, min_lr_ratio=0.05, grad_clip=1.0)
    config.optimizer.adamw.update(b1=0.9, b2=0.98, weight_decay=0.0)
    return config
