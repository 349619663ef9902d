"""Toy models of superposition (Elhage et al. 2022) reproduced: the ReLU output model against the linear one, the
phase diagrams of n = 2, m = 1 and n = 3, m = 2,
the feature dimensionality of n = 400 features in m = 30 dimensions against sparsity, and how many of the true
features a sparse autoencoder recovers from the hidden layer. Every sweep is one vmapped program
(experiments/studies/superposition_sweep.py); the geometry comes from experiments/analysis/feature_geometry.py.

    PYTHONPATH=. python scripts/studies/superposition_study.py --workdir=runs/superposition [--parts=phase,...]

writes results.json and intro.png, phase_n2_m1.png, phase_n3_m2.png, dimensionality.png, sae_recovery.png to the workdir
(docs/studies/superposition.md shows them).
"""

import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.analysis import feature_geometry as geometry  # noqa: E402
from experiments.studies import superposition_sweep as sweep  # noqa: E402
from models import sae, toy_superposition  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/superposition", "Output folder.")
_PARTS = flags.DEFINE_list("parts", ["intro", "phase", "dimensionality", "sae"], "Which sweeps to run.")
_STEPS = flags.DEFINE_integer("steps", 5000, "Training steps of every toy model and SAE.")
_BATCH = flags.DEFINE_integer("batch", 1024, "Rows per step.")
_GRID = flags.DEFINE_integer("grid", 10, "Points per axis of the phase diagrams.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per phase-diagram point; the lowest-loss one is kept.")
_FEATURES = flags.DEFINE_integer("features", 400, "n of the dimensionality sweep.")
_HIDDEN = flags.DEFINE_integer("hidden", 30, "m of the dimensionality sweep.")
_DENSITIES = flags.DEFINE_integer("densities", 16, "Densities of the dimensionality sweep, log-spaced from 1.")
_SPARSEST = flags.DEFINE_float("sparsest", 30.0, "1 / (1 - S) of the dimensionality sweep's sparsest point.")

PARTS = ("intro", "phase", "dimensionality", "sae")
PHASE_COLOURS = {"not represented": "#d9d9d9", "dedicated dimension": "#4c72b0", "superposition": "#c44e52"}


def intro() -> dict:
    """The paper's first experiment: n = 20 features of importance 0.9^i in m = 5 dimensions, the ReLU output model
    against the linear one, at densities 1 to 0.001: how many features each represents and how much they interfere."""
    n, m = 20, 5
    densities = np.array([1.0, 0.3, 0.1, 0.03, 0.01, 0.001])
    importance = np.tile(toy_superposition.importance_decay(n, 0.9), (len(densities), 1))
    out = {"n": n, "m": m, "densities": densities.tolist()}
    for output in toy_superposition.OUTPUTS:
        cfg = toy_superposition.ToyConfig(num_features=n, num_hidden=m, output=output)
        w, _, _ = sweep.train(cfg, densities, importance, np.arange(len(densities)), steps=_STEPS.value,
                              batch=_BATCH.value)
        out[output] = [{"represented": int(np.sum(geometry.norms(x) > 0.5)),
                        "superposed": int(np.sum((geometry.norms(x) > 0.5) & (geometry.interference(x) > 0.1))),
                        "norms": geometry.norms(x).tolist(), "w": x.tolist()} for x in w]
    return out


