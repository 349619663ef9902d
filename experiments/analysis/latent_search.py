"""Latent-search probing of a Coconut run on ProsQA (Hao et al. 2024, §5): what each continuous thought encodes,
read through the language-model head.

Thought t is the last hidden state the model feeds back (the one after `<bot>` and t - 1 thoughts); decoded by
the head it is a distribution p_t over the vocabulary. Against the problem's graph (read from its text,
data/prosqa_official.graph), with depth(n) the number of hops from the root person to n:

    frontier_t         nodes with depth(n) = t                  (where a breadth-first search stands after t steps)
    reachable_t        nodes with 1 <= depth(n) <= t
    correct_t          frontier_t nodes from which the target is reachable (the branches that lead to the answer)
    mass(S)            sum of p_t(n) over the nodes n in S           (every concept and name is one token here)
    value_t(n)         p_t(n) / mass(frontier_t): n's share among the frontier (the paper's "value", Figure 8)
    height(n)          hops from n to the nearest node without children (the paper's Figure 9)

The paper reads the values as an implicit value function: a frontier node on a correct branch gets more of the
mass than the others, the more clearly the lower its height (the closer it is to a leaf, the easier to evaluate).

    python -m experiments.analysis.latent_search --workdir=RUN [--split=test]     (a finished data.method=coconut run)

prints the mass on each set per thought and the mean value of correct and other frontier nodes per height (JSON),
and writes latent_search.png in the run folder.
"""

import collections
import json
import os
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import data as datasets
from data import prosqa_official, reasoning
from experiments import restore
from experiments.training import cli, plots

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def graph_view(graph: dict) -> tuple[dict, set, dict]:
    """(depth from the root, the nodes that reach the target, heights) of a ProsQA graph: what every thought's sets
    are cut from, computed once per problem."""
    depth, _ = prosqa_official.breadth_first(graph["edges"], graph["root"])
    reaches_target = {n for n in depth if graph["target"] in prosqa_official.breadth_first(graph["edges"], n)[0]}
    return depth, reaches_target, heights(graph["edges"])


def node_sets(graph: dict, t: int, view: tuple | None = None) -> dict:
    """{"frontier", "reachable", "correct": sets of nodes, "height": {node: height}} of a ProsQA graph at thought t
    (`view`: its graph_view, if already computed)."""
    depth, reaches_target, height = view or graph_view(graph)
    frontier = {n for n, d in depth.items() if d == t}
    return dict(frontier=frontier, reachable={n for n, d in depth.items() if 1 <= d <= t},
                correct=frontier & reaches_target, height=height)


def heights(edges) -> dict:
    """Hops from each node to the nearest node without children (a sink: height 0)."""
    parents, nodes = collections.defaultdict(list), {n for e in edges for n in e}
    has_children = {x for x, _ in edges}
    for x, y in edges:
        parents[y].append(x)
    height = {n: 0 for n in nodes - has_children}
    frontier = list(height)
    for node in frontier:  # breadth first backwards from every sink at once
        for parent in parents[node]:
            if parent not in height:
                height[parent] = height[node] + 1
                frontier.append(parent)
    return height


_forward = jax.jit(lambda model, variables, rows: model.apply(variables, rows), static_argnums=0)  # compiled once


def thought_distributions(model, variables, prompts, num_thoughts: int, bot_position: int) -> np.ndarray:
    """float32 [N, num_thoughts, V]: the head's distribution at each thought of left-padded rows ending in <bot>.

    A row prompt <thought> x K <eot> through the model's forward pass: the logits at <bot> + t - 1 are the head on
    thought t (the hidden state fed back as the next input)."""
    rows = np.concatenate([prompts, np.full((len(prompts), num_thoughts), reasoning.THOUGHT, np.int32),
                           np.full((len(prompts), 1), reasoning.EOT, np.int32)], axis=1)
    logits = _forward(model, variables, jnp.asarray(rows))
    return np.asarray(jax.nn.softmax(logits[:, bot_position:bot_position + num_thoughts], axis=-1))


