"""The first steps' training losses of named configs, to check that a refactor changes no number.

    python scripts/tools/loss_fingerprint.py --out=before.json            # on the old code
    python scripts/tools/loss_fingerprint.py --out=after.json --compare=before.json

Each config trains `--steps` steps (logging every step, no evaluation) in a temporary folder on the
default devices; `--compare` prints the largest absolute and relative difference per config and exits 1
when one exceeds `--rtol`. The objectives with a frozen model (a preference loss and GRPO against their
reference, distillation from a teacher) first train their start (`--steps` steps of the SFT or teacher
config) in the same folder; their objective's own loss (`preference/loss`, `grpo/loss`, `distill_kl`) is
fingerprinted beside the cross-entropy.
"""

import json
import os
import sys
import tempfile

from absl import app, flags
import numpy as np

from experiments import studies
from experiments.configs import coconut_prosqa, default, grpo, lm_shakespeare, moe_lm, preference

CONFIGS = {
    "default": lambda: default.get_config(),
    "lm": lambda: lm_shakespeare.get_config(),
    "lm_ssd": lambda: lm_shakespeare.get_config("ssd"),
    "lm_hybrid": lambda: lm_shakespeare.get_config("hybrid"),
    "lm_deq": lambda: lm_shakespeare.get_config("deq"),
    "moe": lambda: moe_lm.get_config(),
    "coconut": lambda: coconut_prosqa.get_config(),
}
# name -> (the start's config, the config trained from it, the key that names the start, its objective's loss)
FROM_A_START = {
    "dpo": (lambda: preference.get_config("arithmetic,sft"), lambda: preference.get_config("arithmetic,dpo"),
            "init_from", "preference/loss"),
    "grpo": (lambda: grpo.get_config("sft"), lambda: grpo.get_config("outcome"), "init_from", "grpo/loss"),
    "distill": (default.get_config, default.get_config, "distill.teacher", "distill_kl"),
}
_NAMES = flags.DEFINE_list("configs", [*CONFIGS, *FROM_A_START], f"Configs, of {[*CONFIGS, *FROM_A_START]}.")
_STEPS = flags.DEFINE_integer("steps", 50, "Training steps per config.")
_OUT = flags.DEFINE_string("out", "loss_fingerprint.json", "Where the losses go (JSON: config -> [loss per step]).")
_COMPARE = flags.DEFINE_string("compare", None, "A fingerprint to compare with.")
_RTOL = flags.DEFINE_float("rtol", 1e-5, "Largest relative difference that counts as unchanged.")


def _train(config, workdir: str, steps: int) -> list[dict]:
    config.train.update(steps=steps, log_every=1, eval_every=0, checkpoint_every=steps)
    return studies.run_or_reuse(config, workdir)[0]


def losses(name: str, steps: int) -> dict[str, list[float]]:
    """{name: the loss per step}, and {name/metric: ...} for an objective's own loss."""
    with tempfile.TemporaryDirectory() as workdir:
        if name in CONFIGS:
            return {name: [e["loss"] for e in _train(CONFIGS[name](), workdir, steps)]}
        start, then, key, metric = FROM_A_START[name]
        _train(start(), os.path.join(workdir, "start"), steps)
        config = then()
        studies.with_overrides(config, {f"train.{key}": os.path.join(workdir, "start")})
        events = _train(config, os.path.join(workdir, name), steps)
        return {name: [e["loss"] for e in events], f"{name}/{metric}": [e[metric] for e in events]}


def main(argv):
    del argv
    fingerprint = {k: v for name in _NAMES.value for k, v in losses(name, _STEPS.value).items()}
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
