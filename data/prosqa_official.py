"""The official ProsQA files (Hao et al. 2024; facebookresearch/coconut's `data/prosqa_{test,valid}.json`) as
Problems, and the statistics of any ProsQA-style problems' graphs, read from their text.

An official record:

    question      "Every gerpus is a terpus. ... Sally is a boompus. ... Is Sally a hilpus or sterpus?"
    steps         ["Sally is a scrompus.", "Every scrompus is a rempus.", "Every rempus is a sterpus."]
    answer        "Sally is a sterpus."
    idx_to_symbol, edges ([u, v]: u is a v), root (the person asked about), target, neg_target

A sentence becomes its words and its closing "." or "?" as separate words, case kept ("Every", "Is", "Sally").

Graph statistics come from the facts in the question, not from the record's graph fields, so they apply to the
generator's problems too (whose format is "every x is a y ." and "is tom a A or a B ?"): a fact "every X is a Y"
or "NAME is a Y" is the edge X -> Y; the question names the root (the person) and the two options; the answer's
last concept is the target, the other option the negative target. Per problem: nodes, edges, persons (sources
of person facts), the root's out-degree, hops (the shortest root -> target path's length, which the official
steps follow: the person's fact, then one fact per edge) and the number of such paths; over the problems: how
many distinct concepts and persons.
"""

import collections
import json
import os
import re

import numpy as np

from data import reasoning

OFFICIAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "files", "prosqa")  # shipped: see its README
SPLITS = ("test", "valid")
PER_PROBLEM = ("nodes", "edges", "persons", "root_out_degree", "hops", "shortest_paths")


def words(sentence: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[^\s.?]+|[.?]", sentence))


def problem(record: dict) -> reasoning.Problem:
    return reasoning.Problem(question=words(record["question"]), steps=tuple(words(s) for s in record["steps"]),
                             answer=words(record["answer"]))


def path(split: str, directory: str = OFFICIAL_DIR) -> str:
    if split not in SPLITS:
        raise ValueError(f"ProsQA split {split!r} is not one of {list(SPLITS)}")
    return os.path.normpath(os.path.join(directory, f"prosqa_{split}.json"))


def read(file: str) -> list[dict]:
    """The records of an official-schema JSON file (an official split, or data/prosqa_dag.py's output)."""
    if not os.path.exists(file):
        raise FileNotFoundError(f"ProsQA file {file} does not exist (the official splits ship in "
                                f"data/files/prosqa/; `python -m data.prosqa_dag --out=FILE` writes new ones)")
    with open(file) as f:
        return json.load(f)


def load(split: str, directory: str = OFFICIAL_DIR) -> list[reasoning.Problem]:
    return [problem(r) for r in read(path(split, directory))]


def vocabulary(problems) -> reasoning.Vocabulary:
    """The special tokens, then every word of `problems` in order of first appearance."""
    return reasoning.Vocabulary(w for p in problems for part in (p.question, *p.steps, p.answer) for w in part)


def sentences(tokens) -> list[tuple[str, ...]]:
    out, current = [], []
    for w in tokens:
        if w in (".", "?"):
            out.append((*current, w))
            current = []
        else:
            current.append(w)
    return out


def graph(p: reasoning.Problem) -> dict:
    """{edges: [(x, y)], persons: {name}, root, options: (a, b), target, neg_target} from the problem's text."""
    edges, persons, root, options = [], set(), None, ()
    for s in sentences(p.question):
        content = [w for w in s[:-1] if w != "a"]
        if s[-1] == "?":  # "Is Sally a X or Y ?" / "is tom a X or a Y ?"
            root, options = content[1], (content[2], content[4])
        elif content[0].lower() == "every":  # every X is Y
            edges.append((content[1], content[3]))
        else:  # NAME is Y
            edges.append((content[0], content[2]))
            persons.add(content[0])
    target = [w for w in p.answer if w not in (".", "?")][-1]
    neg_target = options[1] if options[0] == target else options[0]
    return dict(edges=edges, persons=persons, root=root, options=options, target=target, neg_target=neg_target)


def breadth_first(edges, source) -> tuple[dict, collections.Counter]:
    """(depth, number of shortest paths) of every node reachable from source along the directed edges."""
    children = collections.defaultdict(list)
    for x, y in edges:
        children[x].append(y)
    depth, count, frontier = {source: 0}, collections.Counter({source: 1}), [source]
    for node in frontier:  # breadth first: a node's count is final before it is expanded
        for child in children[node]:
            if child not in depth:
                depth[child] = depth[node] + 1
                frontier.append(child)
            if depth[child] == depth[node] + 1:
                count[child] += count[node]
    return depth, count


def shortest_paths(edges, source, target) -> tuple[int | None, int]:
    """(length, count) of the shortest directed paths from source to target; (None, 0) if there is none."""
    depth, count = breadth_first(edges, source)
    return depth.get(target), count[target]


def problem_statistics(p: reasoning.Problem) -> dict:
    g = graph(p)
    nodes = {n for e in g["edges"] for n in e} | set(g["options"])
    hops, paths = shortest_paths(g["edges"], g["root"], g["target"])
    return dict(nodes=len(nodes), edges=len(g["edges"]), persons=len(g["persons"]),
                root_out_degree=sum(x == g["root"] for x, _ in g["edges"]), hops=hops, shortest_paths=paths)


def statistics(problems) -> dict:
    """{statistic: (mean, min, max)} over the problems, and the distinct concepts and persons they use."""
    per = [problem_statistics(p) for p in problems]
    out = {k: (float(np.mean([s[k] for s in per])), min(s[k] for s in per), max(s[k] for s in per))
           for k in PER_PROBLEM}
    graphs = [graph(p) for p in problems]
    persons = set().union(*(g["persons"] for g in graphs))
    concepts = {n for g in graphs for e in g["edges"] for n in e} - persons
    out.update(concepts=len(concepts), person_names=len(persons))
    return out
