"""The test matrix: every supported Python against every supported Flask.

    pip install -e ".[dev]"     # brings nox
    nox                         # lint + all 12 test sessions
    nox -s tests                # the 12 test sessions
    nox -s "tests-3.10(flask='2.3')"   # one of them
    nox -s lint

The interpreters come from pyenv. Only one of them is pyenv's global version,
so the others' ``pythonX.Y`` shims refuse to run; the newest installed patch
release of each series is put on ``PATH`` here so nox finds it without
``pyenv global`` or ``pyenv shell``.
"""

from __future__ import annotations

import glob
import os

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# Each Flask series is tested with the Werkzeug series released with it.
WERKZEUG_FOR_FLASK = {"2.3": "2.3", "3.0": "3.0", "3.1": "3.1"}

SHOW_VERSIONS = (
    "import sys, importlib.metadata as m; print('python', sys.version.split()[0],"
    " 'flask', m.version('flask'), 'werkzeug', m.version('werkzeug'))"
)

nox.options.sessions = ["lint", "tests"]
nox.options.error_on_missing_interpreters = True


def _patch_key(path: str) -> tuple[int, ...]:
    version = os.path.basename(os.path.dirname(os.path.dirname(path)))
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def _pyenv_bin_dirs() -> list[str]:
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    dirs = []
    for series in PYTHONS:
        found = glob.glob(os.path.join(root, "versions", f"{series}.*", "bin", f"python{series}"))
        found = [path for path in found if _patch_key(path)[-1] >= 0]  # no "3.13.0t" and such
        if found:
            dirs.append(os.path.dirname(max(found, key=_patch_key)))
    return dirs


os.environ["PATH"] = os.pathsep.join([*_pyenv_bin_dirs(), os.environ.get("PATH", "")])


@nox.session(python=PYTHONS)
@nox.parametrize("flask", list(WERKZEUG_FOR_FLASK))
def tests(session: nox.Session, flask: str) -> None:
    """The whole suite on one Python and one Flask series."""
    werkzeug = WERKZEUG_FOR_FLASK[flask]
    # One resolve: the test extra (so new test dependencies come along by
    # themselves) with Flask and Werkzeug held to the series under test.
    session.install("-e", ".[test]", f"flask=={flask}.*", f"werkzeug=={werkzeug}.*")
    session.run("python", "-c", SHOW_VERSIONS)
    # pytest exits 5 when it collected no test: nox treats that as a failure.
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff, at the version pinned in the ``lint`` extra."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def peer(session: nox.Session) -> None:
    """Flask's and three extensions' own test suites, without ctxguard and with it.

    ctxguard promises that every request, test client call, stream, thread and
    exception behaves exactly as without it: real projects' suites are the
    widest check of that. ``tests/peer/run.py --help`` tells the options; pass
    them after ``--`` (``nox -s peer -- --suite flask --mode guard``).
    """
    # The peer extra pins the extensions to the sdists whose tests are run and
    # brings what those tests need.
    session.install("-e", ".[test,peer]")
    session.run("python", "-c", SHOW_VERSIONS)
    session.run("python", "tests/peer/run.py", *session.posargs)
