"""Mutation testing: plants small bugs in modules, one at a time, and reports which ones the tests catch.

    PYTHONPATH=. python scripts/tools/mutation_test.py --modules=models/sae.py,experiments/losses.py \
        [--mutants=30] [--seed=0] [--transitive] [--slow] [--workers=2] [--timeout=900] [--skip=0] \
        [--out=runs/mutation/report.json]

A mutant is one change of the module's syntax tree at one site, drawn at random (`--seed`) from every site of
these kinds (the bugs a formula or a mask most often hides):
    arithmetic    + <-> -,  * <-> /,  ** -> *
    comparison    < <-> <=,  > <-> >=,  == <-> !=
    logic         and <-> or,  not x -> x,  -x -> x
    constant      an int n -> n + 1, a float f -> 2 f (0.0 -> 1.0), True <-> False
    call          stop_gradient(x) -> x,  max <-> min,  sum <-> mean,  argmax <-> argmin,  maximum <-> minimum,
                  where(c, a, b) -> where(c, b, a)
Docstrings and other strings, and the module's `if __name__ == "__main__":` block, are left alone.

Each mutant runs in a scratch copy of the repository (the working tree is never written; `--workers` copies run
side by side), against the test files that import the module by name (`from models import sae`, `models.sae`, ...)
and those that read every module (EVERY_MUTANT: the config schema snapshot): the default tests first, then, for a
mutant they miss and with `--transitive`, the default tests of the modules of its own package that import it,
directly or through others (not through a package's `__init__`, which imports every family: a KV-cache bug is
caught by the tests of the attention layers that write it), and with `--slow`, the slow tests of all of them.
A mutant is killed when a test fails or errors, or the run exceeds `--timeout` seconds; it survives when every
test passes (or when no test file imports the module). Prints one Markdown table of kill rates by package and
module (default, and default + slow), then every survivor with its line before and after, and writes the whole
report as JSON to `--out`. A survivor is either a missing test or an equivalent mutant (one that changes no
behaviour: `x <= 0` for `x < 0` on a value that is never 0); the testing guide lists how to tell them apart.
"""

import ast
import concurrent.futures
import copy
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODULES = flags.DEFINE_list("modules", [], "Module files to mutate, relative to the repository root.")
_MUTANTS = flags.DEFINE_integer("mutants", 30, "Mutants per module (drawn from its sites; 0: every site).")
_SEED = flags.DEFINE_integer("seed", 0, "Which sites are drawn (another seed: an independent set of bugs).")
_SLOW = flags.DEFINE_boolean("slow", False, "Run the slow tests on the mutants the default tests miss.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Scratch copies run side by side.")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds before a test run counts as killed (a hang).")
_OUT = flags.DEFINE_string("out", "runs/mutation/report.json", "Where the JSON report goes.")
_SKIP = flags.DEFINE_integer("skip", 0, "Skip the first N mutants of the draw (resuming a run stopped after them: "
                             "the same modules and seed draw the same mutants).")
_TRANSITIVE = flags.DEFINE_boolean("transitive", False, "Also run, on the mutants the module's own tests miss, the "
                                   "tests of the modules that import it, directly or through others.")

SWAPS = {  # operator classes swapped both ways
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.And: ast.Or, ast.Or: ast.And,
}
CALL_SWAPS = {"max": "min", "min": "max", "sum": "mean", "mean": "sum", "argmax": "argmin", "argmin": "argmax",
              "maximum": "minimum", "minimum": "maximum"}
# Tests that read every module through a registry rather than by name (the config schema snapshot: every section's
# defaults and bounds, wherever they are declared), run with every mutant; a second or two each.
EVERY_MUTANT = ("tests/experiments/test_config_schema.py",)
PACKAGES = ("models", "experiments", "kernels_pallas", "data")
IGNORED = ("__pycache__", ".git", ".venv", ".venv-ci", "runs", "corpora", "site", ".pytest_cache", "node_modules")


@dataclasses.dataclass
class Site:
    index: int  # the site's position in the module's walk order
    line: int
    kind: str  # what the mutant does, e.g. "Add -> Sub"


def _called_name(node: ast.Call) -> str:
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")


def _protected(tree: ast.Module) -> set[int]:
    """ids of the nodes no mutant touches: docstrings, every string, the `__main__` block."""
    protected = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            protected |= {id(n) for n in ast.walk(node)}
        if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            protected |= {id(n) for n in ast.walk(node)}
    return protected


def _mutation(node) -> str | None:
    """What mutating `node` would do ("A -> B"), or None when it is not a site."""
    if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
        return f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
        return f"{type(node.ops[0]).__name__} -> {SWAPS[type(node.ops[0])].__name__}"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        return f"drop {type(node.op).__name__}"
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        return f"{node.value!r} -> {_new_constant(node.value)!r}"
    if isinstance(node, ast.Call):
        name = _called_name(node)
        if name == "stop_gradient" and len(node.args) == 1:
            return "drop stop_gradient"
        if name in CALL_SWAPS and isinstance(node.func, ast.Attribute):
            return f"{name} -> {CALL_SWAPS[name]}"
        if name == "where" and len(node.args) == 3:
            return "where(c, a, b) -> where(c, b, a)"
    return None


