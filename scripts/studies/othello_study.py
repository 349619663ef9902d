"""Othello-GPT's world model (Li et al. 2023; Nanda et al. 2023), measured on a run of experiments/configs/othello.py:

    legal      legal-move accuracy on the run's evaluation games (top-1 legal, probability on legal moves), at the
               newest checkpoint and at every checkpoint kept
    probes     per layer (0: embeddings), a probe per square: linear in the absolute and relative bases, MLP in both
    edits      flip one square's disc in the relative probe's reading, at one layer or at it and every later one;
               does the model now predict the edited board's legal moves? Against a random direction as far
    geometry   one square's representation: its probe plane and the residual's top principal components
    sae        a TopK SAE on the middle layer's residual: latents that fire on one square state (F1 >= 0.9)

    python -m experiments.train --config=experiments/configs/othello.py --workdir=runs/othello
    PYTHONPATH=. python scripts/studies/othello_study.py --workdir=runs/othello [--parts=legal,probes,...]

writes WORKDIR/othello_study.json and probes.png, geometry.png (docs/studies/othello.md shows them); every measure
goes through experiments/analysis (activations, probes, patching, othello_world) and models/sae.py.
"""

import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import data as datasets  # noqa: E402
from data import othello  # noqa: E402
from experiments import restore  # noqa: E402
from experiments.analysis import activations, probes  # noqa: E402
from experiments.analysis import othello_world as world  # noqa: E402
from experiments.optim import optimizers  # noqa: E402
from experiments.studies import superposition_sweep as sweep  # noqa: E402
from models import sae  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/othello", "The Othello run's folder.")
_PARTS = flags.DEFINE_list("parts", ["legal", "probes", "edits", "geometry", "sae"], "What to measure.")
_GAMES = flags.DEFINE_integer("games", 1000, "Evaluation games the probes see (3/4 train them, 1/4 test).")
_PROBE_STEPS = flags.DEFINE_integer("probe_steps", 300, "Full-batch Adam steps of every probe.")
_MLP_HIDDEN = flags.DEFINE_integer("mlp_hidden", 32, "Hidden width of each square's MLP probe.")
_LAYER = flags.DEFINE_integer("layer", -1, "Layer of the geometry and SAE parts (-1: the middle one).")
_CASES = flags.DEFINE_integer("cases", 500, "Intervention cases.")
_EDIT_SCALES = flags.DEFINE_list("edit_scales", ["1"], "Target margins of the edits, as multiples of the typical one.")
_SQUARE = flags.DEFINE_integer("square", 8, "The geometry part's square (8: c2 on 6 x 6, empty at the start).")

PARTS = ("legal", "probes", "edits", "geometry", "sae")
BASES = ("absolute", "relative")


def residuals(model, variables, tokens, batch: int = 250) -> np.ndarray:
    """[L + 1, G, T, D]: the embeddings and the residual stream after every layer."""
    capture = jax.jit(lambda v, t: activations.capture(model, v, t))  # compiled once, not per batch
    out = []
    for start in range(0, len(tokens), batch):
        _, embed, layers = capture(variables, tokens[start:start + batch])
        out.append(np.stack([np.asarray(embed)] + [np.asarray(layer["residual"]) for layer in layers]))
    return np.concatenate(out, axis=1)


def legal_moves(model, variables, games: dict) -> dict:
    apply = jax.jit(model.apply)
    logits = np.concatenate([np.asarray(apply(variables, games["tokens"][s:s + 500]))
                             for s in range(0, len(games["tokens"]), 500)])
    return world.legal_move_metrics(logits, games["legal"], games["live"])


