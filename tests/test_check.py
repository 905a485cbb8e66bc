"""``ctxguard check``: a pre-deploy step that loads the app as ``flask --app`` does and
reports, with file:line, what it does wrong before serving a request."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def check(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "shop.py").write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, "-m", "ctxguard.cli", "check", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def line_of(tmp_path: Path, marker: str) -> int:
    lines = (tmp_path / "shop.py").read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if marker in text)


CLEAN = """
from flask import Flask

def create_app():
    app = Flask(__name__)

    @app.route("/")
    def index():
        return "hello"

    return app

app = create_app()
"""


@pytest.mark.parametrize("target", ["shop", "shop:app", "shop:create_app()", "shop.py"])
def test_a_clean_app_passes(tmp_path, target):
    """An app that pushes nothing at import and is fit for production: exit status 0, in
    every form flask --app takes."""
    result = check(tmp_path, CLEAN, target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 finding(s)" in result.stdout


def test_a_context_pushed_at_import_and_left_open_is_found_at_its_line(tmp_path):
    """Seed 001's module-level push: found with its file and line, exit status 1."""
    source = CLEAN + "app.app_context().push()  # module-level push\n"
    result = check(tmp_path, source, "shop:app")
    assert result.returncode == 1
    line = line_of(tmp_path, "# module-level push")
    (finding,) = result.stdout.splitlines()[:-1]
    assert finding.startswith(f"{tmp_path / 'shop.py'}:{line}: an application context")


def test_a_push_inside_the_factory_is_found_too(tmp_path):
    """A factory that pushes and forgets (an extension initialised in an app context)."""
    source = CLEAN.replace(
        "    return app\n", "    app.app_context().push()  # factory push\n    return app\n"
    ).replace("app = create_app()\n", "")
    result = check(tmp_path, source, "shop:create_app()", "--format", "json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    (finding,) = report["findings"]
    assert finding["kind"] == "open_context"
    assert finding["line"] == line_of(tmp_path, "# factory push")
    assert finding["function"] == "create_app"


def test_a_proxy_touched_at_import_is_found_at_its_line(tmp_path):
    """current_app at module level fails the import: reported where it is touched."""
    source = CLEAN + "from flask import current_app\nNAME = current_app.name  # at import\n"
    result = check(tmp_path, source, "shop:app", "--format", "json")
    assert result.returncode == 1
    (finding,) = json.loads(result.stdout)["findings"]
    assert finding["kind"] == "proxy_error"
    assert finding["line"] == line_of(tmp_path, "# at import")
    assert "Working outside of application context" in finding["message"]


def test_production_policy_findings_only_for_production(tmp_path):
    """Debug mode on is a finding for a production deploy, not for development."""
    source = CLEAN + "app.debug = True\n"
    production = check(tmp_path, source, "shop:app", "--format", "json")
    assert production.returncode == 1
    (finding,) = json.loads(production.stdout)["findings"]
    assert finding["kind"] == "policy"
    assert finding["rule"] == "debug_mode"
    development = check(tmp_path, source, "shop:app", "--environment", "development")
    assert development.returncode == 0, development.stdout


def test_an_app_that_cannot_be_loaded_exits_2_with_the_reason(tmp_path):
    """No such app, or an import that fails for another reason: exit status 2, the
    reason on stderr (not a finding)."""
    missing = check(tmp_path, CLEAN, "shop:nothing")
    assert missing.returncode == 2
    assert "nothing" in missing.stderr
    broken = check(tmp_path, CLEAN + "raise ValueError('no database url')\n", "shop:app")
    assert broken.returncode == 2
    assert "ValueError: no database url" in broken.stderr
