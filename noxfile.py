"""The test matrix: every supported Python against every supported Flask.

    pip install -e ".[dev]"     # brings nox
    nox                         # lint, the 12 test sessions, flask-main on each Python, docs
    nox -s tests                # the 12 test sessions
    nox -s "tests-3.10(flask='2.3')"   # one of them
    nox -s lint
    nox -s flask-main           # Flask's next release, from the snapshot beside the repo
    nox -s docs                 # the documentation site, in docs/_build/html

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
# Flask's next release (3.2), not on PyPI yet: a source snapshot of its main branch
# kept beside the repository, with the Werkzeug it needs. The day 3.2 is released it
# becomes ``"3.2": "3.1"`` above and the flask-main sessions go: ctxguard tells the
# context models apart by what Flask has, never by its version.
FLASK_MAIN_GLOB = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "shared", "vendor", "flask-main-*.tar.gz"
)
WERKZEUG_FOR_FLASK_MAIN = "werkzeug>=3.1"

SHOW_VERSIONS = (
    "import sys, importlib.metadata as m; print('python', sys.version.split()[0],"
    " 'flask', m.version('flask'), 'werkzeug', m.version('werkzeug'))"
)

nox.options.sessions = ["lint", "tests", "flask-main", "docs"]
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


def _flask_main(session: nox.Session) -> str:
    """The snapshot of Flask's main branch (the newest, if several are there)."""
    found = sorted(glob.glob(FLASK_MAIN_GLOB), key=os.path.getmtime)
    if not found:
        session.error(f"no snapshot of Flask's main branch at {FLASK_MAIN_GLOB}")
    return os.path.normpath(found[-1])


@nox.session(name="flask-main", python=PYTHONS)
def flask_main(session: nox.Session) -> None:
    """The whole suite on the snapshot of Flask's main branch (Flask 3.2 in development)."""
    session.install("-e", ".[test]", _flask_main(session), WERKZEUG_FOR_FLASK_MAIN)
    session.run("python", "-c", SHOW_VERSIONS)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(name="peer-flask-main", python="3.11")
