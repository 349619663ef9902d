"""Transformer vs SSD vs MoE IsoFLOP study on tiny Shakespeare: fits and the figure.

    # the sweeps (experiments/studies/scaling.py; a finished run is not re-run), e.g. one family per core:
    S="--sizes=64x2,96x2,128x3,160x3,192x4 --budgets=3e11,1e12,3e12"
    python -m experiments.studies.scaling --config=experiments/configs/lm_shakespeare.py \
        --sizes=32x2,64x1,64x2,96x2,128x3,160x3,192x4 --budgets=3e11,1e12,3e12 --workdir=runs/scaling/transformer
    python -m experiments.studies.scaling --config=experiments/configs/lm_shakespeare.py:ssd $S --workdir=runs/scaling/ssd
    python -m experiments.studies.scaling --config=experiments/configs/moe_lm.py --config.data.batch_size=12 $S \
        --workdir=runs/scaling/moe
    # then
    PYTHONPATH=. python scripts/studies/scaling_study.py --runs=runs/scaling --out=docs/scaling_study.png

For each family (a folder of RUNS with a results.csv): Chinchilla approach 3 on all its points
(L = E + A / N^alpha + B / D^beta, N active non-embedding parameters, D tokens) with bootstrap 95%
intervals, the compute-optimal allocation it implies (N_opt ~ C^(beta / (alpha + beta))), approach 2
(IsoFLOP parabolas) where the curves have an interior minimum, and the loss-compute frontier (the
best loss at each budget, with its log-log slope). Prints one markdown table; draws IsoFLOP curves
and the frontier side by side.
"""

import csv
import os

from absl import app, flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.studies import scaling_fits  # noqa: E402
from experiments.training import plots  # noqa: E402

_RUNS = flags.DEFINE_string("runs", "runs/scaling", "Folder with one sweep folder (and results.csv) per family.")
_FAMILIES = flags.DEFINE_list("families", ["transformer", "ssd", "moe"], "Sweep folders under --runs.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples for the approach-3 intervals.")
_OUT = flags.DEFINE_string("out", "docs/scaling_study.png", "Where the figure goes.")

COLOURS = {"transformer": "tab:blue", "ssd": "tab:orange", "moe": "tab:green"}


def read(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("Model Size", "Training FLOP", "tokens", "loss")}


def frontier(points):
    budgets = np.unique(points["Training FLOP"])
    best = np.array([points["loss"][points["Training FLOP"] == c].min() for c in budgets])
    slope = np.polyfit(np.log(budgets), np.log(best), 1)[0]
    return budgets, best, slope


def analyse(name, points):
    fit = scaling_fits.fit_approach3(points["Model Size"], points["tokens"], points["loss"], bootstrap=_BOOTSTRAP.value)
    fit["n_opt_exponent_3"] = fit["beta"] / (fit["alpha"] + fit["beta"])
    lo, hi = fit["intervals"]["alpha"], fit["intervals"]["beta"]
    try:
        fit["approach2"] = scaling_fits.fit_approach2(points["Model Size"], points["Training FLOP"], points["loss"],
                                                      window=5)["n_opt_exponent"]
    except ValueError as error:
        fit["approach2"] = None
        print(f"{name}: approach 2 not possible ({error})")
    budgets, best, slope = frontier(points)
    fit["frontier"] = (budgets, best, slope)
    print(f"{name}: {len(points['loss'])} runs; alpha {fit['alpha']:.3f} [{lo[0]:.3f}, {lo[1]:.3f}], "
          f"beta {fit['beta']:.3f} [{hi[0]:.3f}, {hi[1]:.3f}], E {fit['E']:.3f}")
    return fit


def draw(results, points_by_family, out):
    fig, (isoflop, front) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", ":", "-."]
    for name, points in points_by_family.items():
        colour = COLOURS.get(name)
        for style, budget in zip(styles * 3, np.unique(points["Training FLOP"])):
            on = np.flatnonzero(points["Training FLOP"] == budget)
            on = on[np.argsort(points["Model Size"][on])]
            isoflop.plot(points["Model Size"][on], points["loss"][on], style, marker="o", color=colour,
                         label=f"{name}, C = {budget:.0e}")
        budgets, best, slope = results[name]["frontier"]
        front.scatter(points["Training FLOP"], points["loss"], color=colour, alpha=0.3, s=15)
        front.plot(budgets, best, "-o", color=colour, label=f"{name}: best loss ~ C^{slope:.3f}")
    isoflop.set(xscale="log", xlabel="non-embedding parameters N (MoE: active)", ylabel="validation loss (nats per byte)",
                title="IsoFLOP curves")
    front.set(xscale="log", yscale="log", xlabel="training FLOPs C = 6 N D", ylabel="validation loss",
              title="loss-compute frontier (all runs faint)")
    isoflop.legend(fontsize=7, ncol=2)
    front.legend(fontsize=8)
    plots.save_figure(fig, out, dpi=110)


def main(argv):
    del argv
    points_by_family = {name: read(os.path.join(_RUNS.value, name, "results.csv")) for name in _FAMILIES.value}
    results = {name: analyse(name, points) for name, points in points_by_family.items()}
    print("\n| family | runs | E | alpha [95%] | beta [95%] | N_opt ~ C^a, approach 3 | approach 2 | frontier slope |"
          "\n|---|---|---|---|---|---|---|---|")
    for name, fit in results.items():
        a, b = fit["intervals"]["alpha"], fit["intervals"]["beta"]
        approach2 = f"{fit['approach2']:.2f}" if fit["approach2"] is not None else "no interior minima"
        print(f"| {name} | {len(points_by_family[name]['loss'])} | {fit['E']:.3f} | {fit['alpha']:.3f} "
              f"[{a[0]:.3f}, {a[1]:.3f}] | {fit['beta']:.3f} [{b[0]:.3f}, {b[1]:.3f}] | {fit['n_opt_exponent_3']:.2f} "
              f"| {approach2} | {fit['frontier'][2]:.3f} |")
    draw(results, points_by_family, _OUT.value)
    print(f"\nfigure: {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