def probe_layers(acts, games, probe_args) -> dict:
    """{basis: {"linear": [test accuracy per layer], "mlp": [...], "majority": ...}} and the linear relative probes
    per layer (for the edits)."""
    live = games["live"].reshape(-1)
    labels = {"absolute": world.absolute_labels(games["boards"]).reshape(-1, games["squares"])[live],
              "relative": world.relative_labels(games["boards"], games["players"]).reshape(-1, games["squares"])[live]}
    out, relative_probes = {}, []
    for basis, y in labels.items():
        majority = float(np.mean([np.bincount(col, minlength=3).max() / len(col) for col in y.T]))
        out[basis] = {"linear": [], "mlp": [], "majority": majority}
        for layer, x in enumerate(acts):
            x = x.reshape(-1, x.shape[-1])[live]
            linear = probes.fit_many(x, y, 3, **probe_args)
            mlp = probes.fit_many(x, y, 3, hidden=_MLP_HIDDEN.value, **{**probe_args, "lr": 0.01})
            out[basis]["linear"].append(float(linear["test_accuracy"].mean()))
            out[basis]["mlp"].append(float(mlp["test_accuracy"].mean()))
            if basis == "relative":
                relative_probes.append(linear)
            print(f"  {basis} layer {layer}: linear {out[basis]['linear'][-1]:.4f}  mlp {out[basis]['mlp'][-1]:.4f}",
                  flush=True)
    return out, relative_probes, labels


def edits(model, variables, games, acts, relative_probes, labels, scale: float = 1.0) -> dict:
    """Intervention success when the edit is made at one layer, and at that layer and every later one (Li et al.),
    for each layer 1..L, against a random direction moved as far; and with no edit (the baseline). The target
    margin is `scale` times the probe's typical one."""
    rng = np.random.default_rng(0)
    cases = world.flip_cases(games["boards"], games["players"], games["legal"], rng, _CASES.value,
                             range(6, othello.game_length(games["size"]) - 6))
    live = games["live"].reshape(-1)
    layers = range(1, len(acts))
    margins = {layer: world.typical_margins(acts[layer].reshape(-1, acts.shape[-1])[live], labels["relative"],
                                            relative_probes[layer]) for layer in layers}
    squares, to = np.array([c["square"] for c in cases]), np.array([c["to"] for c in cases])
    g, t = np.array([c["game"] for c in cases]), np.array([c["t"] for c in cases])
    directions = rng.normal(size=(len(acts), len(cases), acts.shape[-1]))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)

    def probe_edit(run_layer, x):
        layer = run_layer + 1  # run-order layer l is probe layer l + 1 (0: the embeddings)
        return world.margin_edit(x, relative_probes[layer], squares, to, scale * margins[layer][squares, to])

    def random_edit(run_layer, x):  # as far as the probe's edit would move this x, in a random direction
        distance = np.linalg.norm(probe_edit(run_layer, x) - x, axis=-1, keepdims=True)
        return x + directions[run_layer] * distance

    tokens, edited_legal, original_legal = games["tokens"][g], np.stack([c["edited_legal"] for c in cases]), \
        games["legal"][g, t]

    def score(p):
        to_edited, to_original = world.top_n_errors(p, edited_legal), world.top_n_errors(p, original_legal)
        return {"success": float(np.mean(to_edited == 0)), "errors": float(to_edited.mean()),
                "original_success": float(np.mean(to_original == 0))}

    plain = world.edited_probabilities(model, variables, tokens, [0], t, lambda _, x: x)
    result = {"cases": len(cases), "mean_legal_moves_edited": float(edited_legal.sum(-1).mean()), "none": score(plain),
              "layers": {}}
    for layer in layers:
        run_layer, last = layer - 1, len(acts) - 1
        one = {name: score(world.edited_probabilities(model, variables, tokens, [run_layer], t, fn))
               for name, fn in (("probe", probe_edit), ("random", random_edit))}
        onward = {name: score(world.edited_probabilities(model, variables, tokens, list(range(run_layer, last)), t,
                                                         fn)) for name, fn in (("probe", probe_edit),
                                                                               ("random", random_edit))}
        x = acts[layer][g, t]
        result["layers"][layer] = {"one_layer": one, "from_here_on": onward,
                                   "edit_norm": float(np.linalg.norm(probe_edit(run_layer, x) - x, axis=-1).mean()),
                                   "residual_norm": float(np.linalg.norm(x, axis=-1).mean())}
        print(f"  edit at layer {layer}: {json.dumps(result['layers'][layer])}", flush=True)
    return result