def analyse(problems, probabilities: np.ndarray, vocab: reasoning.Vocabulary) -> dict:
    """Per thought t: the mean mass on frontier_t, reachable_t, correct_t and on every node of the graph; for
    thoughts 1 and 2: the mean value of correct and of other frontier nodes by height (with their counts)."""
    num_thoughts = probabilities.shape[1]
    mass = collections.defaultdict(list)
    values = collections.defaultdict(list)  # (t, height, "correct" | "other") -> values
    for p, probs in zip(problems, probabilities):
        graph = prosqa_official.graph(p)
        nodes, view = {n for e in graph["edges"] for n in e}, graph_view(graph)
        for t in range(1, num_thoughts + 1):
            sets, pt = node_sets(graph, t, view), probs[t - 1]
            p_of = lambda ns: float(sum(pt[vocab.ids[n]] for n in ns))  # noqa: E731
            for name in ("frontier", "reachable", "correct"):
                mass[(t, name)].append(p_of(sets[name]))
            mass[(t, "graph")].append(p_of(nodes))
            frontier_mass = p_of(sets["frontier"])
            if t <= 2 and frontier_mass > 0:
                for n in sets["frontier"]:
                    kind = "correct" if n in sets["correct"] else "other"
                    values[(t, sets["height"][n], kind)].append(pt[vocab.ids[n]] / frontier_mass)
    return dict(
        mass={f"thought_{t}": {name: float(np.mean(mass[(t, name)])) for name in ("frontier", "reachable", "correct",
                                                                                 "graph")}
              for t in range(1, num_thoughts + 1)},
        value_by_height=[dict(thought=t, height=h, kind=kind, mean=float(np.mean(v)), count=len(v))
                         for (t, h, kind), v in sorted(values.items())])


def probe(config, workdir: str, split: str = "test", batch_size: int = 100) -> dict:
    """`analyse` of a finished Coconut run's thoughts on `split`."""
    model, variables = restore.load_variables(config, workdir)
    splits = datasets.reasoning_problems(config.data, config.seed)
    problems, geo = splits[split], datasets.reasoning_geometry(config.data, splits)  # the rows' layout as trained
    vocab = datasets.GENERATORS[config.data.name].VOCABULARY
    prompts = reasoning.prompts(problems, vocab, geo, "coconut")
    probabilities = np.concatenate([
        thought_distributions(model, variables, prompts[i:i + batch_size], config.model.max_thoughts,
                              geo.bot_position) for i in range(0, len(prompts), batch_size)])
    return analyse(problems, probabilities, vocab)


def plot(result: dict, path: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    thoughts = sorted(result["mass"], key=lambda k: int(k.split("_")[1]))
    xs = [int(k.split("_")[1]) for k in thoughts]
    for name in ("graph", "reachable", "frontier", "correct"):
        left.plot(xs, [result["mass"][k][name] for k in thoughts], marker="o", label=name)
    left.set(xlabel="thought t", ylabel="probability mass", title="what each thought decodes to", ylim=(0, 1))
    left.legend()
    for t, marker in ((1, "o"), (2, "s")):
        for kind, color in (("correct", "tab:green"), ("other", "tab:red")):
            rows = [r for r in result["value_by_height"] if r["thought"] == t and r["kind"] == kind]
            right.plot([r["height"] for r in rows], [r["mean"] for r in rows], marker=marker, color=color,
                       label=f"thought {t}, {kind} branch")
    right.set(xlabel="height of the frontier node", ylabel="mean value (share of the frontier's mass)",
              title="value of frontier nodes by height")
    right.legend()
    plots.save_figure(fig, path)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = cli.run_config(_WORKDIR.value)
    if config.data.name not in ("prosqa", "prosqa_official") or config.data.method != "coconut":
        cli.fail(f"--workdir={_WORKDIR.value} trained data.name={config.data.name!r} with data.method="
                 f"{config.data.method!r}; latent search needs a Coconut run (data.method='coconut') on prosqa or "
                 "prosqa_official")
    result = probe(config, _WORKDIR.value, _SPLIT.value)
    with open(os.path.join(_WORKDIR.value, "latent_search.json"), "w") as f:
        json.dump(result, f)
    plot(result, os.path.join(_WORKDIR.value, "latent_search.png"))
    print(json.dumps(result), file=sys.stdout)


if __name__ == "__main__":  # the flags exist only for the command (studies import the functions above)
    _WORKDIR = flags.DEFINE_string("workdir", None, "A finished Coconut run's folder.", required=True)
    _SPLIT = flags.DEFINE_string("split", "test", "eval | test (for prosqa_official: the official valid / test split).")
    app.run(main)
