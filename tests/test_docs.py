"""The documentation site's promises that `mkdocs build --strict` cannot see: every module has its API entry,
every page is in the nav, and the README stays the short front door."""

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("models", "experiments", "kernels_pallas", "data")


def test_every_module_of_every_package_has_an_api_entry_and_no_entry_is_stale():
    for package in PACKAGES:
        modules = {p[len(REPO) + 1:-3].replace(os.sep, ".").removesuffix(".__init__")
                   for p in glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True)} - {package}
        with open(os.path.join(REPO, "docs", "api", f"{package}.md")) as f:
            entries = set(re.findall(r"^::: (\S+)$", f.read(), flags=re.M)) - {package}
        assert entries == modules, f"{package}: undocumented {modules - entries}, stale {entries - modules}"


def test_every_page_is_in_the_nav():
    with open(os.path.join(REPO, "mkdocs.yml")) as f:
        nav = set(re.findall(r": (\S+\.md)$", f.read(), flags=re.M))
    pages = {os.path.relpath(p, os.path.join(REPO, "docs"))
             for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)}
    assert pages == nav, f"not in the nav: {pages - nav}; in the nav but missing: {nav - pages}"


def test_the_readme_is_at_most_250_lines_and_its_links_resolve():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert os.path.exists(os.path.join(REPO, target)), target
