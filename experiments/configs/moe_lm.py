"""A mixture-of-experts LM on tiny Shakespeare, expert-parallel over every device.

The lm_shakespeare transformer (width 128, 4 layers, 4 heads, context 64, learned positions, tied
embeddings) with an MoE FFN in every block: 8 routed SwiGLU experts of width 128, top-2, plus one
shared expert of width 128 (so each token meets 3 x 128 hidden units, against 512 in the dense
MLP), DeepSeek-V3's sigmoid router with loss-free bias balancing. The default capacity (factor 0:
as many slots as tokens per shard) drops nothing on any mesh. `mesh.expert=-1` puts every device
on the expert axis: 8 fake CPU devices hold one expert each, and each holds 2 of the 16 sequences.

    python -m experiments.train --config=experiments/configs/moe_lm.py --workdir=runs/moe

Options after the colon: `aux` switches to the softmax router with the Switch auxiliary loss.
"""

from experiments.configs import base


def get_config(arg=None):
    if arg not in (None, "", "aux"):
        raise ValueError(f"moe_lm config argument {arg!r} is not one of ['', 'aux']")
    config = base.get_config("moe", "text")
    config.model.update(d_model=128, num_layers=4, num_heads=4, d_mlp=512, norm="layernorm", positional="learned",
                        tie_embeddings=True, num_experts=8, top_k=2, d_expert=128, num_shared_experts=1,
                        router="softmax" if arg == "aux" else "sigmoid", dispatch="capacity", capacity_factor=0.0)
    config.data.update(path="data/files/tinyshakespeare.txt", tokenizer="byte", seq_len=64, batch_size=16,
                       eval_batch_size=256)
    config.train.update(steps=2000, log_every=100, eval_every=250, checkpoint_every=1000)
    config.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0)
    config.optimizer.adamw.update(b1=0.9, b2=0.99, weight_decay=0.1)
    config.mesh.update(data=1, expert=-1)
    return config
