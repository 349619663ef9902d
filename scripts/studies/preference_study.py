"""The preference study: DPO, conservative DPO, DPO with an SFT term, IPO, KTO, SimPO and ORPO from one SFT start,
on a task where a program knows the right answer (experiments/configs/preference.py), beside continued SFT.

    PYTHONPATH=. python scripts/studies/preference_study.py --task=arithmetic --out=runs/preference_study

Trains the SFT run (once), then every (kind, beta) of --grid from it through the one trainer, and measures each
against the SFT model, which is also the reference. Kinds: those of experiments/objectives/preference.py, `cdpo` (DPO with
label smoothing 0.1), `dpo_sft` (DPO plus the chosen responses' cross-entropy, weight 1) and `sft` (more SFT
steps, the baseline; its beta is ignored).
    accuracy     held-out answers: arithmetic, the argmax at `=` over the test pairs; prontoqa, greedy chains of
                 thought on the 500 test problems (experiments/evaluation/reasoning_eval.py)
    pair_acc     the fraction of held-out (eval split) pairs with log pi(y_w) > log pi(y_l)
    kl_ref       mean over held-out chosen responses of sum_t KL(pi(. | y_<t) || pi_ref(. | y_<t))
    chosen_logp  mean log pi(y_w) over the held-out chosen responses (DPO is known to lower it too)
Writes results.json, a markdown table (table.md) and accuracy_vs_kl.png (the reward-vs-KL frontier of the DPO
paper's Figure 2, with held-out accuracy as the reward a program checks).
"""

import json
import os
import sys

from absl import app, flags
from experiments.training import plots

flags.DEFINE_string("out", "runs/preference_study", "the study's folder: one run folder per point, and the results")
flags.DEFINE_string("task", "arithmetic", "arithmetic | prontoqa (experiments/configs/preference.py)")
flags.DEFINE_string("grid", "sft:0;dpo:0.03,0.1,0.3;cdpo:0.1;dpo_sft:0.1;ipo:0.03,0.1,0.3;kto:0.03,0.1,0.3;simpo:1,2,4;"
                    "orpo:0.03,0.1,0.3", "kind:beta,beta;... (the module docstring's kinds)")
flags.DEFINE_integer("sft_steps", 0, "training steps of the SFT start; 0: the config's")
flags.DEFINE_integer("steps", 500, "training steps of each run from the SFT start")
flags.DEFINE_float("lr", 1e-4, "their peak learning rate")
FLAGS = flags.FLAGS


def grid(text: str) -> list[tuple[str, float]]:
    return [(kind, float(beta)) for part in text.split(";") for kind, betas in [part.split(":")]
            for beta in betas.split(",")]


def train(variant: str, workdir: str, overrides: dict):
    """Trains the config `variant` with `overrides` ("section.key" -> value) in workdir, unless it finished there
    (an interrupted run resumes)."""
    from experiments import studies
    from experiments.configs import preference

    config = preference.get_config(f"{FLAGS.task},{variant}")
    studies.run_or_reuse(studies.with_overrides(config, overrides), workdir)


def held_out_pairs(config):
    """The eval split's chosen and rejected rows (no run trains on them)."""
    import data

    return data.load(config.data, config.seed).evals["eval"]


