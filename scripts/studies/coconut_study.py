"""No-CoT vs CoT vs Coconut (with and without its curriculum) vs pause tokens on ProsQA (Hao et al. 2024,
Table 1), one run per method and seed.

    python scripts/studies/coconut_study.py [--variants=nocot,cot,coconut,coconut_flat,pause] [--seeds=0,1,2]
                                    [--workdir=runs/coconut_study] [--report_only]
    python scripts/studies/coconut_study.py --official --workdir=runs/pq_study \
        --set=train.init_from=runs/lookup_whole,data.train_examples=6400,train.steps=1400

Each run is `experiments/configs/coconut_prosqa.py:VARIANT` (ProsQA-style problems, a small transformer from
scratch), or with --official `coconut_prosqa_official.py:VARIANT` (the official distribution, scored on the
official test split, each run starting from the lookup model that `init_from` names), through the shared
trainer (a finished run is not re-run), then greedy batched generation (`experiments/evaluation/reasoning_eval.py`): answer
accuracy on the test problems and on the training problems (--official: the official validation split), language
tokens generated per answer, thoughts per answer, and the training loop's wall time (from the run's metrics).
Runs can be split over processes (e.g. one per core with disjoint --variants); --report_only then
gathers every run's `result.json` into `table.md` and `accuracy.png` in the workdir.
"""

import json
import os

from absl import app, flags
import matplotlib
import numpy as np

from experiments import restore, studies
from experiments.evaluation import reasoning_eval
from experiments.training import cli, metrics_writer, plots
from experiments.configs import coconut_prosqa, coconut_prosqa_official

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_VARIANTS = flags.DEFINE_list("variants", list(coconut_prosqa.VARIANTS), "Methods to train and evaluate.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (model initialisation and problems) per method.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/coconut_study", "Where the runs, the table and the plot go.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only gather the finished runs' results.")
_OVERRIDES = flags.DEFINE_list("set", [], "KEY=VALUE config overrides for every run (e.g. train.steps=200).")
_OFFICIAL = flags.DEFINE_bool("official", False, "The official ProsQA distribution and splits "
                              "(coconut_prosqa_official.py); set train.init_from to the lookup model's run.")

PAPER = {"nocot": 76.7, "cot": 77.5, "coconut": 97.0, "coconut_flat": 76.1, "pause": 75.9}  # Table 1, GPT-2
LABELS = {"nocot": "No-CoT", "cot": "CoT", "coconut": "Coconut", "coconut_flat": "Coconut w/o curriculum",
          "pause": "Pause as thought"}


def run_config(variant: str, seed: int):
    config = (coconut_prosqa_official if _OFFICIAL.value else coconut_prosqa).get_config(variant)
    config.seed = seed
    config.mesh.data = 1
    return cli.override(config, _OVERRIDES.value)


def run(variant: str, seed: int) -> dict:
    workdir = os.path.join(_WORKDIR.value, f"{variant}_seed{seed}")
    result_path = os.path.join(workdir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    studies.run_or_reuse(run_config(variant, seed), workdir)
    train_s = metrics_writer.training_wall_s(workdir)
    config = restore.load_config(workdir)
    split, key = ("eval", "valid_accuracy") if _OFFICIAL.value else ("train", "train_accuracy")
    result = {"variant": variant, "seed": seed, "train_s": train_s, "steps": config.train.steps,
              **reasoning_eval.evaluate(config, workdir, "test"),
              key: reasoning_eval.evaluate(config, workdir, split)["accuracy"]}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


def report(results: list[dict]) -> str:
    key = "valid_accuracy" if _OFFICIAL.value else "train_accuracy"
    lines = [f"| method | test accuracy (mean ± sd over seeds) | per seed | {key.replace('_', ' ')} | language tokens "
             "per answer | thoughts | wall time per run | paper (GPT-2) |", "|---|---|---|---|---|---|---|---|"]
    for variant in coconut_prosqa.VARIANTS:
        rows = [r for r in results if r["variant"] == variant]
        if not rows:
            continue
        acc = np.array([r["accuracy"] for r in rows]) * 100
        lines.append(
            f"| {LABELS[variant]} | {acc.mean():.1f} ± {acc.std():.1f} | "
            f"{' / '.join(f'{a:.1f}' for a in acc)} | {100 * np.mean([r[key] for r in rows]):.1f} | "
            f"{np.mean([r['tokens'] for r in rows]):.1f} | {rows[0]['thoughts']:.0f} | "
            f"{np.mean([r['train_s'] for r in rows]) / 60:.1f} min | {PAPER[variant]} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    variants = [v for v in coconut_prosqa.VARIANTS if any(r["variant"] == v for r in results)]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, v in enumerate(variants):
        acc = [100 * r["accuracy"] for r in results if r["variant"] == v]
        ax.bar(i, np.mean(acc), color="C0", alpha=0.6)
        ax.scatter([i] * len(acc), acc, color="k", s=12, zorder=3)
        ax.scatter([i], [PAPER[v]], marker="_", s=400, color="C3", zorder=4, label="paper (GPT-2)" if i == 0 else None)
    ax.axhline(50, color="gray", ls=":", lw=1, label="chance")
    ax.set(xticks=range(len(variants)), xticklabels=[LABELS[v] for v in variants], ylabel="test accuracy (%)",
           ylim=(0, 100), title="ProsQA official test split, from the lookup model" if _OFFICIAL.value
           else "ProsQA-style, small transformer from scratch")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(loc="lower right", fontsize=8)
    plots.save_figure(fig, path)


def main(argv):
    del argv
    os.makedirs(_WORKDIR.value, exist_ok=True)
    if not _REPORT_ONLY.value:
        for variant in _VARIANTS.value:
            for seed in map(int, _SEEDS.value):
                run(variant, seed)
    results = []
    for name in sorted(os.listdir(_WORKDIR.value)):
        path = os.path.join(_WORKDIR.value, name, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    table = report(results)
    with open(os.path.join(_WORKDIR.value, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(results, os.path.join(_WORKDIR.value, "accuracy.png"))
    print(table)


if __name__ == "__main__":
    app.run(main)
