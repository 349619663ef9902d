"""ProsQA problems drawn to the official files' distribution (Hao et al. 2024, §4.1, and their released splits),
written in the official JSON schema (data/prosqa_official.py reads it):

    python -m data.prosqa_dag --out=FILE [--num=17886] [--seed=0]

A problem is a DAG over k persons and c concepts in which one person (the root) reaches the target concept by
shortest paths of h hops and never reaches the negative target, which another person does:

    h           from HOPS (3-6; the official files: 41%, 44%, 13%, 2%)
    n = k + c   round(N(22.8, 2)) within [14, 28];  k from PERSONS (2: 58%, 3: 32%, 4: 8%, 5-6: 2%)
    root side   R, ~61% of the concepts, in layers 1..L (L = h, or h + 1 in 14% of problems): layer j holds the
                concepts at distance j from the root; layer 1 is the root's children; a concept of layer j >= 2
                has 1 + Binomial(2, 0.1) parents in layer j - 1, so distances and shortest paths follow the
                layers; a few edges join concepts of one layer (distances unchanged); the target is in layer h
    other side  O, the rest: each concept has 1 + Binomial(2, 0.4) parents among the other persons and earlier
                O concepts; the negative target is the last; O may point into R (never R into O: the root
                never reaches O), and the other persons have children on both sides
    sinks       the target and the negative target have no children

The probabilities are tuned so that the statistics of data/prosqa_official.py match the official test split's
(within 3% on 2,000 problems: nodes, edges, persons, the root's out-degree, hops, shortest paths, vocabulary).
Facts: every edge once, in random order ("Every X is a Y." / "NAME is a Y."); the question "Is NAME a A or B?"
with the options in random order; the steps: the person's fact, then one fact per edge of one shortest path
drawn uniformly among them; the answer "NAME is a TARGET.". Node indices are a random topological order.
As `data.name = prosqa_official` it trains Coconut on its problems and evaluates on the official splits (`splits`).
`scripts/tools/prosqa_statistics.py` prints its statistics beside the official files'.
"""

import collections
import json
import os

from absl import app, flags
import numpy as np

from data import prosqa, prosqa_official, reasoning

HOPS = {3: 0.41, 4: 0.44, 5: 0.13, 6: 0.02}
PERSONS = {2: 0.58, 3: 0.32, 4: 0.08, 5: 0.015, 6: 0.005}
CONCEPTS = ("bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus", "gerpus", "gorpus", "grimpus",
            "gwompus", "hilpus", "impus", "jelpus", "jompus", "kerpus", "lempus", "lorpus", "numpus", "quimpus",
            "rempus", "rompus", "rorpus", "scrompus", "shumpus", "sterpus", "storpus", "terpus", "timpus", "tumpus",
            "vumpus", "worpus", "wumpus", "yerpus", "yimpus", "yumpus", "zhorpus", "zumpus")  # the official 38
NAMES = ("Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver", "Polly", "Rex", "Sally",
         "Sam", "Stella", "Tom", "Wren")  # the official 17
ROOT_SIDE_EXTRA_PARENT = 0.1  # each of two more parents, beside the first, with this probability
OTHER_SIDE_EXTRA_PARENT = 0.4
PERSON_EXTRA_CHILD = 0.4  # an other person's children: 1 + Binomial(2, this)
SAME_LAYER_EDGES = 0.2  # per ordered pair of one layer's concepts
VOCABULARY = reasoning.Vocabulary(("Every", "is", "a", ".", "Is", "or", "?") + NAMES + CONCEPTS)
OTHER_SIDE_INTO_ROOT_SIDE = 0.25  # per O concept: an edge to a random R concept


def _draw(rng, table: dict) -> int:
    return int(rng.choice(list(table), p=np.array(list(table.values())) / sum(table.values())))


def _parents(rng, candidates: list, extra: float) -> list:
    count = min(len(candidates), 1 + int(rng.binomial(2, extra)))
    return [candidates[i] for i in rng.choice(len(candidates), count, replace=False)]


