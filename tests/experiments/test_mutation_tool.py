"""scripts/tools/mutation_test.py: every site kind mutates exactly one node into code that still compiles, strings
and the command block are left alone, the tests of a module are found by its imports, and a run on a real module
reports each mutant killed or survived without touching the working tree."""

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("mutation_test", os.path.join(REPO, "scripts/tools/mutation_test.py"))
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)

SOURCE = '''"""A docstring with 1 + 2 < 3 inside."""
import jax


def f(x, y, flag=True):
    z = jax.lax.stop_gradient(x) * 2.5 - y ** 2
    if x < y and not flag:
        return -jax.numpy.max(z, axis=0)
    return jax.numpy.where(x >= 0, z, jax.numpy.sum(y))


if __name__ == "__main__":
    print(f(1 + 1, 2))
'''


def test_each_site_changes_one_node_and_compiles():
    found = mutation.sites(SOURCE)
    kinds = {s.kind for s in found}
    assert {"Mult -> Div", "Sub -> Add", "Pow -> Mult", "Lt -> LtE", "And -> Or", "drop Not", "drop USub",
            "drop stop_gradient", "max -> min", "sum -> mean", "where(c, a, b) -> where(c, b, a)", "GtE -> Gt",
            "2.5 -> 5.0", "True -> False", "0 -> 1"} <= kinds, kinds
    assert all(s.line not in (1, 12, 13) for s in found)  # the docstring and the __main__ block are left alone
    original = ast.dump(ast.parse(SOURCE))
    for site in found:
        mutated = mutation.mutate(SOURCE, site)
        compile(mutated, "mutant", "exec")
        assert ast.dump(ast.parse(mutated)) != original, site
        # one change, inside f: its signature or one statement of its body
        before, after = ast.parse(SOURCE).body[2], ast.parse(mutated).body[2]
        parts = lambda fn: [fn.args, *fn.body]  # noqa: E731
        assert sum(ast.dump(a) != ast.dump(b) for a, b in zip(parts(before), parts(after))) == 1, site
        assert [ast.dump(n) for n in ast.parse(mutated).body[3:]] == [ast.dump(n) for n in ast.parse(SOURCE).body[3:]]


def test_the_tests_of_a_module_are_the_files_importing_it():
    assert "tests/data/test_command_check.py" in mutation.tests_importing("data/command_check.py")
    sae_tests = mutation.tests_importing("models/sae.py")
    assert "tests/models/test_sae.py" in sae_tests and "tests/models/test_mor.py" not in sae_tests


def test_the_tests_of_importers_reach_a_module_through_its_own_package_only(tmp_path):
    files = {"models/__init__.py": "from models import a, b, c\n",  # a package's __init__ does not propagate
             "models/a.py": "X = 1\n", "models/b.py": "from models import a\n",
             "models/c.py": "def f():\n    import models.b\n",  # inside a function counts
             "models/d.py": "Y = 2\n", "experiments/e.py": "from models import c\n",
             "tests/test_a.py": "from models import a\n", "tests/test_c.py": "from models import c, d\n",
             "tests/test_d.py": "import models.d\n", "tests/test_e.py": "from experiments import e\n"}
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert mutation.transitive_importers("models/a.py", str(tmp_path)) == ["models.b", "models.c"]
    assert mutation.tests_of_importers("models/a.py", str(tmp_path)) == ["tests/test_c.py"]
    assert mutation.tests_importing("models/a.py", str(tmp_path)) == ["tests/test_a.py"]
    assert mutation.tests_of_importers("models/d.py", str(tmp_path)) == []
    assert "tests/models/test_attention_patterns.py" in mutation.tests_of_importers("models/kv_cache.py")


@pytest.mark.slow  # a few mutants of a small module, each a pytest run in a scratch copy
def test_a_run_reports_every_mutant_and_leaves_the_tree_alone(tmp_path):
    path = os.path.join(REPO, "data/command_check.py")
    with open(path) as f:
        before = f.read()
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "scripts/tools/mutation_test.py", "--modules=data/command_check.py",
                           "--mutants=3", "--workers=1", f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 3 and all(r["default"] in ("killed", "survived") for r in results)
    assert "| **all** | 3 |" in done.stdout
    with open(path) as f:
        assert f.read() == before
