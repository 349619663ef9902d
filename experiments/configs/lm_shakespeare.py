"""Character-level language modelling of tiny Shakespeare at nanoGPT's CPU shape and budget.

nanoGPT's `train_shakespeare_char` on CPU: 4 layers, 4 heads, width 128, context 64, batch 12,
2000 iterations, no dropout, AdamW lr 1e-3 (100 warmup steps, cosine to 1e-4), betas (0.9, 0.99),
weight decay 0.1, gradient clipping 1.0, LayerNorm, GELU, learned positions, tied embeddings;
it reaches validation loss about 1.88. Text is read as UTF-8 bytes (the corpus is ASCII, so one
token per character); the first 90% trains, the last 10% validates.

    python -m experiments.train --config=experiments/configs/lm_shakespeare.py --workdir=runs/lm
    python -m experiments.sample --workdir=runs/lm --prompt="ROMEO:"

Options after the colon, comma-separated: `sentencepiece` tokenizes with a SentencePiece vocabulary
(train it first: `python scripts/tools/train_sentencepiece.py`); `ssd` trains a Mamba-2 stack and `hybrid`
an SSSA hybrid of the same width and depth instead of the transformer, `deq` one transformer block
iterated to its fixed point (models/deq_transformer.py), `mod` the transformer with Mixture-of-Depths routing in
every other block (models/mod.py: 12.5% capacity), `mor` Mixture-of-Recursions (models/mor.py: first and last blocks
unshared, the middle ones recursed up to 3 times by expert-choice routing), e.g.
`--config=experiments/configs/lm_shakespeare.py:hybrid,sentencepiece`.
"""

from experiments.configs import base

SPM_MODEL = "runs/spm/tinyshakespeare_1024.model"


OPTIONS = ("sentencepiece", "ssd", "hybrid", "deq", "mod", "mor")


def get_config(arg=None):
    options = [o for o in (arg or "").split(",") if o]
    if set(options) - set(OPTIONS):
        raise ValueError(f"lm_shakespeare config options {options} must come from {list(OPTIONS)} (comma-separated)")
    families = [o for o in options if o != "sentencepiece"]
    if len(families) > 1:
        raise ValueError(f"lm_shakespeare config options {options} name more than one model family")
    model = families[0] if families else "transformer"
    config = base.get_config(model, "text")
    if model in ("transformer", "mod", "mor"):
        config.model.update(d_model=128, num_layers=4, num_heads=4, d_mlp=512, activation="gelu", norm="layernorm",
                            positional="learned", tie_embeddings=True, scan_unroll=4)
    elif model == "deq":  # the transformer's block, weight-tied and solved to equilibrium
        config.model.update(d_model=128, num_layers=1, num_heads=4, d_mlp=512, activation="gelu", norm="layernorm",
                            positional="learned", tie_embeddings=True, max_iter=12, backward_max_iter=12, tol=1e-3)
    else:  # Mamba-2 layers at the paper's defaults (expand 2, head_dim 64, state 128); hybrid: SSSA
        config.model.update(d_model=128, num_layers=4, num_heads=4, d_mlp=512, tie_embeddings=True)
    config.data.update(path="data/files/tinyshakespeare.txt", tokenizer="byte", seq_len=64, batch_size=12,
                       eval_batch_size=256)
    if "sentencepiece" in options:
        config.data.update(tokenizer="sentencepiece", spm_model=SPM_MODEL)
    config.train.update(steps=2000, log_every=100, eval_every=250, checkpoint_every=1000)
    config.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0)
    config.optimizer.adamw.update(b1=0.9, b2=0.99, weight_decay=0.1)
    return config