def _layer_sizes(rng, root_side: int, layers: int, hops: int) -> list[int]:
    """Concepts per layer 1..layers: the first the root's out-degree, every layer >= 1, layer `hops` >= 2 when a
    layer follows it (the target there has no children)."""
    sizes = [1] * layers
    if layers > hops:
        sizes[hops - 1] = 2
    first = min(int(rng.binomial(6, 0.33)), root_side - sum(sizes))
    sizes[0] += first
    for _ in range(root_side - sum(sizes)):  # the rest, more to the earlier layers
        weights = 1.0 / np.sqrt(np.arange(1, layers))
        sizes[1 + int(rng.choice(layers - 1, p=weights / weights.sum()))] += 1
    return sizes


def draw_graph(rng, min_hops: int = 3, max_hops: int = 6) -> dict:
    """{"edges": [(u, v)], "root", "target", "neg_target", "persons": [ids]}: ids 0..n-1, persons first; hops
    drawn from HOPS within [min_hops, max_hops]."""
    hops = _draw(rng, {h: p for h, p in HOPS.items() if min_hops <= h <= max_hops})
    persons = _draw(rng, PERSONS)
    nodes = int(np.clip(round(rng.normal(22.8, 2.0)), max(14, persons + hops + 3), 28))
    concepts = nodes - persons
    layers = hops + int(rng.random() < 0.14)
    root_side = int(np.clip(round(0.61 * concepts + rng.normal(0, 2)), layers + int(layers > hops), concepts - 1))
    ids = iter(range(persons, nodes))
    layer_nodes = [[next(ids) for _ in range(size)] for size in _layer_sizes(rng, root_side, layers, hops)]
    other_side = list(ids)
    root, others = 0, list(range(1, persons))
    target, neg_target = layer_nodes[hops - 1][-1], other_side[-1]
    edges = [(root, v) for v in layer_nodes[0]]
    for j in range(1, layers):
        candidates = [u for u in layer_nodes[j - 1] if u != target]
        edges += [(u, v) for v in layer_nodes[j] for u in _parents(rng, candidates, ROOT_SIDE_EXTRA_PARENT)]
    for layer in layer_nodes:
        edges += [(u, v) for i, u in enumerate(layer) for v in layer[i + 1:]
                  if u != target and rng.random() < SAME_LAYER_EDGES]
    for i, v in enumerate(other_side):
        edges += [(u, v) for u in _parents(rng, others + other_side[:i], OTHER_SIDE_EXTRA_PARENT)]
    root_side_nodes = [v for layer in layer_nodes for v in layer]
    edges += [(u, root_side_nodes[int(rng.integers(root_side))]) for u in other_side[:-1]
              if rng.random() < OTHER_SIDE_INTO_ROOT_SIDE]
    edges += [(u, v) for u in others for v in _parents(rng, root_side_nodes + other_side, PERSON_EXTRA_CHILD)]
    return dict(edges=sorted(set(edges)), root=root, target=target, neg_target=neg_target,
                persons=list(range(persons)))


def topological_order(num_nodes: int, edges, rng) -> list[int]:
    """A random topological order (Kahn's algorithm, ties broken at random)."""
    children, indegree = collections.defaultdict(list), collections.Counter(v for _, v in edges)
    for u, v in edges:
        children[u].append(v)
    ready, order = [n for n in range(num_nodes) if indegree[n] == 0], []
    while ready:
        node = ready.pop(int(rng.integers(len(ready))))
        order.append(node)
        for child in children[node]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return order


def shortest_path(edges, source: int, target: int, rng) -> list[int]:
    """One shortest source -> target path, uniform among them: backwards from the target, each parent one step
    nearer the source with probability proportional to its number of shortest paths."""
    parents = collections.defaultdict(list)
    for u, v in edges:
        parents[v].append(u)
    depth, count = prosqa_official.breadth_first(edges, source)
    path = [target]
    while path[-1] != source:
        nearer = [u for u in parents[path[-1]] if depth.get(u) == depth[path[-1]] - 1]
        weights = np.array([count[u] for u in nearer], np.float64)
        path.append(nearer[int(rng.choice(len(nearer), p=weights / weights.sum()))])
    return path[::-1]


