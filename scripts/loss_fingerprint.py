"""The first steps' training losses of named configs, to check that a refactor changes no number.

    python scripts/loss_fingerprint.py --out=before.json            # on the old code
    python scripts/loss_fingerprint.py --out=after.json --compare=before.json

Each config trains `--steps` steps (logging every step, no evaluation) in a temporary folder on the
default devices; `--compare` prints the largest absolute and relative difference per config and exits 1
when one exceeds `--rtol`.
"""

import json
import sys
import tempfile

from absl import app, flags
import numpy as np

from experiments import studies
from experiments.configs import coconut_prosqa, default, lm_shakespeare, moe_lm

CONFIGS = {
    "default": lambda: default.get_config(),
    "lm": lambda: lm_shakespeare.get_config(),
    "lm_ssd": lambda: lm_shakespeare.get_config("ssd"),
    "lm_hybrid": lambda: lm_shakespeare.get_config("hybrid"),
    "lm_deq": lambda: lm_shakespeare.get_config("deq"),
    "moe": lambda: moe_lm.get_config(),
    "coconut": lambda: coconut_prosqa.get_config(),
}
_NAMES = flags.DEFINE_list("configs", list(CONFIGS), f"Configs, of {list(CONFIGS)}.")
_STEPS = flags.DEFINE_integer("steps", 50, "Training steps per config.")
_OUT = flags.DEFINE_string("out", "loss_fingerprint.json", "Where the losses go (JSON: config -> [loss per step]).")
_COMPARE = flags.DEFINE_string("compare", None, "A fingerprint to compare with.")
_RTOL = flags.DEFINE_float("rtol", 1e-5, "Largest relative difference that counts as unchanged.")


def losses(name: str, steps: int) -> list[float]:
    config = CONFIGS[name]()
    config.train.update(steps=steps, log_every=1, eval_every=0, checkpoint_every=steps)
    with tempfile.TemporaryDirectory() as workdir:
        return [e["loss"] for e in studies.run_or_reuse(config, workdir)[0]]


def main(argv):
    del argv
    fingerprint = {name: losses(name, _STEPS.value) for name in _NAMES.value}
    with open(_OUT.value, "w") as f:
        json.dump(fingerprint, f)
    if not _COMPARE.value:
        return
    with open(_COMPARE.value) as f:
        reference = json.load(f)
    worst = 0.0
    for name, got in fingerprint.items():
        want = np.asarray(reference[name])
        diff = np.abs(np.asarray(got) - want)
        worst = max(worst, float(np.max(diff / np.abs(want))))
        print(f"{name:10s} {len(got)} steps  max |diff| {np.max(diff):.3g}  max relative {np.max(diff / np.abs(want)):.3g}")
    sys.exit(0 if worst <= _RTOL.value else 1)


if __name__ == "__main__":
    app.run(main)
