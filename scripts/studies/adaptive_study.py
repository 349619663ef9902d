"""Adaptive computation on tiny Shakespeare: Mixture-of-Depths, Mixture-of-Recursions and the DEQ against the dense
transformer at equal training FLOPs, and the early-exit frontier (validation loss against the average layers a token
runs).

    # the IsoFLOP sweeps (experiments/studies/scaling.py; one family per core; N counts what a token runs: MoD's routed
    # blocks at capacity, MoR's shared stack (N_r + 1) / 2 times, the DEQ's cell (f + b + 3) / 3 times):
    B="--budgets=3e11,1e12,3e12"; C=experiments/configs/lm_shakespeare.py
    python -m experiments.studies.scaling --config=$C --sizes=64x2,96x2,128x2,128x4,160x4 $B --workdir=runs/adaptive/transformer
    python -m experiments.studies.scaling --config=$C:mod --sizes=64x2,96x2,128x2,128x4,160x4 $B --workdir=runs/adaptive/mod
    python -m experiments.studies.scaling --config=$C:mor --config.model.recursions=2 --sizes=32x3,64x3,96x3,128x3 $B \
        --workdir=runs/adaptive/mor2                                       # and recursions=3 into runs/adaptive/mor3
    python -m experiments.studies.scaling --config=$C:deq --config.model.max_iter=6 --config.model.backward_max_iter=6 \
        --sizes=32x1,64x1,96x1,128x1 $B --workdir=runs/adaptive/deq
    # then (trains the early-exit model first if --exit_run has no checkpoint; ~3 min):
    PYTHONPATH=. python scripts/studies/adaptive_study.py --runs=runs/adaptive --out=docs/adaptive_study.png

Every loss is the mean next-byte cross-entropy over the same validation windows (the last 10% of the text, context
64). MoD and MoR runs are scored twice: with top-k routing as trained (which reads the whole window, future tokens
included) and with the causal routing that decoding uses (MoD's predictor, MoR's router threshold). Each family's best
run per budget is also timed decoding (greedy, cached, batch 1 and 8): speed beside quality. Prints markdown tables;
draws the IsoFLOP curves, the compute frontiers and the early-exit frontier.
"""

import csv
import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import models  # noqa: E402
from experiments import restore, studies  # noqa: E402
from experiments.evaluation import length_eval  # noqa: E402
from experiments.training import plots  # noqa: E402
from experiments.configs import lm_shakespeare  # noqa: E402

_RUNS = flags.DEFINE_string("runs", "runs/adaptive", "Folder with the transformer/, mod/, mor2/, mor3/ and deq/ sweeps.")
_EXIT_RUN = flags.DEFINE_string("exit_run", "runs/adaptive/early_exit", "The early-exit run (trained if absent).")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.9", "0.7", "0.5", "0.3", "0.1"], "Max-probability exit thresholds.")
_WINDOWS = flags.DEFINE_integer("windows", 1024, "Validation windows of 64 bytes scored per evaluation.")
_OUT = flags.DEFINE_string("out", "docs/adaptive_study.png", "Where the figure goes.")
_ONLY_LOSSES = flags.DEFINE_list("only_losses", [], "Only compute (and keep) these families' validation losses.")


def validation_loss(workdir: str, **model_overrides) -> float:
    """The run's loss over the first --windows validation windows (kept in the run folder's study_val.json, keyed by
    the overrides and the window count, so a rerun reads it back)."""
    path = os.path.join(workdir, "study_val.json")
    key = json.dumps([model_overrides, _WINDOWS.value], sort_keys=True)
    known = {}
    if os.path.isfile(path):
        with open(path) as f:
            known = json.load(f)
    if key not in known:
        report = length_eval.length_report(workdir, [1], max_windows=_WINDOWS.value, model_overrides=model_overrides)
        known[key] = report["factors"]["1"]["loss"]
        with open(path, "w") as f:
            json.dump(known, f)
    return known[key]


FAMILIES = {  # sweep folder -> (label, the causal routing's model overrides or None)
    "transformer": ("transformer", None),
    "mod": ("MoD (12.5%, every other block)", dict(routing="predictor")),
    "mor2": ("MoR (N_r = 2, expert-choice)", dict(routing="threshold")),
    "mor3": ("MoR (N_r = 3, expert-choice)", dict(routing="threshold")),
    "deq": ("DEQ (6 + 6 iterations)", None),
}