def peer_flask_main(session: nox.Session) -> None:
    """The peer suites on the snapshot of Flask's main branch: Flask's own tests from the
    snapshot, the extensions' from their sdists, without ctxguard and with it."""
    snapshot = _flask_main(session)
    session.install("-e", ".[test,peer]")
    # After the extra: the snapshot replaces the Flask it brought.
    session.install(snapshot, WERKZEUG_FOR_FLASK_MAIN)
    session.run("python", "-c", SHOW_VERSIONS)
    # The extensions' released suites predate Flask 3.2 and fail on it without ctxguard:
    # Flask-Login 0.6.3's expect redirect()'s 302 (3.2 answers 303), Flask-WTF 1.3.0's
    # test_form_csrf. Those tests are still compared: they must fail alike with ctxguard.
    session.run(
        "python",
        "tests/peer/run.py",
        f"--sdist=flask={snapshot}",
        "--allow-plain-failures=flask-login",
        "--allow-plain-failures=flask-wtf",
        *session.posargs,
    )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff, at the version pinned in the ``lint`` extra."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The documentation site (Sphinx, MyST, furo) in docs/_build/html; a warning fails it.

    ``-E`` reads every page again: a page whose warning failed the previous build would
    otherwise be skipped as unchanged, and the build would pass.
    """
    session.install("-e", ".[docs]")
    session.run(
        "sphinx-build",
        "-W",
        "--keep-going",
        "-E",
        "-b",
        "html",
        "docs",
        "docs/_build/html",
        *session.posargs,
    )


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


# Functions mutmut must leave alone (``mutants`` session): under mutmut every mutated function
# runs two frames below its caller, and these read their caller's frame at a fixed depth or
# compare their own code object. docs/mutation-testing.md says why, one by one.
NOT_MUTATED = {
    "ctxguard/proxies.py": ["_outside", "_proxy_getattr"],
    "ctxguard/telemetry.py": ["count", "span", "log_event", "fault"],
}


def _mutmut_run(not_mutated: dict[str, list[str]], mutant_names: list[str]) -> None:
    """``mutmut run``, adapted to ctxguard. Runs in the session's virtualenv, not under nox.

    mutmut 3 calls each mutated function through a trampoline that picks the original or the
    mutant under test: two more frames (``_trampoline_wrapper`` and ``trampoline``, in
    mutmut's file) between the function and its caller, and one code object shared by every
    wrapper. ctxguard reads frames (the user's line, "is ctxguard itself emitting?", the
    test client on the stack), so without these adaptations the unmutated build would
    already fail the suite:

    1. The trampoline's frames are labelled as frames of the function they call (its file,
       name and first line): ctxguard counts them as its own frames, as it does the real
       function's (library code, left out of the tracebacks the differential tests
       compare), and the wrappers of its emitting functions are told apart from the others.
    2. The functions in ``not_mutated`` get no trampoline: they read their caller's frame at
       a fixed depth or compare their own code object.
    3. mutmut's run is called directly rather than through its click command: the tests
       would inherit its click context, and ctxguard reports a click context as a ``cli``
       worker.
    """
    import ast
    import sys
    from pathlib import Path
    from typing import Any

    import mutmut.__main__ as mutmut_main
    import mutmut.mutation.file_mutation as file_mutation
    import mutmut.mutation.trampoline as trampoline

    get_ignored_lines = file_mutation.get_ignored_lines

    def ignored_lines(filename: str, source: str, *args: Any, **kwargs: Any) -> Any:
        ignored = get_ignored_lines(filename, source, *args, **kwargs)
        names = set(not_mutated.get(Path(filename).as_posix(), ()))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in names:
                # As if the function were marked ``# pragma: no mutate block``.
                ignored.ignore_node_lines.update(range(node.lineno, (node.end_lineno or 0) + 1))
        return ignored

    file_mutation.get_ignored_lines = ignored_lines

    wrap_in_trampoline = trampoline.wrap_in_trampoline

    def wrap(mutants: Any, is_classmethod: bool = False) -> Any:
        decorate = wrap_in_trampoline(mutants, is_classmethod)

        def decorated(func: Any) -> Any:
            wrapper = decorate(func)
            code = func.__code__
            own = {
                "co_filename": code.co_filename,
                "co_name": code.co_name,
                "co_qualname": code.co_qualname,
                "co_firstlineno": code.co_firstlineno,
            }
            for cell in wrapper.__closure__ or ():
                inner = cell.cell_contents
                if getattr(inner, "__name__", None) == "trampoline":
                    inner.__code__ = inner.__code__.replace(**own)
            wrapper.__code__ = wrapper.__code__.replace(**own)
            return wrapper

        return decorated

    trampoline.wrap_in_trampoline = wrap
    sys.argv[0] = "mutmut"
    mutmut_main._run(mutant_names, None)


@nox.session(python="3.11")
def mutants(session: nox.Session) -> None:
    """Mutation testing: mutmut changes ctxguard/ one mutant at a time; the suite must notice.

    ``nox -s mutants`` starts afresh (``mutants/`` is removed: ctxguard/ or tests/ may have
    changed) and prints the summary; it fails below a kill ratio of 90%. On the previous
    run's results instead: ``-- resume`` tests only the mutants without a result (an
    interrupted run, functions changed since), and mutant names or globs after ``--``
    re-test those (``nox -s mutants -- "ctxguard.middleware.*"``). What is run, what is
    left out and why, and the survivors: docs/mutation-testing.md.
    """
    import inspect
    import json
    import shutil
    import time

    started = time.monotonic()
    session.install("-e", ".[test,mutants]")
    session.run("python", "-c", SHOW_VERSIONS)
    if not session.posargs:
        shutil.rmtree("mutants", ignore_errors=True)
    # _mutmut_run's source, called with NOT_MUTATED and the mutant names.
    program = os.path.join(session.create_tmp(), "mutmut_run.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(inspect.getsource(_mutmut_run))
        f.write("\n\nimport json, sys\n\n_mutmut_run(json.loads(sys.argv[1]), sys.argv[2:])\n")
    names = [] if session.posargs == ["resume"] else session.posargs
    session.run("python", program, json.dumps(NOT_MUTATED), *names)
    session.run("mutmut", "results")
    session.run("mutmut", "export-cicd-stats", silent=True)
    with open("mutants/mutmut-cicd-stats.json", encoding="utf-8") as f:
        stats = json.load(f)
    total = stats["total"]
    killed = stats["killed"]
    ratio = killed / total if total else 0.0
    session.log(
        f"mutants: {total}; killed {killed}, survived {stats['survived']}, timeout"
        f" {stats['timeout']}, suspicious {stats['suspicious']}, no tests {stats['no_tests']},"
        f" segfault {stats['segfault']}; kill ratio {killed}/{total} = {ratio:.1%};"
        f" {(time.monotonic() - started) / 60:.0f} min"
    )
    if ratio < 0.9:
        session.error(f"kill ratio {ratio:.1%} is below 90%")
