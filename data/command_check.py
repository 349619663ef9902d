"""`python -m PACKAGE.MODULE` on a module that is not a command: one line naming the package's commands, exit 2.

Python runs any module given to `-m`; one without a command line (no `if __name__ == "__main__":` block) would be
imported and exit 0, as if it had done what was asked (`python -m data.prosqa --out=F` writing nothing). Each
top-level package calls `refuse_library_module` at the end of its `__init__`, which Python runs before it runs the
module: when the interpreter's own command line (`sys.orig_argv`) runs a module of that package that has no
such block, it says so and names the package's commands (found in the tree, so the list cannot drift).
"""

import os
import re
import sys

COMMAND = re.compile(r'^if __name__ == "__main__":', re.MULTILINE)


def _is_command(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        return bool(COMMAND.search(f.read()))


def commands(package: str, package_dir: str) -> list[str]:
    """The dotted names of the package's modules that have a command line."""
    found = []
    for folder, _, files in os.walk(package_dir):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and _is_command(path):
                relative = os.path.relpath(path, package_dir)[:-3].replace(os.sep, ".")
                found.append(f"{package}.{relative}")
    return sorted(found)


def refuse_library_module(package: str, package_dir: str) -> None:
    """SystemExit(2) with one line on stderr when `python -m` runs a module of PACKAGE that is not a command."""
    argv = list(getattr(sys, "orig_argv", ()))
    if "-m" not in argv[:-1]:
        return
    target = argv[argv.index("-m") + 1]
    path = os.path.join(package_dir, *target.split(".")[1:]) + ".py"
    if not target.startswith(package + ".") or not os.path.isfile(path) or _is_command(path):
        return  # not ours, a package or a missing module (Python's own errors), or a command
    listed = ", ".join(commands(package, package_dir)) or "none"
    print(f"error: {target} is a library module, not a command (it has no command line); the commands under "
          f"{package}/ (python -m NAME): {listed}", file=sys.stderr)
    raise SystemExit(2)
