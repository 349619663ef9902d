"""The GRPO study: an SFT start on chained modular addition (experiments/configs/grpo.py), then equal-step runs
from it: continued SFT, GRPO with the outcome reward, GRPO with the process reward (and the outcome reward
without its KL penalty), each measured on the held-out chains by greedy decoding.

    PYTHONPATH=. python scripts/studies/grpo_study.py --out=runs/grpo_study

    chain_acc   held-out chains whose every step is right (the outcome reward, greedy)
    answer_acc  held-out chains whose last step (the answer) is right
    step_acc    the fraction of held-out steps that are right (teacher-forced on the model's own chain: a step
                right after a wrong one counts, as the task's table was used right)
    kl_ref      the mean over held-out reference chains of sum_t KL(pi || pi_sft)
Every run sees 256 rows a step (GRPO: 32 prompts x 8 completions; SFT: 256 reference chains); each GRPO run
repeats at every rollout seed of --seeds (train.grpo.seed; the table gives the mean [min, max]). Writes results.json, table.md and
reward_curves.png (the rollouts' mean outcome reward per logged step, every seed).
"""

import json
import os

from absl import app, flags
from experiments.training import plots

flags.DEFINE_string("out", "runs/grpo_study", "the study's folder: one run folder per variant, and the results")
flags.DEFINE_integer("sft_steps", 100, "training steps of the SFT start (partly right: the study needs room)")
flags.DEFINE_integer("steps", 300, "training steps of each run from the SFT start")
flags.DEFINE_float("lr", 3e-4, "their peak learning rate")
flags.DEFINE_string("runs", "sft,outcome,process,outcome_nokl", "the runs from the start")
flags.DEFINE_string("seeds", "0,1,2", "each GRPO run's rollout seeds (train.grpo.seed; SFT is deterministic)")
FLAGS = flags.FLAGS


def train(variant: str, workdir: str, overrides: dict):
    from experiments import studies
    from experiments.configs import grpo

    config = grpo.get_config(variant)
    studies.run_or_reuse(studies.with_overrides(config, overrides), workdir)


def measure(workdir: str, reference) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import data
    from experiments import restore
    from experiments.objectives import grpo, preference
    from models import sampling

    config = restore.load_config(workdir)
    model, variables = restore.load_variables(config, workdir)
    test = data.load(config.data, config.seed).evals["eval"]
    prompt_len = grpo.prompt_length(test)
    steps = test["inputs"].shape[1] - prompt_len + 1
    chains = []
    for start in range(0, len(test["inputs"]), 2048):
        prompts = jnp.asarray(test["inputs"][start:start + 2048, :prompt_len])
        cache = model.init_cache(len(prompts), prompt_len + steps)
        chains.append(np.asarray(sampling.generate(model, variables, prompts, cache, jax.random.key(0),
                                                   num_tokens=steps, temperature=0.0)))
    chain = np.concatenate(chains)
    reference_chain = test["targets"][:, prompt_len - 1:]
    operands = test["inputs"][:, :prompt_len - 1]
    p = config.data.p
    # A step is right when it is its predecessor (in the model's own chain) plus the next operand.
    previous = np.concatenate([operands[:, :1], chain[:, :-1]], axis=1)
    step_right = chain == (previous + operands[:, 1:]) % p
    logits = jax.jit(model.apply)(variables, jnp.asarray(test["inputs"][:4096]))
    ref_logits = jax.jit(reference[0].apply)(reference[1], jnp.asarray(test["inputs"][:4096]))
    kl = jnp.sum(preference.token_kl(logits, ref_logits) * test["loss_mask"][:4096], axis=-1)
    return {"chain_acc": float(np.mean(np.all(chain == reference_chain, axis=1))),
            "answer_acc": float(np.mean(chain[:, -1] == reference_chain[:, -1])),
            "step_acc": float(np.mean(step_right)), "kl_ref": float(jnp.mean(kl))}


def reward_curve(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["grpo/reward"]) for r in rows if r["split"] == "train" and "grpo/reward" in r]


