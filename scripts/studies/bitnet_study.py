"""BitNet b1.58 against its float twin on tiny Shakespeare at equal steps (experiments/configs/lm_shakespeare.py
with `model.bitnet=True`: ternary weights and 8-bit activations in every attention and MLP matmul).

    python scripts/studies/bitnet_study.py [--steps=2000] [--lrs=1e-3,3e-3,1e-2] [--workdir=runs/bitnet_study]

Trains the float LM and the b1.58 LM at each of `--lrs` (Ma et al. train BitNet at a larger lr than its float
twin), and reports validation loss at the end, training-loop seconds, and the weight memory
at inference: float32 for every parameter, against 2-bit packed ternary codes plus one float32 scale per
matrix for the quantised ones (embeddings, norms and positions stay float32). Finished runs are read, not
rerun. Writes `table.md` and `curves.png` to the workdir.
"""

import os

from absl import app, flags
import jax

from experiments import restore, studies
from experiments.training import plots
from experiments.configs import lm_shakespeare
from models import bitnet

_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps per run.")
_LRS = flags.DEFINE_list("lrs", ["1e-3", "3e-3", "1e-2"], "Peak learning rates of the b1.58 runs.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bitnet_study", "Where the runs, the table and the plot go.")

QUANTISED = ("query", "key", "value", "out", "wi", "wo")  # the block matrices BitLinear replaces


def inference_bytes(params, quantised: bool) -> int:
    """Weight bytes at inference: float32, or 2-bit codes + a float32 scale per quantised matrix."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        if quantised and any(n in QUANTISED for n in names) and names[-1] != "bias":
            matrices = leaf.shape[0]  # stacked over the scanned layers: one scale per layer's matrix
            total += bitnet.packed_bytes(leaf.size) + 4 * matrices
        else:
            total += 4 * leaf.size
    return total


def main(argv):
    del argv
    runs = [(f"{kind}_lr{lr}", kind == "b1.58", float(lr)) for kind in ("float", "b1.58") for lr in _LRS.value]
    rows, curves = [], {}
    for name, on, lr in runs:
        config = lm_shakespeare.get_config()
        config.model.bitnet = on
        config.train.update(steps=_STEPS.value, checkpoint_every=_STEPS.value, eval_every=100)
        config.optimizer.lr = lr
        workdir = os.path.join(_WORKDIR.value, name)
        train, evals = studies.run_or_reuse(config, workdir)
        _, variables = restore.load_variables(restore.load_config(workdir), workdir)
        label = f"{'b1.58' if on else 'float'} (lr {config.optimizer.lr:g})"
        curves[label] = ([e["step"] for e in evals], [e["loss"] for e in evals])
        megabytes = inference_bytes(variables["params"], on) / 2**20
        rows.append(f"| {label} | {evals[-1]['loss']:.4f} | {megabytes:.2f} | {train[-1]['wall_s']:.0f} |")
        print(rows[-1], flush=True)
    studies.write_table(_WORKDIR.value, [f"| LM | val loss at {_STEPS.value} | weight MiB at inference | "
                                         "training-loop s |", "|---|---|---|---|", *rows])
    plots.validation_curves(curves, os.path.join(_WORKDIR.value, "curves.png"),
                            "BitNet b1.58 vs float, tiny Shakespeare")


if __name__ == "__main__":
    app.run(main)
