"""No import cycle among the project's modules, counting imports inside functions (a function-local import
that dodges a cycle is still one), and nothing imports upward: scripts -> experiments -> models -> data /
kernels_pallas; inside experiments, the loop never imports the tools built on it. Modules and scripts that
moved into sub-packages answer their old names."""

import ast
import glob
import os
import subprocess
import sys

import pytest

import experiments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("models", "experiments", "kernels_pallas", "data")


def _module_name(path: str) -> str:
    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return name.removesuffix(".__init__")


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for package in PACKAGES
             for p in glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True)}
    graph = {}
    for name, path in files.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names)
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def _cycle(graph) -> list[str]:
    """One cycle of `graph` as a path of module names, or []."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        colour[node] = "black"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in colour and (found := visit(node)):
            return found
    return []


def test_no_import_cycle_counting_imports_inside_functions():
    cycle = _cycle(_graph())
    assert not cycle, " -> ".join(cycle)


def test_models_data_and_kernels_import_nothing_above_them():
    order = {"data": 0, "kernels_pallas": 0, "models": 1, "experiments": 2}
    for module, imports in _graph().items():
        for target in imports:
            assert order[target.split(".")[0]] <= order[module.split(".")[0]], f"{module} imports {target}"


def test_no_two_modules_share_a_name_outside_the_configs():
    """A config file is named after its experiment (configs/recall.py trains data/recall.py's task); any other
    module name is unique across the packages and scripts, so a name says which file it is."""
    seen = {}
    for folder in (*PACKAGES, "scripts"):
        for path in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True):
            relative = os.path.relpath(path, REPO)
            if (os.path.basename(path) == "__init__.py" or relative.startswith(os.path.join("experiments", "configs"))
                    or os.path.islink(path)):  # scripts/NAME.py: the old command line, a link to its new place
                continue
            seen.setdefault(os.path.basename(path), []).append(relative)
    assert not {n: p for n, p in seen.items() if len(p) > 1}


LOOP = ("experiments.training", "experiments.optim", "experiments.objectives", "experiments.posttrain",
        "experiments.configs", "experiments.losses", "experiments.restore")
TOOLS = ("experiments.analysis", "experiments.evaluation", "experiments.studies")


def test_the_loop_imports_none_of_the_tools_built_on_it():
    for module, imports in _graph().items():
        if module.startswith(LOOP):
            assert not [t for t in imports if t.startswith(TOOLS)], f"{module} imports {imports}"


def test_every_experiments_sub_package_is_described_in_its_docstring():
    for init in glob.glob(os.path.join(REPO, "experiments", "*", "__init__.py")):
        folder = os.path.basename(os.path.dirname(init))
        assert f"{folder}/" in experiments.__doc__, f"experiments/__init__.py does not describe {folder}/"


@pytest.mark.parametrize("old", sorted(experiments.MOVED))
def test_a_moved_module_answers_its_old_name_with_the_new_one(old):
    new = f"experiments.{experiments.MOVED[old]}"
    assert os.path.isfile(os.path.join(REPO, *new.split(".")) + ".py"), new
    assert not os.path.exists(os.path.join(REPO, "experiments", f"{old}.py"))
    with pytest.raises(ModuleNotFoundError, match=f"experiments.{old} moved to {new}"):
        __import__(f"experiments.{old}")


def test_an_old_module_command_line_is_one_line_naming_the_new_one():
    done = subprocess.run([sys.executable, "-m", "experiments.probes", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "python -m experiments.analysis.probes" in done.stderr, done.stderr


def test_every_old_script_path_is_a_link_to_its_script():
    """`python scripts/NAME.py` (a command line from before the role folders) still runs: every top-level entry
    of scripts/ is a role folder or a link into one. A new script goes into its folder, without a link."""
    entries = [e for e in os.listdir(os.path.join(REPO, "scripts")) if not e.startswith(".")]
    folders = {e for e in entries if os.path.isdir(os.path.join(REPO, "scripts", e))
               and not os.path.islink(os.path.join(REPO, "scripts", e))}
    assert folders == {"studies", "benchmarks", "tools", "launch"}
    for entry in set(entries) - folders:
        path = os.path.join(REPO, "scripts", entry)
        assert os.path.islink(path), f"scripts/{entry} is not in a role folder"
        target = os.readlink(path)
        assert target.split("/")[0] in folders and os.path.isfile(path), f"scripts/{entry} -> {target}"
