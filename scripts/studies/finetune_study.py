"""Fine-tuning studies from one base: LoRA against full fine-tuning, and merging two fine-tunes.

    PYTHONPATH=. python scripts/studies/finetune_study.py --out=runs/finetune_study

The base learns chained addition x_1 + x_2 + x_3 mod 23 with its partial results (experiments/configs/grpo.py's
task and model, `data.op_token`: each operation has its own `=` token, so one vocabulary serves every task and
the input says which operation). From it:
- LoRA: fine-tunes on subtraction chains (a-b), full and LoRA at ranks 1, 4, 16 on every kernel of the blocks,
  each at two learning rates, equal steps: trainable parameters, optimizer-state bytes, held-out loss and chain
  accuracy, and the chain accuracy left on the base's task (forgetting).
- Merging: full fine-tunes on subtraction (a-b) and multiplication (a*b) chains merged onto the base by each
  method of experiments/posttrain/merge.py; every model's held-out chain accuracy on all three operations. Two fine-tuning
  recipes: the base's (lr 3e-4, weight decay 1) and a gentle one (lr 1e-4, no weight decay), which stays nearer
  the base.
Held-out chains are decoded greedily (scripts/studies/grpo_study.py's measure). Writes results.json, lora.md,
merge.md and finetune_study.png.
"""

import json
import os

from absl import app, flags
from experiments.training import plots

flags.DEFINE_string("out", "runs/finetune_study", "the study's folder")
flags.DEFINE_integer("base_steps", 400, "steps of the base on addition")
flags.DEFINE_integer("steps", 300, "steps of every fine-tune")
flags.DEFINE_bool("replot", False, "only rewrite the tables and plots from --out's results.json")
FLAGS = flags.FLAGS

OPS = ("a+b", "a-b", "a*b")
LORA_TARGETS = "*attention/query,*attention/key,*attention/value,*attention/out,*mlp/wi/kernel,*mlp/wo/kernel"
MERGES = {"task arithmetic, lambda 0.5": ("task_arithmetic", dict(scale=0.5)),
          "task arithmetic, lambda 1": ("task_arithmetic", dict(scale=1.0)),
          "TIES, density 0.2": ("ties", dict(scale=1.0, density=0.2)),
          "DARE, density 0.3, lambda 0.5": ("dare", dict(scale=0.5, density=0.3)),
          "SLERP, t 0.5": ("slerp", dict(t=0.5))}


def config_for(op: str, overrides: dict):
    from experiments import studies
    from experiments.configs import grpo

    config = grpo.get_config("sft")
    config.data.update(op=op, op_token=True)
    config.train.update(eval_every=0, log_every=50)
    return studies.with_overrides(config, overrides)


def train(op: str, workdir: str, overrides: dict) -> tuple[list[dict], list[dict]]:
    """(train events, eval events) of the run, trained unless it finished."""
    from experiments import studies

    return studies.run_or_reuse(config_for(op, overrides), workdir)


def chain_accuracy(workdir: str, op: str) -> float:
    """Greedy held-out chain accuracy of the run in `workdir` on `op`'s test chains."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import data
    from experiments import restore
    from experiments.objectives import grpo
    from models import sampling

    config = restore.load_config(workdir)
    model, variables = restore.load_variables(config, workdir)
    data_config = config.data
    data_config.op = op
    test = data.load(data_config, config.seed).evals["eval"]
    prompt_len = grpo.prompt_length(test)
    steps = test["inputs"].shape[1] - prompt_len + 1
    prompts = jnp.asarray(test["inputs"][:4096, :prompt_len])
    chain = sampling.generate(model, variables, prompts, model.init_cache(len(prompts), prompt_len + steps),
                              jax.random.key(0), num_tokens=steps, temperature=0.0)
    return float(np.mean(np.all(np.asarray(chain) == test["targets"][:4096, prompt_len - 1:], axis=1)))


def state_sizes(op: str, overrides: dict) -> dict:
    """Trainable parameters and optimizer-state bytes of a run's train state (abstract: nothing is computed)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import data
    import models
    from experiments.posttrain import lora
    from experiments.training import train_state, trainer

    config = config_for(op, overrides)
    splits = data.load(config.data, config.seed)
    config = trainer.resolve(config, splits)
    model = models.build(config.model)
    example = jax.ShapeDtypeStruct((1, splits.seq_len), jnp.int32)
    tx = train_state.make_optimizer(config, model, example)
    state = jax.eval_shape(lambda r: train_state.init_state(model, tx, example, r, lora_config=lora.LoRAConfig(
        **config.train.lora.to_dict())), jax.random.key(0))
    state = nn.meta.unbox(state)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    return {"trainable": sum(int(np.prod(x.shape)) for x in moments) // 2,
            "optimizer_bytes": sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in moments),
            "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))}


def lora_part(base: str) -> list[dict]:
    runs = [("full", 0, 3e-4), ("full", 0, 1e-3), *[("lora", r, lr) for r in (1, 4, 16) for lr in (1e-3, 3e-3)]]
    results = []
    for kind, rank, lr in runs:
        name = f"{kind}_r{rank}_lr{lr:g}" if rank else f"{kind}_lr{lr:g}"
        overrides = {"train.init_from": base, "train.steps": FLAGS.steps, "train.checkpoint_every": FLAGS.steps,
                     "optimizer.lr": lr}
        if rank:
            overrides.update({"train.lora.rank": rank, "train.lora.alpha": 2.0 * rank, "train.lora.targets": LORA_TARGETS})
        train_events, eval_events = train("a-b", os.path.join(FLAGS.out, name), overrides)
        final = eval_events[-1]
        results.append({"run": name, "kind": kind, "rank": rank, "lr": lr, **state_sizes("a-b", overrides),
                        "test_loss": final["loss"], "chain_acc": chain_accuracy(os.path.join(FLAGS.out, name), "a-b"),
                        "base_task_acc": chain_accuracy(os.path.join(FLAGS.out, name), "a+b"),
                        "train_loss": train_events[-1]["loss"]})
        print(json.dumps(results[-1]), flush=True)
    return results


