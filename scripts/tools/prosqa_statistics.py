"""ProsQA graph statistics side by side: the official test and validation splits, data/prosqa_dag.py's generator
(drawn to their distribution) and data/prosqa.py's (the Coconut study's so far).

    python scripts/tools/prosqa_statistics.py [--num=2000] [--seed=0]

Every statistic is read from the problems' text (data/prosqa_official.py), so all four are measured alike.
Prints a Markdown table: mean (min-max) per problem, the distinct concepts and persons over the problems, and
the generator's mean over the official test split's.
"""

from absl import app, flags
import numpy as np

from data import prosqa, prosqa_dag, prosqa_official

_NUM = flags.DEFINE_integer("num", 2000, "Problems drawn from each generator.")
_SEED = flags.DEFINE_integer("seed", 0, "The generators' seed.")


def cell(value) -> str:
    if isinstance(value, tuple):
        mean, low, high = value
        return f"{mean:.2f} ({low}-{high})"
    return f"{value}"


def main(argv):
    del argv
    rng = np.random.default_rng(_SEED.value)
    columns = {
        "official test": prosqa_official.load("test"),
        "official valid": prosqa_official.load("valid"),
        "prosqa_dag": [prosqa_official.problem(r) for r in prosqa_dag.records(_NUM.value, _SEED.value)],
        "prosqa (hops 3-4, 3 dead ends)": [prosqa.problem(rng, i, min_hops=3, max_hops=4, branches=3)
                                           for i in range(_NUM.value)],
    }
    stats = {name: prosqa_official.statistics(problems) for name, problems in columns.items()}
    print(f"| statistic | {' | '.join(f'{n} ({len(p):,})' for n, p in columns.items())} | prosqa_dag / official test |")
    print("|---|" + "---|" * (len(columns) + 1))
    for key in (*prosqa_official.PER_PROBLEM, "concepts", "person_names"):
        mean = lambda name: stats[name][key][0] if isinstance(stats[name][key], tuple) else stats[name][key]  # noqa: E731
        print(f"| {key} | {' | '.join(cell(s[key]) for s in stats.values())} | "
              f"{mean('prosqa_dag') / mean('official test'):.3f} |")


if __name__ == "__main__":
    app.run(main)
