"""The libraries whose internals sftune relies on are bounded above in ``pyproject.toml``, and the
installed set is one the bounds admit (a newer release installed on purpose, as the README's
"Newer releases" shows, is reported as a skip naming it, not as a failure)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
BOUNDED = ("torch", "transformers", "peft", "accelerate", "datasets")


def _requirements() -> dict:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def test_relied_on_libraries_have_upper_bounds():
    reqs = _requirements()
    for name in BOUNDED:
        assert any(s.operator in ("<", "<=", "~=", "==") for s in reqs[name].specifier), (name, str(reqs[name]))


def test_installed_versions_are_within_the_tested_bounds():
    reqs = _requirements()
    outside = []
    for name in BOUNDED:
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if not reqs[name].specifier.contains(installed, prereleases=True):
            outside.append(f"{name} {installed} (pyproject: {reqs[name].specifier})")
    if outside:
        pytest.skip("installed past the tested bounds: " + ", ".join(outside) + "; see the README's Newer releases")