RECIPES = {"lr 3e-4, weight decay 1": ("merge_ft", {"optimizer.lr": 3e-4}),  # the base's recipe
           "lr 1e-4, no weight decay": ("merge_gentle_ft", {"optimizer.lr": 1e-4, "optimizer.adamw.weight_decay": 0.0})}


def merge_part(base: str) -> list[dict]:
    """Both fine-tunes by each recipe of RECIPES, their merges, and every model on the three operations."""
    from experiments.posttrain import merge

    models_ = {("-", "base (a+b)"): base}
    for recipe, (prefix, recipe_overrides) in RECIPES.items():
        tuned = {}
        for op in ("a-b", "a*b"):
            workdir = os.path.join(FLAGS.out, f"{prefix}_{op.replace('*', 'x')}")
            train(op, workdir, {"train.init_from": base, "train.steps": FLAGS.steps,
                                "train.checkpoint_every": FLAGS.steps, **recipe_overrides})
            tuned[op] = workdir
        models_[(recipe, "fine-tune a-b")], models_[(recipe, "fine-tune a*b")] = tuned["a-b"], tuned["a*b"]
        for name, (method, options) in MERGES.items():
            workdir = os.path.join(FLAGS.out, f"merged_{prefix}_" + name.replace(" ", "_").replace(",", ""))
            if not os.path.exists(os.path.join(workdir, "config.json")):
                merge.merge_runs(base, [tuned["a-b"], tuned["a*b"]], workdir, method, **options)
            models_[(recipe, name)] = workdir
    results = []
    for (recipe, name), workdir in models_.items():
        results.append({"recipe": recipe, "model": name, **{op: chain_accuracy(workdir, op) for op in OPS}})
        print(json.dumps(results[-1]), flush=True)
    return results


def write_tables(lora_results, merge_results):
    lines = ["| run | rank | lr | trainable parameters | optimizer state (bytes) | held-out loss | held-out chain accuracy "
             "| a+b (the base's task) after |", "|---|---|---|---|---|---|---|---|"]
    for r in lora_results:
        lines.append(f"| {r['kind']} | {r['rank'] or '-'} | {r['lr']:g} | {r['trainable']:,} of {r['parameters']:,} | "
                     f"{r['optimizer_bytes']:,} | {r['test_loss']:.3f} | {r['chain_acc']:.3f} | {r['base_task_acc']:.3f} |")
    with open(os.path.join(FLAGS.out, "lora.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    lines = ["| fine-tunes | model | a+b | a-b | a*b |", "|---|---|---|---|---|"]
    for r in merge_results:
        lines.append(f"| {r['recipe']} | {r['model']} | {r['a+b']:.3f} | {r['a-b']:.3f} | {r['a*b']:.3f} |")
    with open(os.path.join(FLAGS.out, "merge.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(lora_results, merge_results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for lr, marker in ((1e-3, "o"), (3e-3, "s"), (3e-4, "^")):
        for kind, color in (("lora", "C0"), ("full", "C3")):
            points = sorted((r["trainable"], r["test_loss"]) for r in lora_results if r["kind"] == kind and r["lr"] == lr)
            if points:
                left.plot(*zip(*points), marker=marker, color=color, linestyle="-" if kind == "lora" else "none",
                          label=f"{'LoRA r = 1, 4, 16' if kind == 'lora' else 'full'}, lr {lr:g}")
    left.set(xscale="log", yscale="log", xlabel="trainable parameters (= Adam state / 8 bytes)",
             ylabel="held-out loss after 300 steps", title="fine-tuning a+b -> a-b chains: LoRA vs full")
    left.legend(fontsize=8)
    labels = [f"{r['model']}" + ("" if r["recipe"] == "-" else f"\n({r['recipe'].split(',')[0]})") for r in merge_results]
    x = np.arange(len(merge_results))
    for i, op in enumerate(OPS):
        right.bar(x + (i - 1) * 0.27, [r[op] for r in merge_results], width=0.27, label=op)
    right.set_xticks(x, labels, rotation=75, fontsize=6)
    right.set(ylabel="held-out chain accuracy", title="merging the a-b and a*b fine-tunes")
    right.legend(fontsize=8)
    plots.save_figure(fig, os.path.join(FLAGS.out, "finetune_study.png"))


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    if FLAGS.replot:
        with open(os.path.join(FLAGS.out, "results.json")) as f:
            results = json.load(f)
        write_tables(results["lora"], results["merge"])
        return plot(results["lora"], results["merge"])
    base = os.path.join(FLAGS.out, "base")
    train("a+b", base, {"train.steps": FLAGS.base_steps, "train.checkpoint_every": FLAGS.base_steps,
                        "optimizer.lr": 1e-3})
    merge_results = merge_part(base)
    lora_results = lora_part(base)
    with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
        json.dump({"lora": lora_results, "merge": merge_results}, f, indent=1)
    write_tables(lora_results, merge_results)
    plot(lora_results, merge_results)


if __name__ == "__main__":
    app.run(main)