def geometry(acts, labels, relative_probe, games, layer: int, square: int, path: str) -> dict:
    """One square's states in the plane of its probe's mine/theirs directions, and in the top-2 principal components."""
    live = games["live"].reshape(-1)
    x = acts[layer].reshape(-1, acts.shape[-1])[live]
    y = labels["relative"][:, square]
    w = relative_probe["weights"][square] / relative_probe["scale"][:, None]  # raw-space class directions [D, 3]
    plane, _ = np.linalg.qr(np.stack([w[:, 1] - w[:, 0], w[:, 2] - w[:, 0]], axis=1))
    centred = x - x.mean(0)
    pcs = np.linalg.svd(centred[:5000], full_matrices=False)[2][:2].T
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    sample = np.random.default_rng(0).permutation(len(x))[:3000]
    for ax, basis, title in ((axes[0], plane, "the probe's plane"), (axes[1], pcs, "top-2 principal components")):
        projected = centred[sample] @ basis
        for c, name, colour in ((0, "empty", "#bbbbbb"), (1, "mine", "#2a6fdb"), (2, "theirs", "#d1495b")):
            rows = y[sample] == c
            ax.scatter(projected[rows, 0], projected[rows, 1], s=4, alpha=0.5, c=colour, label=name)
        ax.set_title(f"square {square_name(square, games['size'])}, layer {layer}: {title}")
    axes[0].legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    separation = lambda basis: float(probes.fit(centred @ basis, y, 3, steps=200)["test_accuracy"])  # noqa: E731
    return {"layer": layer, "square": square_name(square, games["size"]), "probe_plane_accuracy": separation(plane),
            "top2_pc_accuracy": separation(pcs)}


def square_name(square: int, size: int) -> str:
    row, col = divmod(square, size)
    return f"{'abcdefgh'[col]}{row + 1}"


