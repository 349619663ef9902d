"""The balancing study's runs: one MoE LM trained with the Switch auxiliary loss or with DeepSeek-V3's
auxiliary-loss-free bias balancing, at equal compute (same model, data, steps and dispatch).

    python -m experiments.train --config=experiments/configs/moe_balance.py:loss_free --workdir=runs/b
    python scripts/studies/moe_balance_study.py          # both schemes x several seeds, table and plot

`moe_lm.py`'s model (8 routed experts of width 128, top-2, one shared expert) on one device with
dropless grouped matmuls (`dispatch=ragged`, so neither scheme loses tokens) for 1,000 steps:
- `aux`: softmax router, gates renormalised over the top-2, L_aux = alpha E sum_i f_i P_i, alpha 1e-3;
- `loss_free`: sigmoid router, bias update gamma 1e-3, no balance loss at all (alpha 0).
"""

from experiments.configs import moe_lm

SCHEMES = ("aux", "loss_free")


def get_config(arg="loss_free"):
    if arg not in SCHEMES:
        raise ValueError(f"moe_balance config argument {arg!r} is not one of {list(SCHEMES)}")
    config = moe_lm.get_config("aux" if arg == "aux" else None)
    config.model.update(dispatch="ragged", aux_loss_weight=1e-3, balance_loss_weight=0.0, bias_update_rate=1e-3)
    config.train.update(steps=1000, log_every=50, eval_every=250, checkpoint_every=1000)
    config.mesh.update(data=-1, expert=1)
    return config