def plot_intro(result: dict, path: str) -> None:
    fig, axes = plt.subplots(2, len(result["densities"]), figsize=(2 * len(result["densities"]), 4))
    for row, output in enumerate(toy_superposition.OUTPUTS):
        for col, density in enumerate(result["densities"]):
            w = np.asarray(result[output][col]["w"])
            ax = axes[row, col]
            ax.imshow(w.T @ w, cmap="RdBu", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{output}, 1-S = {density:g}\n{result[output][col]['represented']} represented, "
                         f"{result[output][col]['superposed']} superposed", fontsize=7)
    fig.suptitle(f"W^T W of n = {result['n']} features (importance 0.9^i) in m = {result['m']} dimensions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def phase_diagram(n: int, m: int) -> dict:
    """Features 1..n-1 of importance 1, the extra feature n of relative importance r; density and r on log grids."""
    densities, ratios = np.geomspace(1.0, 0.01, _GRID.value), np.geomspace(0.1, 10.0, _GRID.value)
    points = [(d, r) for r in ratios for d in densities]
    seeds = _SEEDS.value
    density = np.repeat([d for d, _ in points], seeds)
    importance = np.repeat([[1.0] * (n - 1) + [r] for _, r in points], seeds, axis=0)
    cfg = toy_superposition.ToyConfig(num_features=n, num_hidden=m)
    w, b, _ = sweep.train(cfg, density, importance, np.arange(len(density)), steps=_STEPS.value, batch=_BATCH.value)
    keep = sweep.best_of_seeds(sweep.evaluate(cfg, w, b, density, importance), seeds)
    phases = [geometry.extra_feature_phase(w[k]) for k in keep]
    return {"n": n, "m": m, "densities": densities.tolist(), "ratios": ratios.tolist(), "phases": phases,
            "w": [w[k].tolist() for k in keep], "extra_norm": [float(geometry.norms(w[k])[-1]) for k in keep],
            "extra_interference": [float(geometry.interference(w[k])[-1]) for k in keep]}


def plot_phase_diagram(result: dict, path: str) -> None:
    grid = len(result["ratios"])
    codes = np.array([geometry.PHASES.index(p) for p in result["phases"]]).reshape(grid, grid)
    colours = matplotlib.colors.ListedColormap([PHASE_COLOURS[p] for p in geometry.PHASES])
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.pcolormesh(result["densities"], result["ratios"], codes, cmap=colours, vmin=-0.5, vmax=2.5, shading="nearest")
    ax.set(xscale="log", yscale="log", xlabel="feature density 1 - S", ylabel="relative importance of the extra feature",
           title=f"n = {result['n']}, m = {result['m']}: what the extra feature becomes")
    ax.invert_xaxis()
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()], fontsize=7,
              loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dimensionality() -> dict:
    n, m = _FEATURES.value, _HIDDEN.value
    densities = np.geomspace(1.0, 1.0 / _SPARSEST.value, _DENSITIES.value)
    cfg = toy_superposition.ToyConfig(num_features=n, num_hidden=m)
    w, _, _ = sweep.train(cfg, densities, np.ones((len(densities), n)), np.arange(len(densities)),
                          steps=_STEPS.value, batch=_BATCH.value)
    rows = []
    for k, d in enumerate(densities):
        norms, dims = geometry.norms(w[k]), geometry.dimensionality(w[k])
        represented = norms > 0.5
        partners = geometry.partners(w[k])
        named = [geometry.plateau(x) for x in dims[represented]]
        rows.append({"density": float(d), "represented": int(represented.sum()),
                     "dimensions_per_feature": geometry.dimensions_per_feature(w[k]),
                     "dimensionality": dims[represented].tolist(), "partners": partners[represented].tolist(),
                     "plateaus": {name: named.count(name) for name in geometry.PLATEAUS.values()},
                     "off_plateau": named.count(None)})
    return {"n": n, "m": m, "rows": rows}


