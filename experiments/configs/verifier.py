"""An outcome or a process reward model (data/verifier_rows.py) trained on a policy's labelled solutions, through the
one trainer: a language model over the policy's vocabulary and two label tokens, trained on the label tokens only.

    python -m experiments.train --config=experiments/configs/grpo.py:sft --workdir=runs/policy
    python -m experiments.test_time.label --policy=runs/policy --out=runs/policy_labels.npz
    python -m experiments.train --config=experiments/configs/verifier.py:process --workdir=runs/prm \\
        --config.data.path=runs/policy_labels.npz

VARIANT: process (a label at every step's last token, the exact checker's; `--config.data.labels=rollouts` for
Math-Shepherd's) or outcome (one label, the answer's). The model is the policy's shape (the grokking transformer with
two layers and RMSNorm), its positions as long as the solutions.
"""

from experiments.configs import base

VARIANTS = ("process", "outcome")


def get_config(arg=None):
    variant = arg or "process"
    if variant not in VARIANTS:
        raise ValueError(f"verifier config argument {arg!r} is not one of {list(VARIANTS)}")
    config = base.get_config("transformer", "verifier")
    config.model.update(d_model=128, num_layers=2, num_heads=4, d_mlp=512, activation="relu", norm="rmsnorm",
                        positional="learned", tie_embeddings=False, mlp_bias=True)
    config.data.update(reward=variant, batch_size=256)
    config.train.update(steps=1_000, log_every=50, eval_every=100, checkpoint_every=1_000, plot_log_x=False)
    config.optimizer.update(lr=1e-3, schedule="constant", warmup_steps=10)
    config.optimizer.adamw.update(weight_decay=0.1)
    return config
