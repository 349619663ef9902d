"""IsoFLOP sweeps with the shared trainer, and scaling-law fits of their results.

    python -m experiments.studies.scaling --config=experiments/configs/lm_shakespeare.py[:ssd] \
        --sizes=64x2,96x3,128x4 --budgets=1e13,3e13,1e14 --workdir=runs/scaling
    python -m experiments.studies.scaling --fit=runs/scaling/results.csv        # or the Chinchilla CSV

Sweep: for every model size (`WIDTHxLAYERS`: d_model, num_layers, heads = d_model / 32 (no
grouping), MLP 4 x d_model; MoE experts d_model wide) and compute budget C, N is the model's
parameter count without embeddings (for MoE, active: routed experts count top_k / num_experts), the run
sees D = C / (6N) tokens, i.e. steps = D / (batch x seq_len), with the learning-rate schedule as
long as the run. Each run trains in WORKDIR/<size>_<budget> with the shared trainer; a finished run
is not re-run (its final validation loss is read back). Results go to WORKDIR/results.csv with the
Chinchilla CSV's columns (`Model Size`, `Training FLOP`, `loss`) plus `tokens`, `steps` and `size`; the CSV
accumulates, so a later sweep into the same WORKDIR (a larger budget at a few sizes) adds its points to it
(a point run again replaces its row).

Fit (`--fit=CSV`): approach 3 (experiments/studies/scaling_fits.py) on the CSV's `Model Size`, tokens
(`tokens`, or `Training FLOP` / (6 N)) and `loss`, excluding the `--exclude_highest` highest losses;
prints the fitted {"E", "A", "B", "alpha", "beta", ...} as one JSON object on its last line.
"""

import csv
import json
import os
import sys

from absl import app, flags
import ml_collections
import numpy as np
from ml_collections import config_flags

import models
from experiments.studies import scaling_fits
from experiments.training import cli, metrics_writer, trainer

_CONFIG_ARGV: list[str] = []  # what the config flag parses (experiments/training/cli.parse_flags fills it)
_CONFIG = config_flags.DEFINE_config_file("config", None, "The experiment config whose model is scaled.",
                                          sys_argv=_CONFIG_ARGV)