def write_table(results: list[dict], path: str):
    lines = ["| run | held-out chain accuracy | answer accuracy | step accuracy | KL to the SFT start (nats / chain) | "
             "last rollout reward |", "|---|---|---|---|---|---|"]

    def cell(r, key):  # the mean over seeds [min, max]
        low_high = r.get(f"{key}_range")
        return f"{r[key]:.3f}" + (f" [{low_high[0]:.2f}, {low_high[1]:.2f}]" if low_high and len(r["seeds"]) > 1 else "")

    for r in results:
        rewards = [seed["reward"][-1][1] for seed in r.get("seeds", []) if seed["reward"]]
        reward = f"{sum(rewards) / len(rewards):.3f}" if rewards else "-"
        lines.append(f"| {r['run']} | {cell(r, 'chain_acc')} | {cell(r, 'answer_acc')} | {cell(r, 'step_acc')} | "
                     f"{cell(r, 'kl_ref')} | {reward} |")
    from experiments import studies

    studies.write_table(os.path.dirname(path), lines)  # prints it and writes path (table.md)


def plot(results: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for color, r in zip(("C0", "C1", "C2", "C3", "C4"), [r for r in results if r.get("seeds")]):
        for i, seed in enumerate(s for s in r["seeds"] if s["reward"]):
            ax.plot([s for s, _ in seed["reward"]], [v for _, v in seed["reward"]], color=color, alpha=0.8,
                    label=r["run"] if i == 0 else None)
    start = next(r for r in results if r["run"] == "SFT start")
    ax.axhline(start["chain_acc"], color="gray", linestyle=":", label="SFT start, held-out greedy")
    ax.set(xlabel="step from the SFT start", ylabel="mean outcome reward of the rollouts (T = 1)",
           title="GRPO on x1+x2+x3 mod 23 with its chain", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    plots.save_figure(fig, path)


METRICS = ("chain_acc", "answer_acc", "step_acc", "kl_ref")


def main(argv):
    del argv
    import numpy as np

    from experiments import restore

    os.makedirs(FLAGS.out, exist_ok=True)
    sft_dir = os.path.join(FLAGS.out, "sft_start")
    train("sft", sft_dir, {"train.steps": FLAGS.sft_steps, "train.checkpoint_every": FLAGS.sft_steps})
    reference = restore.load_variables(restore.load_config(sft_dir), sft_dir)
    results = [{"run": "SFT start", **measure(sft_dir, reference)}]
    for run in FLAGS.runs.split(","):
        seeds = []
        for seed in map(int, FLAGS.seeds.split(",") if run != "sft" else [0]):
            workdir = os.path.join(FLAGS.out, run if seed == 0 else f"{run}_seed{seed}")
            overrides = {"train.init_from": sft_dir, "train.steps": FLAGS.steps, "train.checkpoint_every": FLAGS.steps,
                         "train.eval_every": FLAGS.steps, "optimizer.lr": FLAGS.lr}
            if run != "sft":
                overrides["train.grpo.seed"] = seed
            if run == "outcome_nokl":
                overrides["train.grpo.kl_beta"] = 0.0
            train(run.removesuffix("_nokl"), workdir, overrides)
            seeds.append({**measure(workdir, reference), "reward": reward_curve(workdir)})
        name = {"sft": "continued SFT", "outcome": "GRPO, outcome reward", "process": "GRPO, process reward",
                "outcome_nokl": "GRPO, outcome reward, no KL"}.get(run, run)
        results.append({"run": name, "seeds": seeds, **{k: float(np.mean([r[k] for r in seeds])) for k in METRICS},
                        **{f"{k}_range": [min(r[k] for r in seeds), max(r[k] for r in seeds)] for k in METRICS},
                        "reward": seeds[0]["reward"]})
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("reward", "seeds")}), flush=True)
    with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_table(results, os.path.join(FLAGS.out, "table.md"))
    plot(results, os.path.join(FLAGS.out, "reward_curves.png"))


if __name__ == "__main__":
    app.run(main)
