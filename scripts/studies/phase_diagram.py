"""Liu et al. 2022's phase diagram of grokking: weight decay x learning rate, every cell a member of one
vmapped sweep (`experiments/studies/vmap_sweep.py`), classified by its steps to 90% train and test accuracy.

    PYTHONPATH=. python scripts/studies/phase_diagram.py --config=experiments/configs/default.py \
        --lrs=3e-4,1e-3,3e-3,1e-2 --weight_decays=0.03,0.3,1,3 --steps=3000 --workdir=runs/phase

writes `members.json` (each member's settings, steps to 90% / 99% train and test accuracy, phase,
accuracy curves) and `phase_diagram.png` to the workdir.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from experiments.studies import vmap_sweep

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "A grokking config.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
_LRS = flags.DEFINE_list("lrs", ["1e-3"], "Learning rates.")
_WDS = flags.DEFINE_list("weight_decays", ["1.0"], "Weight decays.")
_FRACTIONS = flags.DEFINE_list("train_fractions", ["0.5"], "Train fractions.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Steps per member.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Accuracy evaluation interval.")
_GAP = flags.DEFINE_integer("grokking_gap", 500, "Steps between 90% train and 90% test that count as grokking.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/phase", "Output folder.")


def main(argv):
    del argv
    members = vmap_sweep.member_grid([int(s) for s in _SEEDS.value], [float(v) for v in _LRS.value],
                                      [float(v) for v in _WDS.value], [float(v) for v in _FRACTIONS.value])
    results = vmap_sweep.run(_CONFIG.value, members, _STEPS.value, _EVAL_EVERY.value, _GAP.value)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "members.json"), "w") as f:
        json.dump(results, f, indent=1)
    for r in results:
        print({k: r[k] for k in ("seed", "lr", "weight_decay", "train_fraction", "train_90", "test_90", "phase")})
    if len({r["lr"] for r in results}) * len({r["weight_decay"] for r in results}) > 1:
        vmap_sweep.plot_phase_diagram(results, os.path.join(_WORKDIR.value, "phase_diagram.png"))


if __name__ == "__main__":
    app.run(main)