def _fact(symbols, persons, u, v) -> str:
    return f"{symbols[u]} is a {symbols[v]}." if u in persons else f"Every {symbols[u]} is a {symbols[v]}."


def record(rng, min_hops: int = 3, max_hops: int = 6) -> dict:
    """One problem in the official schema."""
    g = draw_graph(rng, min_hops, max_hops)
    num_nodes = 1 + max(max(e) for e in g["edges"])
    persons = set(g["persons"])
    names = iter(rng.permutation(NAMES).tolist())
    concepts = iter(rng.permutation(CONCEPTS).tolist())
    symbols = [next(names) if n in persons else next(concepts) for n in range(num_nodes)]
    order = topological_order(num_nodes, g["edges"], rng)
    index = {node: i for i, node in enumerate(order)}
    facts = [_fact(symbols, persons, u, v) for u, v in (g["edges"][i] for i in rng.permutation(len(g["edges"])))]
    options = [symbols[g["target"]], symbols[g["neg_target"]]]
    rng.shuffle(options)
    path = shortest_path(g["edges"], g["root"], g["target"], rng)
    name = symbols[g["root"]]
    return dict(question=" ".join(facts) + f" Is {name} a {options[0]} or {options[1]}?",
                answer=f"{name} is a {symbols[g['target']]}.",
                steps=[_fact(symbols, persons, u, v) for u, v in zip(path, path[1:])],
                idx_to_symbol=[symbols[n] for n in order],
                edges=[[index[u], index[v]] for u, v in g["edges"]],
                root=index[g["root"]], target=index[g["target"]], neg_target=index[g["neg_target"]])


def records(num: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [record(rng) for _ in range(num)]


def splits(config, seed: int) -> dict[str, list[reasoning.Problem]]:
    """`data.name = prosqa_official`: `train_examples` generated problems (deterministic in the seed, none with an
    official question), the official validation split as "eval" and the official test split as "test" (their first
    `eval_examples` / `test_examples`), as the paper trains and evaluates."""
    official = {"eval": prosqa_official.load("valid")[:config.eval_examples],
                "test": prosqa_official.load("test")[:config.test_examples]}
    seen = {p.question for ps in official.values() for p in ps}
    generate = lambda rng, i: prosqa_official.problem(record(rng, config.min_hops, config.max_hops))  # noqa: E731
    train = [p for p in reasoning.unique_splits(generate, {"train": config.train_examples + 10}, seed)["train"]
             if p.question not in seen][:config.train_examples]
    return {"train": train, **official}


def validate(config) -> list[str]:
    p = prosqa.rejected_problems(config)
    if not min(HOPS) <= config.min_hops <= config.max_hops <= max(HOPS):
        p.append(f"data.min_hops={config.min_hops}, data.max_hops={config.max_hops}: the official distribution has "
                 f"{min(HOPS)}-{max(HOPS)} hops; need {min(HOPS)} <= min_hops <= max_hops <= {max(HOPS)}")
    if config.branches:
        p.append(f"data.branches={config.branches}: the official distribution has no dead-end count; leave it 0")
    for split, size, key in (("valid", 300, "eval_examples"), ("test", 500, "test_examples")):
        if not os.path.exists(prosqa_official.path(split)):
            p.append(f"the official ProsQA {split} split {prosqa_official.path(split)} does not exist")
        if getattr(config, key) > size:
            p.append(f"data.{key}={getattr(config, key)}: the official {split} split has {size} problems")
    return p


def main(argv):
    del argv
    out, num, seed = flags.FLAGS.out, flags.FLAGS.num, flags.FLAGS.seed
    if not out:
        raise app.UsageError("--out=FILE is required: where the problems go (the official JSON schema)")
    with open(out, "w") as f:
        json.dump(records(num, seed), f)
    print(f"wrote {num} problems (seed {seed}) to {out}")


if __name__ == "__main__":  # flags defined here only: importing the module defines none
    flags.DEFINE_string("out", None, "The JSON file to write.")
    flags.DEFINE_integer("num", 17_886, "Problems (the official training split's size by default).")
    flags.DEFINE_integer("seed", 0, "The generator's seed.")
    app.run(main)