def measure(workdir: str, reference) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import losses, restore
    from experiments.evaluation import reasoning_eval
    from experiments.objectives import preference

    config = restore.load_config(workdir)
    model, variables = restore.load_variables(config, workdir)
    pairs = held_out_pairs(config)
    apply = jax.jit(model.apply)
    logits = apply(variables, jnp.asarray(pairs["inputs"]))
    rejected_logits = apply(variables, jnp.asarray(pairs["rejected_inputs"]))
    ref_logits = jax.jit(reference[0].apply)(reference[1], jnp.asarray(pairs["inputs"]))
    chosen, _ = losses.sequence_logps(logits, pairs["targets"], pairs["loss_mask"])
    rejected, _ = losses.sequence_logps(rejected_logits, pairs["rejected_targets"], pairs["rejected_loss_mask"])
    kl = jnp.sum(preference.token_kl(logits, ref_logits) * pairs["loss_mask"], axis=-1)
    if config.data.name == "algorithmic":  # one answer token: its argmax is the answer
        mask = pairs["loss_mask"] > 0
        accuracy = float(np.mean((np.asarray(jnp.argmax(logits, -1)) == pairs["targets"])[mask]))
    else:
        accuracy = reasoning_eval.evaluate(config, workdir, split="test")["accuracy"]
    return {"accuracy": accuracy, "pair_acc": float(np.mean(chosen > rejected)), "kl_ref": float(jnp.mean(kl)),
            "chosen_logp": float(jnp.mean(chosen)), "rejected_logp": float(jnp.mean(rejected))}


def write_table(results: list[dict], path: str):
    lines = ["| method | beta | test accuracy | held-out pair accuracy | KL to the SFT model (nats / response) | "
             "log pi(y_w) | log pi(y_l) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['kind']} | {r['beta']:g} | {r['accuracy']:.3f} | {r['pair_acc']:.3f} | {r['kl_ref']:.3f} | "
                     f"{r['chosen_logp']:.2f} | {r['rejected_logp']:.2f} |")
    from experiments import studies

    studies.write_table(os.path.dirname(path), lines)  # prints it and writes path (table.md)


def plot(results: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    start = next(r for r in results if r["kind"] == "start")
    ax.axhline(start["accuracy"], color="gray", linestyle=":", label="SFT start")
    for kind in dict.fromkeys(r["kind"] for r in results if r["kind"] != "start"):
        points = sorted((r["kl_ref"], r["accuracy"], r["beta"]) for r in results if r["kind"] == kind)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=kind)
        for x, y, beta in points:
            ax.annotate(f"{beta:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="KL(policy || SFT reference), nats per held-out response", ylabel="held-out test accuracy",
           title=f"{FLAGS.task}: preference optimisation from SFT (beta annotated)")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.legend(fontsize=8)
    plots.save_figure(fig, path)


def main(argv):
    del argv
    from experiments import restore

    os.makedirs(FLAGS.out, exist_ok=True)
    sft_dir = os.path.join(FLAGS.out, "sft")
    train("sft", sft_dir, {"train.steps": FLAGS.sft_steps} if FLAGS.sft_steps else {})
    reference = restore.load_variables(restore.load_config(sft_dir), sft_dir)
    results_path = os.path.join(FLAGS.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else []
    done = {(r["kind"], r["beta"]) for r in results}
    if ("start", 0.0) not in done:
        results.append({"kind": "start", "beta": 0.0, **measure(sft_dir, reference)})
    for kind, beta in grid(FLAGS.grid):
        if (kind, beta) in done:
            continue
        workdir = os.path.join(FLAGS.out, f"{kind}_{beta:g}")
        overrides = {"train.init_from": sft_dir, "train.steps": FLAGS.steps, "train.checkpoint_every": FLAGS.steps,
                     "train.eval_every": FLAGS.steps, "optimizer.lr": FLAGS.lr}
        if kind != "sft":
            overrides["train.preference.beta"] = beta
        if kind == "cdpo":
            overrides["train.preference.label_smoothing"] = 0.1
        if kind == "dpo_sft":
            overrides["train.preference.sft_weight"] = 1.0
        train({"cdpo": "dpo", "dpo_sft": "dpo"}.get(kind, kind), workdir, overrides)
        results.append({"kind": kind, "beta": beta, **measure(workdir, reference)})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    write_table(results, os.path.join(FLAGS.out, "table.md"))
    plot(results, os.path.join(FLAGS.out, "accuracy_vs_kl.png"))


if __name__ == "__main__":
    app.run(main)