def _new_constant(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return 2.0 * value if value else 1.0


def sites(source: str) -> list[Site]:
    """Every mutation site of a module's source, in walk order."""
    tree = ast.parse(source)
    protected = _protected(tree)
    found = []
    for index, node in enumerate(ast.walk(tree)):
        kind = None if id(node) in protected else _mutation(node)
        if kind:
            found.append(Site(index, getattr(node, "lineno", 0), kind))
    return found


class _Replace(ast.NodeTransformer):
    def __init__(self, target):
        self.target = target

    def visit(self, node):
        if node is self.target:
            return _mutated(node)
        return super().visit(node)


def _mutated(node):
    node = copy.copy(node)
    if isinstance(node, (ast.BinOp, ast.BoolOp)):
        node.op = SWAPS[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops = [SWAPS[type(node.ops[0])]()]
    elif isinstance(node, ast.UnaryOp):
        return node.operand
    elif isinstance(node, ast.Constant):
        node.value = _new_constant(node.value)
    elif _called_name(node) == "stop_gradient":
        return node.args[0]
    elif _called_name(node) == "where":
        node.args = [node.args[0], node.args[2], node.args[1]]
    else:
        node.func = copy.copy(node.func)
        node.func.attr = CALL_SWAPS[node.func.attr]
    return node


def mutate(source: str, site: Site) -> str:
    """The module's source with the mutation at `site` (unparsed from the changed tree: comments and layout
    go, the code is the same but for the one change)."""
    tree = ast.parse(source)
    target = next(node for index, node in enumerate(ast.walk(tree)) if index == site.index)
    return ast.unparse(ast.fix_missing_locations(_Replace(target).visit(tree)))


def dotted(module_path: str) -> str:
    return module_path[:-3].replace(os.sep, ".").replace("/", ".")


def tests_importing(module_path: str, root: str = REPO) -> list[str]:
    """The test files (relative paths) that import the module by its dotted name, and those of EVERY_MUTANT."""
    every = [t for t in EVERY_MUTANT if os.path.isfile(os.path.join(root, t))]
    return sorted(set(_tests_importing_any([dotted(module_path)], root)) | set(every))


def _imports_pattern(name: str) -> str:
    package, _, leaf = name.rpartition(".")
    return rf"{re.escape(name)}\b|from\s+{re.escape(package)}\s+import\s+[^\n]*\b{re.escape(leaf)}\b"


def _tests_importing_any(names: list[str], root: str) -> list[str]:
    patterns = [_imports_pattern(name) for name in names]
    found = []
    for folder, _, files in os.walk(os.path.join(root, "tests")):
        for file in sorted(files):
            if file.startswith("test_") and file.endswith(".py"):
                path = os.path.join(folder, file)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if any(re.search(p, text) for p in patterns):
                    found.append(os.path.relpath(path, root))
    return sorted(found)


def import_graph(root: str = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports (at the top or inside functions), packages' `__init__` left out."""
    files = {}
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(root, package)):
            for file in names:
                if file.endswith(".py") and file != "__init__.py":
                    path = os.path.join(folder, file)
                    files[dotted(os.path.relpath(path, root))] = path
    graph = {}
    for name, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
                found.add(node.module)
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def transitive_importers(module_path: str, root: str = REPO) -> list[str]:
    """The modules of the module's own package (models, experiments, ...) that import it, directly or through other
    modules of that package (not through packages' `__init__`): the layers built on it, not every tool above."""
    package = dotted(module_path).split(".")[0]
    graph = {m: imports for m, imports in import_graph(root).items() if m.split(".")[0] == package}
    found, frontier = set(), {dotted(module_path)}
    while frontier:
        frontier = {m for m, imports in graph.items() if imports & frontier} - found - {dotted(module_path)}
        found |= frontier
    return sorted(found)


def tests_of_importers(module_path: str, root: str = REPO) -> list[str]:
    """The test files importing a transitive importer of the module, less those importing the module itself."""
    importers = transitive_importers(module_path, root)
    return sorted(set(_tests_importing_any(importers, root)) - set(tests_importing(module_path, root))) if importers \
        else []


def _pytest(root: str, tests: list[str], marker: str, timeout: int) -> str:
    """"passed", "failed" or "timeout" of the tests (those of `marker`) in the scratch copy at root."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", marker, *tests]
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    if done.returncode == 5:  # no test collected under this marker
        return "passed"
    return "passed" if done.returncode == 0 else "failed"


def run_mutant(root: str, module_path: str, source: str, site: Site, tests: list[str],
               importer_tests: tuple[str, ...] = (), *, slow: bool, timeout: int) -> dict:
    """One mutant in the scratch copy at root (restored afterwards): its outcome under the default tests, then, if
    they miss it, under the default tests of its importers (`importer_tests`) and, with `slow`, the slow ones."""
    path = os.path.join(root, module_path)
    mutated = mutate(source, site)
    result = {"module": module_path, "line": site.line, "kind": site.kind,
              "before": source.splitlines()[site.line - 1].strip() if site.line else ""}
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(mutated)
        default = _pytest(root, tests, "not slow", timeout) if tests else "passed"
        result["default"] = "killed" if default != "passed" else "survived"
        if importer_tests:
            result["own_tests"] = result["default"]
            if result["default"] == "survived":
                killed = _pytest(root, list(importer_tests), "not slow", timeout) != "passed"
                result["default"] = "killed" if killed else "survived"
        result["slow"] = result["default"]
        everything = [*tests, *importer_tests]
        if result["default"] == "survived" and slow and everything:
            result["slow"] = "killed" if _pytest(root, everything, "slow", timeout) != "passed" else "survived"
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
    return result


def scratch_copies(count: int) -> list[str]:
    base = tempfile.mkdtemp(prefix="mutation-")
    roots = []
    for i in range(count):
        root = os.path.join(base, f"copy_{i}")
        shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
        roots.append(root)
    return roots


def rates(results: list[dict], key) -> dict:
    """{group: (mutants, killed by default, killed by default + slow)} over results grouped by key(result)."""
    table = {}
    for r in results:
        total, default, both = table.get(key(r), (0, 0, 0))
        table[key(r)] = (total + 1, default + (r["default"] == "killed"), both + (r["slow"] == "killed"))
    return table


def markdown(results: list[dict]) -> str:
    lines = ["| package / module | mutants | killed by default | rate | killed by default + slow | rate |",
             "|---|---|---|---|---|---|"]
    groups = {**{f"**{k}/**": v for k, v in rates(results, lambda r: r["module"].split("/")[0]).items()},
              **rates(results, lambda r: r["module"])}
    for name, (total, default, both) in groups.items():
        lines.append(f"| {name} | {total} | {default} | {default / total:.0%} | {both} | {both / total:.0%} |")
    total, default, both = len(results), sum(r["default"] == "killed" for r in results), sum(
        r["slow"] == "killed" for r in results)
    if total:
        lines.append(f"| **all** | {total} | {default} | {default / total:.0%} | {both} | {both / total:.0%} |")
    survivors = [r for r in results if r["slow"] == "survived"]
    if survivors:
        lines += ["", "Survivors:"] + [f"- `{r['module']}:{r['line']}` {r['kind']}: `{r['before']}`" for r in survivors]
    return "\n".join(lines)


def main(argv):
    del argv
    if not _MODULES.value:
        raise SystemExit("error: pass --modules=PATH[,PATH...] (module files relative to the repository root)")
    missing = [m for m in _MODULES.value if not os.path.isfile(os.path.join(REPO, m)) or not m.endswith(".py")]
    if missing:
        raise SystemExit(f"error: --modules={','.join(missing)}: not Python files of this repository")
    rng = random.Random(_SEED.value)
    jobs = []
    for module_path in _MODULES.value:
        with open(os.path.join(REPO, module_path), encoding="utf-8") as f:
            source = f.read()
        found = sites(source)
        drawn = sorted(rng.sample(found, min(_MUTANTS.value, len(found))) if _MUTANTS.value else found,
                       key=lambda s: s.index)
        tests = tests_importing(module_path)
        importer_tests = tuple(tests_of_importers(module_path)) if _TRANSITIVE.value else ()
        print(f"{module_path}: {len(found)} sites, {len(drawn)} mutants, tests: {' '.join(tests) or 'none'}"
              + (f"; of its importers: {len(importer_tests)} files" if _TRANSITIVE.value else ""), flush=True)
        jobs += [(module_path, source, site, tests, importer_tests) for site in drawn]
    jobs = jobs[_SKIP.value:]
    roots = scratch_copies(max(1, min(_WORKERS.value, len(jobs))))
    results = []
    try:
        with concurrent.futures.ThreadPoolExecutor(len(roots)) as pool:
            free = list(roots)

            def work(job):
                root = free.pop()
                try:
                    return run_mutant(root, *job, slow=_SLOW.value, timeout=_TIMEOUT.value)
                finally:
                    free.append(root)

            for result in pool.map(work, jobs):
                results.append(result)
                print(f"  {result['module']}:{result['line']} {result['kind']}: {result['default']} by default, "
                      f"{result['slow']} with slow", flush=True)
    finally:
        shutil.rmtree(os.path.dirname(roots[0]), ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"seed": _SEED.value, "slow": _SLOW.value, "transitive": _TRANSITIVE.value, "results": results}, f, indent=1)
    print(markdown(results))


if __name__ == "__main__":
    app.run(main)
