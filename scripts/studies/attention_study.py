"""MHA vs GQA vs MLA, and MTP (D = 1) vs none, on tiny Shakespeare at matched parameter counts and the same
budget, several seeds.

    python scripts/studies/attention_study.py [--steps=2000] [--seeds=0,1,2] [--kinds=MHA,GQA,MLA,MHA+MTP] \
        [--workdir=runs/attention_study]

The LM config (experiments/configs/lm_shakespeare.py: 4 layers, width 128, 4 heads of 32, context 64) with
RoPE positions for every kind (MLA's decoupled RoPE needs them). GQA shares one key/value head among the 4
query heads; MLA caches a joint latent of d_c = 4 d_h = 128 and a shared rotary key of d_h / 2 = 16
(DeepSeek-V2's ratios), queries projected directly. Attention parameter counts differ, so each kind's MLP
width is set to bring its total parameter count to MHA's (within 1%). MHA+MTP is the MHA model trained with one
multi-token-prediction module (lambda 0.3; the module is dropped at inference, so the main model is MHA's);
its row adds the acceptance rate of greedy self-speculative decoding (module 1 drafting one token per pass)
on 8 validation prompts of 16 bytes continued by 48. Also trains the 2-layer MHA draft model that
scripts/benchmarks/bench_decode.py uses (`draft_seed0`). Reports validation loss (mean and sd over seeds, and per seed;
the main head's), parameters and the cache numbers per token per layer. Finished runs are read, not rerun.
Writes `table.md` and `curves.png` (seed-mean curves).
"""

import os

from absl import app, flags
import jax
import numpy as np

import data as datasets
import models
from experiments import restore, studies
from experiments.training import plots
from experiments.configs import lm_shakespeare
from models import mla, speculative

_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps per run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per kind.")
_KINDS = flags.DEFINE_list("kinds", ["MHA", "GQA", "MLA", "MHA+MTP"], "Variants to compare.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/attention_study", "Where the runs, the table and the plot go.")

KINDS = {"MHA": dict(attention="gqa", num_kv_heads=0), "GQA": dict(attention="gqa", num_kv_heads=1),
         "MLA": dict(attention="mla", kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
         "MHA+MTP": dict(attention="gqa", num_kv_heads=0, mtp_depth=1), "draft": dict(attention="gqa", num_layers=2)}
UNMATCHED = ("MHA", "MHA+MTP", "draft")  # MHA's own MLP width (the MTP module is not part of the inference model)


def base_config(kind: str, seed: int, d_mlp: int | None = None):
    config = lm_shakespeare.get_config()
    config.seed = seed
    config.model.update(positional="rope", vocab_size=256, max_len=64, **KINDS[kind])
    if d_mlp:
        config.model.d_mlp = d_mlp
    config.train.update(steps=_STEPS.value, checkpoint_every=_STEPS.value, eval_every=100)
    return config


def matched_d_mlp(kind: str, target: int) -> int:
    """The MLP width (a multiple of 8) that brings `kind`'s parameter count closest to `target`."""
    count = lambda d: models.parameter_count(base_config(kind, 0, d).model, 64)  # noqa: E731
    per_width = (count(512) - count(256)) / 256
    return int(round((512 + (target - count(512)) / per_width) / 8) * 8)


def cache_numbers(model) -> int:
    if model.attention == "mla":
        return mla.cache_numbers_per_token(model)
    return 2 * model.kv_heads * model.head_size


def mtp_acceptance(workdir: str) -> float:
    """Greedy self-speculation's acceptance rate on 8 validation prompts (16 bytes, continued by 48)."""
    config = restore.load_config(workdir)
    model, variables = restore.load_variables(config, workdir)
    prompts = np.asarray(datasets.load(config.data, seed=0).evals["eval"]["inputs"])[:8, :16]
    drafted = accepted = 0
    for prompt in prompts:
        _, stats = speculative.generate_with_mtp(model, variables, jax.numpy.asarray(prompt[None]), 48)
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    return accepted / drafted


def main(argv):
    del argv
    target = models.parameter_count(base_config("MHA", 0).model, 64)
    rows, curves = [], {}
    for kind in _KINDS.value:
        d_mlp = 512 if kind in UNMATCHED else matched_d_mlp(kind, target)
        finals, per_step, acceptance = [], [], []
        for seed in map(int, _SEEDS.value):
            config = base_config(kind, seed, d_mlp)
            workdir = os.path.join(_WORKDIR.value, f"{kind}_seed{seed}")
            _, evals = studies.run_or_reuse(config, workdir)
            finals.append(evals[-1]["loss"])
            per_step.append(([e["step"] for e in evals], [e["loss"] for e in evals]))
            if config.model.mtp_depth:
                acceptance.append(mtp_acceptance(workdir))
        steps = per_step[0][0]
        curves[kind] = (steps, np.mean([losses for _, losses in per_step], axis=0))
        model = base_config(kind, 0, d_mlp).model
        model_cfg = models.MODELS[model.name][1](**model.to_dict())
        params = models.parameter_count(model, 64, exclude=("mtp_1",))  # the inference model
        accept = f"{np.mean(acceptance):.3f} ({', '.join(f'{a:.3f}' for a in acceptance)})" if acceptance else "-"
        rows.append(f"| {kind} | {params:,} | {d_mlp} | {cache_numbers(model_cfg)} | {np.mean(finals):.4f} ± "
                    f"{np.std(finals, ddof=1) if len(finals) > 1 else 0:.4f} | {', '.join(f'{x:.4f}' for x in finals)} "
                    f"| {accept} |")
        print(rows[-1], flush=True)
    studies.run_or_reuse(base_config("draft", 0, 512), os.path.join(_WORKDIR.value, "draft_seed0"))
    studies.write_table(_WORKDIR.value, [f"| variant | parameters | d_mlp | cache numbers / token / layer | val loss at "
                                         f"{_STEPS.value} (mean ± sd) | per seed | MTP acceptance (per seed) |",
                                         "|---|---|---|---|---|---|---|", *rows])
    plots.validation_curves(curves, os.path.join(_WORKDIR.value, "curves.png"),
                            "MHA vs GQA vs MLA at matched parameters, tiny Shakespeare (seed mean)")


if __name__ == "__main__":
    app.run(main)
