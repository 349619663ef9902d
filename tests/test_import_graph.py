"""No import cycle among the project's modules, counting imports inside functions (a function-local import
that dodges a cycle is still one), and nothing imports upward: scripts -> experiments -> models -> data /
kernels_pallas."""

import ast
import glob
import os

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
            if os.path.basename(path) == "__init__.py" or relative.startswith(os.path.join("experiments", "configs")):
                continue
            seen.setdefault(os.path.basename(path), []).append(relative)
    assert not {n: p for n, p in seen.items() if len(p) > 1}