_SIZES = flags.DEFINE_list("sizes", ["64x2", "96x3", "128x4"], "Model sizes, WIDTHxLAYERS.")
_BUDGETS = flags.DEFINE_list("budgets", ["1e13", "3e13"], "Compute budgets C in FLOPs (6 N D).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/scaling", "Where the runs and results.csv go.")
_FIT = flags.DEFINE_string("fit", None, "Fit approach 3 to this CSV instead of sweeping.")
_EXCLUDE = flags.DEFINE_integer("exclude_highest", 5, "With --fit: drop this many highest-loss points "
                                "(5, as Besiroglu et al. do for the Chinchilla data).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 0, "With --fit: bootstrap resamples for 95% intervals.")

COLUMNS = ("size", "Model Size", "Training FLOP", "tokens", "steps", "loss")


def parse_size(size: str) -> dict:
    """"128x4" -> model overrides: d_model 128, 4 layers, 4 heads of 32, MLP 512."""
    try:
        width, depth = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {size!r} is not WIDTHxLAYERS, e.g. 128x4") from None
    if width % 32:
        raise ValueError(f"size {size!r}: the width must be a multiple of 32 (heads of 32)")
    return dict(d_model=width, num_layers=depth, num_heads=width // 32, d_mlp=4 * width)


def non_embedding_params(model_config) -> int:
    """Parameters outside the token / position embeddings and the unembedding that each token uses:
    a mixture of experts' routed experts count top_k / num_experts of theirs (C = 6 N D, N active)."""
    return models.parameter_count(model_config, model_config.max_len, exclude=models.EMBEDDINGS, active=True)


def run_config(base: ml_collections.ConfigDict, size: str, budget: float):
    """(config of one sweep point, N, tokens) with the schedule matched to the token count."""
    config = base.copy_and_resolve_references()
    config.model.update(**parse_size(size))
    if "num_kv_heads" in config.model:
        config.model.num_kv_heads = 0  # plain multi-head attention at every size
    if "d_expert" in config.model:
        config.model.d_expert = config.model.d_model  # experts as wide as the model (moe_lm's ratio)
    splits_like = dict(vocab_size=config.model.vocab_size or 256, max_len=config.model.max_len or config.data.seq_len)
    probe = config.model.copy_and_resolve_references()
    probe.update(**splits_like)
    n = non_embedding_params(probe)
    tokens = budget / (6 * n)
    steps = max(1, int(round(tokens / (config.data.batch_size * config.data.seq_len))))
    config.train.update(steps=steps, eval_every=0, checkpoint_every=steps, log_every=max(1, min(100, steps // 10)))
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    return config, n, tokens


def final_eval_loss(workdir: str) -> float | None:
    events = metrics_writer.read(workdir, "eval") if os.path.isdir(workdir) else []
    return events[-1]["loss"] if events else None


def sweep(base, sizes, budgets, workdir: str) -> list[dict]:
    rows = []
    for size in sizes:
        for budget in budgets:
            config, n, tokens = run_config(base, size, budget)
            run_dir = os.path.join(workdir, f"{size}_{budget:.3g}")
            done = final_eval_loss(run_dir) is not None and any(
                e["step"] == config.train.steps for e in metrics_writer.read(run_dir, "eval"))
            if not done:
                trainer.train_and_evaluate(config, run_dir, verbose=False)
            rows.append({"size": size, "Model Size": n, "Training FLOP": budget, "tokens": tokens,
                         "steps": config.train.steps, "loss": final_eval_loss(run_dir)})
            print(json.dumps(rows[-1]), flush=True)
    write_results(os.path.join(workdir, "results.csv"), rows)
    return rows


def write_results(path: str, rows: list[dict]) -> None:
    """Adds ROWS to the CSV at PATH, replacing the rows of the same (size, budget); sorted by width, depth, budget."""
    def key(row):
        size = parse_size(row["size"])
        return size["d_model"], size["num_layers"], float(row["Training FLOP"])

    merged = {}
    if os.path.isfile(path):
        with open(path) as f:
            merged = {key(row): row for row in csv.DictReader(f)}
    merged.update({key(row): row for row in rows})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(merged[k] for k in sorted(merged))


def read_points(path: str, exclude_highest: int):
    """(model sizes, tokens, losses) from a CSV with `Model Size`, `tokens` or `Training FLOP`, `loss`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--fit={path!r} does not exist")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    missing = {"Model Size", "loss"} - set(rows[0] if rows else ())
    if missing or not rows or not ({"tokens", "Training FLOP"} & set(rows[0])):
        raise ValueError(f"--fit={path!r} needs columns 'Model Size', 'loss' and 'tokens' or 'Training FLOP'")
    n = np.array([float(r["Model Size"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    tokens = np.array([float(r["tokens"]) if r.get("tokens") else float(r["Training FLOP"]) / (6 * float(r["Model Size"]))
                       for r in rows])
    keep = np.argsort(loss)[:len(loss) - exclude_highest]
    return n[keep], tokens[keep], loss[keep]


def main(argv):
    del argv
    if _FIT.value:
        try:
            n, tokens, loss = read_points(_FIT.value, _EXCLUDE.value)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        result = scaling_fits.fit_approach3(n, tokens, loss, bootstrap=_BOOTSTRAP.value)
        print(json.dumps({**result, "points": int(len(loss))}))
        return
    if _CONFIG.value is None:
        print("error: pass --config=experiments/configs/NAME.py to sweep, or --fit=CSV to fit", file=sys.stderr)
        sys.exit(2)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    sweep(_CONFIG.value, _SIZES.value, [float(b) for b in _BUDGETS.value], _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG, _CONFIG_ARGV))
