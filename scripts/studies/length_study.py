"""Length extrapolation on tiny Shakespeare (bytes): each position option trained at one context, evaluated at 1x-8x;
then a RoPE model extended to 4x its context by each RoPE scaling, without training and with a short fine-tune,
against training at the long context from scratch (experiments/evaluation/length_eval.py, train.init_from).

    python scripts/studies/length_study.py [--seq_len=128] [--steps=2000] [--finetune_steps=200] [--max_windows=64]
        [--workdir=runs/length_study]

1. sinusoidal, RoPE, ALiBi, NoPE and T5 bias at `seq_len` (the LM config's shape and budget otherwise), evaluated at
   1x, 2x, 4x and 8x; the loss per length and per context-length bucket of positions.
2. The RoPE run at 4x: plain RoPE, linear interpolation (PI), NTK-aware, dynamic NTK and YaRN (factor 4) applied
   without training, then each fine-tuned `finetune_steps` steps at 4x (train.init_from); and RoPE trained at 4x
   from scratch for `steps` steps. Loss at 4x (and 8x of the original context).
Anchors: Press et al. 2022 (ALiBi extrapolates with flat perplexity; sinusoidal and RoPE degrade), Chen et al. 2023
(PI reaches long context in ~1000 steps), Peng et al. 2023 (YaRN needs ~10x fewer tokens than PI).
Finished runs are read, not rerun. Writes `table.md` and `length.png` to the workdir.
"""

import os

from absl import app, flags
import matplotlib

from experiments import studies
from experiments.evaluation import length_eval
from experiments.configs import lm_shakespeare
from experiments.training import plots  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OPTIONS = {"sinusoidal": dict(positional="sinusoidal"), "rope": dict(positional="rope"),
           "alibi": dict(positional="alibi"), "nope": dict(positional="none"),
           "t5": dict(positional="t5", t5_buckets=32, t5_max_distance=128)}
SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn")
FACTORS = (1, 2, 4, 8)
EXTEND = 4

_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "The training context of part 1.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps of each run trained from scratch.")
_FINETUNE = flags.DEFINE_integer("finetune_steps", 200, "Fine-tuning steps at 4x for each RoPE scaling.")
_WINDOWS = flags.DEFINE_integer("max_windows", 64, "Evaluation windows per length (the first ones).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/length_study", "Where the runs, the table and the plot go.")


def config_for(model: dict, seq_len: int, steps: int, init_from: str = ""):
    config = lm_shakespeare.get_config()
    config.model.update(max_len=seq_len, **model)
    config.data.seq_len = seq_len
    config.train.update(steps=steps, checkpoint_every=steps, eval_every=steps, init_from=init_from)
    if init_from:
        config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 2)
    return config


def scaling_keys(scaling: str) -> dict:
    if scaling == "none":
        return dict(rope_scaling="none")
    return dict(rope_scaling=scaling, rope_factor=float(EXTEND), rope_original_max_len=_SEQ_LEN.value)


def main(argv):
    del argv
    seq_len, long = _SEQ_LEN.value, EXTEND * _SEQ_LEN.value
    lines = [f"| position | {' | '.join(f'{f * seq_len}' for f in FACTORS)} |", "|---|" + "---|" * len(FACTORS)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, keys in OPTIONS.items():
        workdir = os.path.join(_WORKDIR.value, name)
        studies.run_or_reuse(config_for(keys, seq_len, _STEPS.value), workdir)
        report = length_eval.length_report(workdir, list(FACTORS), _WINDOWS.value)
        lines.append(f"| {name} | " + " | ".join(f"{report['factors'][str(f)]['loss']:.3f}" for f in FACTORS) + " |")
        curve = report["curves"][str(FACTORS[-1])]
        ax.plot(range(1, len(curve) + 1), curve, label=name, lw=1)
        print(lines[-1], flush=True)
    rope = os.path.join(_WORKDIR.value, "rope")
    lines += ["", f"| RoPE extended to {long} | zero-shot at {long} | fine-tuned {_FINETUNE.value} steps, at {long} | "
              f"at {2 * long} |", "|---|---|---|---|"]
    for scaling in SCALINGS:
        keys = dict(positional="rope", **scaling_keys(scaling))
        zero_shot = length_eval.length_report(rope, [EXTEND], _WINDOWS.value, dict(max_len=long, **keys))
        tuned_dir = os.path.join(_WORKDIR.value, f"rope_{scaling}_finetuned")
        studies.run_or_reuse(config_for(keys, long, _FINETUNE.value, init_from=rope), tuned_dir)
        tuned = length_eval.length_report(tuned_dir, [1, 2], _WINDOWS.value)
        lines.append(f"| {scaling} | {zero_shot['factors'][str(EXTEND)]['loss']:.3f} | "
                     f"{tuned['factors']['1']['loss']:.3f} | {tuned['factors']['2']['loss']:.3f} |")
        print(lines[-1], flush=True)
    scratch_dir = os.path.join(_WORKDIR.value, "rope_scratch_long")
    studies.run_or_reuse(config_for(dict(positional="rope"), long, _STEPS.value), scratch_dir)
    scratch = length_eval.length_report(scratch_dir, [1, 2], _WINDOWS.value)
    lines.append(f"| trained at {long} from scratch ({_STEPS.value} steps) | - | {scratch['factors']['1']['loss']:.3f} | "
                 f"{scratch['factors']['2']['loss']:.3f} |")
    studies.write_table(_WORKDIR.value, lines)
    ax.axvline(seq_len, color="gray", ls="--", lw=0.8, label="training context")
    ax.set(xlabel="position", ylabel="validation loss (nats)", xscale="log",
           title=f"loss by position at {FACTORS[-1] * seq_len} tokens, trained at {seq_len}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plots.save_figure(fig, os.path.join(_WORKDIR.value, "length.png"))


if __name__ == "__main__":
    app.run(main)
