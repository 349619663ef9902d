"""The data files the repository ships (data/files/) are the ones its README describes: every file listed with
its size and SHA-256, nothing unlisted, and nothing in the repository reads outside the clone."""

import hashlib
import os
import re
import subprocess

FILES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "files")
REPO = os.path.dirname(os.path.dirname(FILES))


def _table() -> dict[str, tuple[int, str]]:
    """`file -> (bytes, sha256)` from the README's rows `| `file` | ... | bytes | `sha256` |`."""
    with open(os.path.join(FILES, "README.md")) as f:
        rows = re.findall(r"^\| `([^`]+)` \|.*\| (\d+) \| `([0-9a-f]{64})` \|$", f.read(), flags=re.M)
    return {name: (int(size), digest) for name, size, digest in rows}


def test_every_shipped_file_matches_its_readme_row_and_none_is_unlisted():
    table = _table()
    on_disk = {os.path.relpath(os.path.join(d, f), FILES) for d, _, fs in os.walk(FILES) for f in fs} - {"README.md"}
    assert on_disk == set(table), f"unlisted: {on_disk - set(table)}, missing: {set(table) - on_disk}"
    for name, (size, digest) in table.items():
        with open(os.path.join(FILES, name), "rb") as f:
            content = f.read()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (size, digest), name


def test_no_tracked_file_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (an sdist): nothing to check against
        return
    outside = re.compile("|".join(map(re.escape, ["../" + "shared", "CONTRACTS" + ".md", "CONTRACTS" + " §"])))
    offenders = []
    for name in tracked:
        path = os.path.join(REPO, name)
        if name.startswith("data/files/") or not os.path.isfile(path):
            continue
        with open(path, errors="ignore") as f:
            if outside.search(f.read()):
                offenders.append(name)
    assert not offenders, f"files that refer outside the clone: {offenders}"