def plot_dimensionality(result: dict, path: str) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    inverse = [1 / r["density"] for r in result["rows"]]
    top.plot(inverse, [r["dimensions_per_feature"] for r in result["rows"]], "o-k")
    top.set(xscale="log", ylabel="m / ||W||_F^2", title=f"n = {result['n']} features in m = {result['m']} dimensions")
    for r, x in zip(result["rows"], inverse):
        bottom.scatter(np.full(len(r["dimensionality"]), x) * np.exp(np.random.default_rng(0).normal(
            0, 0.04, len(r["dimensionality"]))), r["dimensionality"], s=4, alpha=0.4, color="C0")
    for value, name in geometry.PLATEAUS.items():
        for ax in (top, bottom):
            ax.axhline(value, color="grey", lw=0.5, ls=":")
        bottom.text(inverse[-1] * 1.3, value, name, fontsize=6, va="center")
    bottom.set(xscale="log", xlabel="1 / (1 - S)", ylabel="feature dimensionality D_i", ylim=(0, 1.1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sae_recovery() -> dict:
    """An n = 40, m = 10 toy model per density (uniform importance), then a TopK SAE of 80 latents on its hidden
    layer with k = the expected active features per row (at least 1); a true feature is recovered when some
    decoder direction has cosine > 0.9 with its W_i."""
    n, m = 40, 10
    densities = np.array([0.3, 0.1, 0.03, 0.01, 0.003])
    cfg = toy_superposition.ToyConfig(num_features=n, num_hidden=m)
    w, _, _ = sweep.train(cfg, densities, np.ones((len(densities), n)), np.arange(len(densities)),
                          steps=_STEPS.value, batch=_BATCH.value)
    rows = []
    for k, d in enumerate(densities):
        active = max(1, int(round(n * d)))
        sae_cfg = sae.SAEConfig(d_in=m, num_latents=2 * n, kind="topk", k=min(active, 2 * n), aux_k=16)
        decoder = sweep.train_saes(sae_cfg, w[k:k + 1], densities[k:k + 1], [k], steps=_STEPS.value,
                                   batch=_BATCH.value)[0]
        best = geometry.best_cosines(decoder, w[k])
        represented = geometry.norms(w[k]) > 0.5
        rows.append({"density": float(d), "k": active, "represented": int(represented.sum()),
                     "dimensions_per_feature": geometry.dimensions_per_feature(w[k]),
                     "recovered": int(np.sum(best > 0.9)), "recovered_represented": int(np.sum((best > 0.9) & represented)),
                     "best_cosines": best.tolist()})
    return {"n": n, "m": m, "latents": 2 * n, "rows": rows}


def plot_sae(result: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["density"] for r in result["rows"]]
    ax.plot(x, [r["represented"] for r in result["rows"]], "s--", color="grey", label="features the toy model represents")
    ax.plot(x, [r["recovered"] for r in result["rows"]], "o-", color="C3", label="features the SAE recovers (cos > 0.9)")
    ax.set(xscale="log", xlabel="feature density 1 - S", ylabel=f"of n = {result['n']} features",
           title=f"TopK SAE ({result['latents']} latents) on m = {result['m']} hidden dims")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    unknown = [p for p in _PARTS.value if p not in PARTS]
    if unknown:
        raise app.UsageError(f"--parts names {unknown}; valid: {', '.join(PARTS)}")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    path = os.path.join(_WORKDIR.value, "results.json")
    results = {}
    if os.path.exists(path):  # the parts not rerun keep their results
        with open(path) as f:
            results = json.load(f)
    for part in _PARTS.value:
        start = time.time()
        if part == "intro":
            results["intro"] = intro()
            plot_intro(results["intro"], os.path.join(_WORKDIR.value, "intro.png"))
        elif part == "phase":
            for n, m in ((2, 1), (3, 2)):
                results[f"phase_n{n}_m{m}"] = phase_diagram(n, m)
                plot_phase_diagram(results[f"phase_n{n}_m{m}"], os.path.join(_WORKDIR.value, f"phase_n{n}_m{m}.png"))
        elif part == "dimensionality":
            results["dimensionality"] = dimensionality()
            plot_dimensionality(results["dimensionality"], os.path.join(_WORKDIR.value, "dimensionality.png"))
        else:
            results["sae"] = sae_recovery()
            plot_sae(results["sae"], os.path.join(_WORKDIR.value, "sae_recovery.png"))
        results.setdefault("seconds", {})[part] = time.time() - start
        results.setdefault("settings", {})[part] = {"steps": _STEPS.value, "batch": _BATCH.value, "grid": _GRID.value,
                                                    "seeds": _SEEDS.value, "features": _FEATURES.value,
                                                    "hidden": _HIDDEN.value, "sparsest": _SPARSEST.value}
        with open(path, "w") as f:
            json.dump(results, f)
        print(f"{part}: {time.time() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
