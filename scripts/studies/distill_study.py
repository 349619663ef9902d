"""Knowledge distillation on tiny Shakespeare: a 2-layer student distilled from the 4-layer LM against the same
student trained alone, at equal steps (experiments/configs/lm_shakespeare.py; `train.distill`).

    python scripts/studies/distill_study.py [--steps=2000] [--weight=0.5] [--temperature=2.0] [--workdir=runs/distill_study]

Trains the teacher (the LM config as it is), the student alone, and the student distilled from the teacher's
final checkpoint (objective (1 - a) CE + a T^2 KL), and reports each one's validation loss (plain
cross-entropy) at the end, its parameter count and training-loop seconds. Finished runs are read, not rerun.
Writes `table.md` and `curves.png` to the workdir.
"""

import os

from absl import app, flags

import models
from experiments import restore, studies
from experiments.training import plots
from experiments.configs import lm_shakespeare

_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps per run.")
_WEIGHT = flags.DEFINE_float("weight", 0.5, "The KL term's share a.")
_TEMPERATURE = flags.DEFINE_float("temperature", 2.0, "Softmax temperature T.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/distill_study", "Where the runs, the table and the plot go.")


def config_for(layers: int, teacher: str = ""):
    config = lm_shakespeare.get_config()
    config.model.num_layers = layers
    config.train.update(steps=_STEPS.value, checkpoint_every=_STEPS.value, eval_every=100)
    config.train.distill.update(teacher=teacher, weight=_WEIGHT.value, temperature=_TEMPERATURE.value)
    return config


def main(argv):
    del argv
    teacher = os.path.join(_WORKDIR.value, "teacher")
    runs = [("teacher", "teacher (4 layers)", 4, ""), ("alone", "student alone (2 layers)", 2, ""),
            ("distilled", f"student distilled (2 layers, a={_WEIGHT.value:g}, T={_TEMPERATURE.value:g})", 2, teacher)]
    rows, curves = [], {}
    for name, label, layers, teacher_dir in runs:
        config = config_for(layers, teacher_dir)
        workdir = os.path.join(_WORKDIR.value, name)
        train, evals = studies.run_or_reuse(config, workdir)
        resolved = restore.load_config(workdir)
        curves[label] = ([e["step"] for e in evals], [e["loss"] for e in evals])
        rows.append(f"| {label} | {models.parameter_count(resolved.model, config.data.seq_len):,} | "
                    f"{evals[-1]['loss']:.4f} | {train[-1]['wall_s']:.0f} |")
        print(rows[-1], flush=True)
    studies.write_table(_WORKDIR.value, [f"| run | parameters | val loss at {_STEPS.value} | training-loop s |",
                                         "|---|---|---|---|", *rows])
    plots.validation_curves(curves, os.path.join(_WORKDIR.value, "curves.png"), "distillation, tiny Shakespeare")


if __name__ == "__main__":
    app.run(main)