def sweep_rows(family: str) -> list[dict]:
    """The sweep's results.csv rows, each with its validation loss (under causal routing too where routing looks
    ahead) and its unique non-embedding parameters."""
    folder = os.path.join(_RUNS.value, family)
    with open(os.path.join(folder, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        run = os.path.join(folder, f"{row['size']}_{float(row['Training FLOP']):.3g}")
        row["val"] = validation_loss(run)
        if FAMILIES[family][1] is not None:
            row["val_causal"] = validation_loss(run, **FAMILIES[family][1])
        model = restore.load_config(run).model
        row["unique"] = models.parameter_count(model, model.max_len, exclude=models.EMBEDDINGS)
    return rows


def frontier(rows, key):
    budgets = sorted({float(r["Training FLOP"]) for r in rows})
    best = [min(r[key] for r in rows if float(r["Training FLOP"]) == c) for c in budgets]
    return budgets, best, np.polyfit(np.log(budgets), np.log(best), 1)[0]


def frontier_lines(families: dict):
    """(label, rows, loss key) for every family and scoring."""
    for name, rows in families.items():
        label, causal = FAMILIES[name]
        yield label, rows, "val"
        if causal is not None:
            yield f"{label}, causal routing", rows, "val_causal"


def isoflop_table(families: dict) -> None:
    budgets = frontier(families["transformer"], "val")[0]
    print("| family | best val loss at " + " / ".join(f"{c:.0e}" for c in budgets) + " | its size | N active / unique "
          "| frontier slope |")
    print("|---|---|---|---|---|")
    for label, rows, key in frontier_lines(families):
        budgets, best, slope = frontier(rows, key)
        winners = [min((r for r in rows if float(r["Training FLOP"]) == c), key=lambda r: r[key]) for c in budgets]
        sizes = " / ".join(r["size"] for r in winners)
        counts = " / ".join(f"{int(float(r['Model Size'])):,} / {r['unique']:,}" for r in winners)
        print(f"| {label} | {' / '.join(f'{b:.3f}' for b in best)} | {sizes} | {counts} | {slope:.3f} |")
    print()
    print("| family | size | N active | N unique | " + " | ".join(f"val at {c:.0e} (causal)" for c in budgets) + " |")
    print("|---|---|---|---|" + "---|" * len(budgets))
    for name, rows in families.items():
        for size in dict.fromkeys(r["size"] for r in rows):
            at = {float(r["Training FLOP"]): r for r in rows if r["size"] == size}
            cells = [f"{at[c]['val']:.3f}" + (f" ({at[c]['val_causal']:.3f})" if "val_causal" in at[c] else "")
                     for c in sorted(at)]
            first = at[min(at)]
            print(f"| {FAMILIES[name][0]} | {size} | {int(float(first['Model Size'])):,} | {first['unique']:,} | "
                  + " | ".join(cells) + " |")


def decode_rate(workdir: str, batch: int, routing: dict | None, prompt: int = 16, new: int = 48) -> float:
    """Tokens/s of greedy cached decoding (`batch` rows, a `prompt`-token prompt, `new` tokens), causal routing."""
    config = restore.load_config(workdir)
    config.model.update(**(routing or {}))
    model, variables = restore.load_variables(config, workdir)
    tokens = jnp.asarray(length_eval.validation_stream(config)[:batch * prompt].reshape(batch, prompt))
    step = jax.jit(lambda t, c, s: model.apply(variables, t, c, s, method=model.decode))

    def generate():
        logits, cache = step(tokens, model.init_cache(batch, prompt + new), jnp.int32(0))
        for position in range(prompt, prompt + new):
            logits, cache = step(jnp.argmax(logits[:, -1:], axis=-1), cache, jnp.int32(position))
        return jax.block_until_ready(logits)

    return batch * new / studies.median_seconds(generate, repeats=3)  # the warm-up call compiles


def decode_table(families: dict) -> None:
    """Each family's best run at each budget: its loss (causal routing) and decode tokens/s at batch 1 and 8."""
    print("| budget | family | best run | val loss (causal) | decode tokens/s, batch 1 | batch 8 |")
    print("|---|---|---|---|---|---|")
    for budget in frontier(families["transformer"], "val")[0]:
        for name, rows in families.items():
            label, routing = FAMILIES[name]
            key = "val" if routing is None else "val_causal"
            best = min((r for r in rows if float(r["Training FLOP"]) == budget), key=lambda r: r[key])
            run = os.path.join(_RUNS.value, name, f"{best['size']}_{budget:.3g}")
            rates = [decode_rate(run, b, routing) for b in (1, 8)]
            print(f"| {budget:.0e} | {label} | {best['size']} | {best[key]:.3f} | {rates[0]:,.0f} | {rates[1]:,.0f} |")


def early_exit_run() -> str:
    """The 6-layer LM with an exit after every block (trained once: the LM row's recipe otherwise)."""
    workdir = _EXIT_RUN.value
    if not (os.path.isdir(workdir) and restore.checkpoint_steps(workdir)):
        config = lm_shakespeare.get_config()
        config.model.update(num_layers=6, exit_every=1)
        studies.run_or_reuse(config, workdir)
    return workdir


def mean_layers_used(workdir: str, threshold: float) -> float:
    config = restore.load_config(workdir)
    config.model.update(exit_threshold=threshold)
    model, variables = restore.load_variables(config, workdir)
    stream = length_eval.validation_stream(config)
    length = config.data.seq_len
    windows = stream[:(len(stream) - 1) // length * length].reshape(-1, length)[:_WINDOWS.value]
    used = jax.jit(lambda t: model.apply(variables, t, method=model.layers_used))
    return float(np.mean([np.asarray(used(jnp.asarray(windows[i:i + 64]))).mean() for i in range(0, len(windows), 64)]))


def exit_frontier() -> list[tuple]:
    workdir = early_exit_run()
    rows = [(0.0, float(restore.load_config(workdir).model.num_layers), validation_loss(workdir))]
    for threshold in map(float, _THRESHOLDS.value):
        rows.append((threshold, mean_layers_used(workdir, threshold), validation_loss(workdir, exit_threshold=threshold)))
    print("| max-probability threshold | mean layers per token | val loss |")
    print("|---|---|---|")
    for threshold, layers, loss in rows:
        print(f"| {'off' if not threshold else threshold} | {layers:.2f} | {loss:.3f} |")
    return rows


def main(argv):
    del argv
    if _ONLY_LOSSES.value:
        for name in _ONLY_LOSSES.value:
            sweep_rows(name)
        return
    families = {name: sweep_rows(name) for name in FAMILIES if os.path.isdir(os.path.join(_RUNS.value, name))}
    isoflop_table(families)
    print()
    decode_table(families)
    print()
    exits = exit_frontier()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, style in (("transformer", "-o"), ("mod", "--s"), ("mor3", ":^")):
        for colour, budget in zip(("tab:blue", "tab:orange", "tab:green"), frontier(families[name], "val")[0]):
            points = sorted((float(r["Model Size"]), r["val"]) for r in families[name] if float(r["Training FLOP"]) == budget)
            left.plot(*zip(*points), style, color=colour, label=f"{name} {budget:.0e}")
    left.set(xscale="log", xlabel="active non-embedding parameters N", ylabel="validation loss",
             title="IsoFLOP: dense (-), MoD (--), MoR N_r=3 (:)")
    left.legend(fontsize=6)
    for label, rows, key in frontier_lines(families):
        budgets, best, _ = frontier(rows, key)
        middle.plot(budgets, best, ":" if key == "val_causal" else "-", marker="o", label=label)
    middle.set(xscale="log", xlabel="training FLOPs C = 6 N D", ylabel="best validation loss", title="compute frontiers")
    middle.legend(fontsize=6)
    right.plot([layers for _, layers, _ in exits], [loss for _, _, loss in exits], "-o")
    for threshold, layers, loss in exits:
        right.annotate("off" if not threshold else f"{threshold:g}", (layers, loss), fontsize=8)
    right.set(xlabel="mean layers per token", ylabel="validation loss", title="early exit (6 layers, max-prob threshold)")
    plots.save_figure(fig, _OUT.value)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