def sae_latents(acts, labels, games, layer: int, latents: int = 512, k: int = 16, steps: int = 3000) -> dict:
    """A TopK SAE on the layer's residual: for each latent the square state (relative basis) or legal move its firing
    predicts best (F1 of "fires" against "has the feature"), and how many latents reach F1 >= 0.9 / 0.7."""
    live = games["live"].reshape(-1)
    x = acts[layer].reshape(-1, acts.shape[-1])[live].astype(np.float32)
    scale = float(np.sqrt(x.shape[1] / np.mean(np.sum(x * x, -1))))
    cfg = sae.SAEConfig(d_in=x.shape[1], num_latents=latents, kind="topk", k=k, b_dec_init="zeros")
    model = sae.SparseAutoencoder(cfg)
    rows = jnp.asarray(x * scale)
    opt = sweep.optimizer_config(1e-3, weight_decay=0.0)
    states = sweep.init_states(model, rows[:1], [0], opt, steps)
    make_rows = lambda key: rows[jax.random.randint(key, (1, 1024), 0, len(rows))]  # noqa: E731
    run = jax.jit(lambda s, key: sweep.train_members(s, make_rows, key, steps=steps,
                                                     schedule=optimizers.learning_rate_schedule(opt, steps)))
    states, losses = run(states, jax.random.PRNGKey(1))
    params = jax.tree.map(lambda a: a[0], states.params)
    fires = np.concatenate([np.asarray(model.apply({"params": params}, rows[s:s + 8192], method=model.encode)) > 0
                            for s in range(0, len(rows), 8192)])
    features = np.concatenate([labels["relative"] == c for c in (1, 2)]
                              + [games["legal"].reshape(-1, games["squares"])[live]], axis=1)
    names = [f"{square_name(s, games['size'])} {kind}" for kind in ("mine", "theirs", "legal")
             for s in range(games["squares"])]
    hits = fires.astype(np.float32).T @ features.astype(np.float32)  # [M, F]
    f1 = 2 * hits / (fires.sum(0)[:, None] + features.sum(0)[None, :] + 1e-9)
    best = np.argmax(f1, axis=1)
    best_f1 = f1[np.arange(len(best)), best]
    alive = fires.any(0)
    order = np.argsort(-best_f1)[:12]
    return {"layer": layer, "latents": latents, "k": k, "alive": int(alive.sum()),
            "final_loss": float(np.asarray(losses)[-100:].mean()),
            "f1_at_least_0.9": int(np.sum(best_f1 >= 0.9)), "f1_at_least_0.7": int(np.sum(best_f1 >= 0.7)),
            "features_matched_0.9": len({int(b) for b, f in zip(best, best_f1) if f >= 0.9}),
            "by_kind_0.7": {kind: int(np.sum((best_f1 >= 0.7) & (best // games["squares"] == i)))
                            for i, kind in enumerate(("mine", "theirs", "legal"))},
            "best": [{"latent": int(m), "feature": names[best[m]], "f1": float(best_f1[m])} for m in order]}


def evaluation_games(split: dict, size: int, count: int) -> dict:
    """The first `count` games of the run's evaluation split, replayed: tokens, boards, players, legal moves."""
    tokens = split["inputs"][:count]
    boards, players, legal = othello.board_states(tokens - 1, size)
    return {"tokens": jnp.asarray(tokens), "boards": boards, "players": players, "legal": legal,
            "live": players != 0, "size": size, "squares": size * size}


def plot_probes(result: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for basis, colour in zip(BASES, ("#d1495b", "#2a6fdb")):
        for kind, style in (("linear", "-"), ("mlp", "--")):
            values = result[basis][kind]
            ax.plot(range(len(values)), values, style, c=colour, marker="o", label=f"{basis}, {kind}")
        ax.axhline(result[basis]["majority"], c=colour, lw=0.8, ls=":")
    ax.set_xlabel("layer (0: embeddings)")
    ax.set_ylabel("probe test accuracy (mean over squares)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    if unknown := [p for p in _PARTS.value if p not in PARTS]:
        raise app.UsageError(f"--parts names {unknown}; valid: {', '.join(PARTS)}")
    config = restore.load_config(_WORKDIR.value)
    if config.data.name != "othello":
        raise app.UsageError(f"--workdir={_WORKDIR.value!r} trained on data.name={config.data.name!r}, not othello")
    model, variables = restore.load_variables(config, _WORKDIR.value)
    path = os.path.join(_WORKDIR.value, "othello_study.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    split = datasets.load(config.data, config.seed).evals["eval"]  # games the run never trained on
    games = evaluation_games(split, config.data.size, _GAMES.value)
    layer = _LAYER.value if _LAYER.value >= 0 else (config.model.num_layers + 1) // 2
    needs_acts = set(_PARTS.value) - {"legal"}
    acts = residuals(model, variables, games["tokens"]) if needs_acts else None
    relative_probes = labels = None
    for part in _PARTS.value:
        start = time.time()
        if part == "legal":  # the newest checkpoint, and every checkpoint the run kept
            test_games = evaluation_games(split, config.data.size, config.data.test_games)
            results["legal"] = legal_moves(model, variables, test_games)
            results["legal_by_step"] = {
                step: legal_moves(*restore.load_variables(config, _WORKDIR.value, step), test_games)
                for step in restore.checkpoint_steps(_WORKDIR.value)}
        elif relative_probes is None:  # every other part reads the probes (or their labels)
            results["probes"], relative_probes, labels = probe_layers(acts, games, {"steps": _PROBE_STEPS.value})
            plot_probes(results["probes"], os.path.join(_WORKDIR.value, "probes.png"))
        if part == "edits":
            results["edits"] = {scale: edits(model, variables, games, acts, relative_probes, labels, float(scale))
                                for scale in _EDIT_SCALES.value}
        elif part == "geometry":
            results["geometry"] = geometry(acts, labels, relative_probes[layer], games, layer, square=_SQUARE.value,
                                           path=os.path.join(_WORKDIR.value, "geometry.png"))
        elif part == "sae":
            results["sae"] = sae_latents(acts, labels, games, layer)
        results.setdefault("seconds", {})[part] = time.time() - start
        print(part, json.dumps(results.get(part), indent=1)[:2000], flush=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
