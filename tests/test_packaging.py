"""What `pip install flask-ctxguard` installs: every module of the source tree."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_source_tree_is_in_the_distribution():
    """A subpackage missing from pyproject's list is missing from the wheel: users of a
    non-editable install would get an ImportError for `ctxguard check`, the gunicorn
    hooks or the instrumentor."""
    if tomllib is None:
        pytest.skip("tomllib is Python 3.11+; the other Pythons build from the same file")
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "ctxguard").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    assert set(listed["packages"]) == on_disk
    assert "py.typed" in listed["package-data"]["ctxguard"]
