"""Othello-GPT (Li et al. 2023, "Emergent World Representations") at CPU scale: a GPT trained only on the move
sequences of synthetic games of uniformly random legal moves (`data/othello.py`), on a 6 x 6 board.

Li et al. train 8 layers, 8 heads, width 512 on 20M 8 x 8 games (60 moves each) on GPUs. Here: 6 layers, 4 heads,
width 128, learned positions, LayerNorm, GELU, on 100k fresh 6 x 6 games (32 moves: a game is half as long and
the board 36 squares, so a model ~100x smaller trains in minutes on two CPU cores; `--config.data.size=8` with a
wider model is the paper's setting). Every run's evaluation set is 2,000 other games.

    python -m experiments.train --config=experiments/configs/othello.py --workdir=runs/othello
    python scripts/studies/othello_study.py --workdir=runs/othello     # legal moves, probes, interventions
"""

from experiments.configs import base


def get_config(arg=None):
    if arg:
        raise ValueError(f"the othello config takes no argument (got {arg!r}); set keys with --config.KEY=VALUE")
    config = base.get_config("transformer", "othello")
    config.model.update(d_model=128, num_layers=6, num_heads=4, d_mlp=512, activation="gelu", norm="layernorm",
                        positional="learned", tie_embeddings=False, scan_unroll=2)
    config.data.update(size=6, train_games=100_000, test_games=2_000, batch_size=128, eval_batch_size=-1)
    config.train.update(steps=4000, log_every=100, eval_every=1000, checkpoint_every=1000)
    config.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=200, min_lr_ratio=0.1, grad_clip=1.0)
    config.optimizer.adamw.update(b1=0.9, b2=0.99, weight_decay=0.1)
    return config
