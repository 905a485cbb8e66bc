#!/usr/bin/env python
"""Run real projects' own test suites without ctxguard and with it, and compare.

ctxguard promises that with it on, every request, test client call, stream,
thread and exception behaves exactly as without it, and that it never reports
what did not happen. The widest check of that is other people's tests: Flask's
own suite and those of Flask-SQLAlchemy, Flask-Login and Flask-WTF, as they
ship them in their sdists (with their own pytest configuration, such as
``filterwarnings = error``), run against the *installed* package of the same
version, four times each:

* ``plain``: no ctxguard at all;
* ``install``: ``ctxguard.install()`` at session start (the process hooks);
* ``guard``: every Flask app made by the suite ends its ``__init__`` with
  ``ctxguard.CtxGuard(self)`` (the middleware and the policy, defaults);
* ``plugin``: ctxguard's own pytest plugin enabled, ``--ctxguard=warn``: its
  findings are warnings (``-W always::...CtxGuardWarning`` here, so a suite's
  ``filterwarnings = error`` does not turn them into errors and the outcomes
  stay comparable), recorded with their tests and listed for a person to judge.

The pytest plugin is registered by the package's ``pytest11`` entry point in
every run: in ``plain`` it must be registered, not enabled, install no hook,
and import nothing of ctxguard beyond what importing its module brings.

Real OpenTelemetry SDK providers are set globally in all four modes (see
``ctxguard_peer.py``, the pytest plugin that sets the mode and records).

The run fails (exit 1) when a test's outcome differs between ``plain`` and a
ctxguard mode, when ctxguard reports anything during collection, when the
pytest plugin is not registered, does anything in ``plain`` or fails itself,
and when the comparison itself cannot be trusted: a run that crashed or timed
out, a plain run with failures (the environment is wrong, not ctxguard), a
ctxguard mode in which ctxguard saw no context at all, or a suite that
imported its package from the sdist instead of the installed one (``--allow-plain-failures SUITE``
lets a released suite fail without ctxguard against a development Flask; each
of its tests must still have the same outcome with it). ``--sdist SUITE=PATH``
takes a suite's tests from a local archive (the snapshot of Flask's main
branch). Reports during the tests do not
fail the run, since some may be true: they are listed, grouped, for a person
to judge, and written in full to the JSON results.

The suites' test requirements come from the repository's ``peer`` extra
(``pip install -e ".[test,peer]"``, which ``nox -s peer`` does).

    nox -s peer
    nox -s peer -- --suite flask --mode guard -- -k test_testing
    python tests/peer/run.py --help
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PLUGIN = "ctxguard_peer"
MODES = ("plain", "install", "guard", "plugin")
#: ctxguard's pytest plugin, as its entry point names it, and its warning categories.
PYTEST_PLUGIN = "ctxguard.integrations.pytest_plugin"
PLUGIN_MODE_ARGS = (
    "--ctxguard=warn",
    "-W",
    f"always::{PYTEST_PLUGIN}.CtxGuardWarning",
    "-W",
    f"always::{PYTEST_PLUGIN}.CtxGuardPluginWarning",
)
#: Default home for downloads, extracted trees and results: not the repository's files.
BASE = REPO / ".nox" / "_peer_suites"
#: Exit codes of pytest that mean it ran the tests: 0 all passed, 1 some failed.
RAN = (0, 1)
#: Attributes that differ between two reports of the same thing.
VOLATILE = {"thread.id", "ctxguard.context.age", "ctxguard.suppressed"}
#: Variables that would change what the suites or ctxguard do, whatever the mode.
SCRUBBED_PREFIXES = ("CTXGUARD_", "FLASK_")
SCRUBBED = {
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
    "WERKZEUG_RUN_MAIN",
}


@dataclasses.dataclass(frozen=True)
class Suite:
    """A project whose sdist's tests are run: ``version`` None means the installed one."""

    name: str
    distribution: str
    module: str
    version: str | None

    def installed_version(self) -> str | None:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None


SUITES = {
    suite.name: suite
    for suite in (
        Suite("flask", "flask", "flask", None),
        Suite("flask-sqlalchemy", "flask-sqlalchemy", "flask_sqlalchemy", "3.1.1"),
        Suite("flask-login", "flask-login", "flask_login", "0.6.3"),
        Suite("flask-wtf", "flask-wtf", "flask_wtf", "1.3.0"),
    )
}


@dataclasses.dataclass
class Run:
    """One suite in one mode."""

    suite: Suite
    version: str
    mode: str
    tree: Path
    log: Path
    out: Path
    exit_code: int | None = None
    timed_out: bool = False
    seconds: float = 0.0
    record: dict[str, Any] | None = None


# -- preparing


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Run Flask's and three extensions' own test suites in four modes"
        " (plain, install, guard, plugin) and fail on any test whose outcome ctxguard changes"
        " or any ctxguard report during collection.",
        epilog="Arguments after a lone -- are passed to every pytest run"
        " (e.g. -- -k test_testing). Install the suites' requirements with"
        ' pip install -e ".[test,peer]", or use nox -s peer.',
    )
    parser.add_argument(
        "--suite",
        action="append",
        choices=list(SUITES),
        help="a suite to run (repeatable; default: all)",
    )
    parser.add_argument(
        "--mode",
        action="append",
        choices=MODES,
        help="a mode to run (repeatable; default: all). Without plain there is no baseline"
        " to compare with: only collection reports are checked",
    )
    parser.add_argument(
        "--sdist",
        action="append",
        default=[],
        metavar="SUITE=PATH",
        help="take this suite's tests from a local source archive (a development"
        " snapshot, as installed) instead of its sdist from PyPI (repeatable)",
    )
    parser.add_argument(
        "--allow-plain-failures",
        action="append",
        default=[],
        choices=list(SUITES),
        metavar="SUITE",
        help="this suite may have tests that fail without ctxguard (a released suite"
        " run against a development Flask): they are listed, not a failure, and must"
        " fail alike with ctxguard (repeatable)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="pytest runs at once (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds one pytest run may take (default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=BASE,
        help="where sdists are kept and extracted, and logs written (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the JSON results (default: CACHE_DIR/results.json)",
    )
    parser.add_argument(
        "--details",
        type=int,
        default=5,
        help="node ids shown per report group in the summary (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    args.suite = args.suite or list(SUITES)
    args.mode = [mode for mode in MODES if mode in (args.mode or MODES)]
    args.cache_dir = args.cache_dir.resolve()
    local = {}
    for item in args.sdist:
        name, sep, path = item.partition("=")
        if not sep or name not in SUITES or not Path(path).is_file():
            parser.error(f"--sdist {item}: expected SUITE=PATH, an archive of a known suite")
        local[name] = Path(path).resolve()
    args.sdist = local
    args.output = (args.output or args.cache_dir / "results.json").resolve()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args, pytest_args


def unmet_peer_requirements() -> list[str]:
    """Requirements of the ``peer`` extra this environment does not satisfy.

    Only a hint for a confusing failure (Flask's tests need pytest < 9.1, for
    one): checked when ``tomllib`` and ``packaging`` (a pytest dependency) exist.
    """
    try:
        import tomllib
        from packaging.requirements import Requirement
    except ImportError:
        return []
    try:
        with open(REPO / "pyproject.toml", "rb") as file:
            extras = tomllib.load(file)["project"]["optional-dependencies"]
        requirements = [Requirement(text) for text in extras.get("peer", [])]
    except (OSError, KeyError, ValueError) as exc:
        return [f"(could not read the peer extra: {exc})"]
    unmet = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{requirement} (not installed)")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            unmet.append(f"{requirement} (installed: {version})")
    return unmet


def fetch_sdist(suite: Suite, version: str, cache: Path) -> Path:
    """The suite's sdist from PyPI, downloaded once into ``cache``."""
    folder = cache / "sdists" / f"{suite.name}-{version}"
    found = _archives(folder)
    if len(found) != 1:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(f"peer: downloading the sdist of {suite.distribution}=={version}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(folder),
                f"{suite.distribution}=={version}",
            ],
            check=True,
        )
        found = _archives(folder)
        if len(found) != 1:
            raise SystemExit(f"peer: expected one sdist in {folder}, found {found}")
    return found[0]


def _archives(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith((".tar.gz", ".zip")))


def extract(archive: Path, into: Path) -> Path:
    """A fresh copy of the sdist's tree (each run gets its own: runs may be parallel)."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(into)
    else:
        with tarfile.open(archive) as tarred:
            if hasattr(tarfile, "data_filter"):
                tarred.extractall(into, filter="data")
            else:  # Python < 3.11.4: sdists from PyPI are trusted as pip trusts them
                tarred.extractall(into)
    tops = list(into.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        raise SystemExit(f"peer: {archive.name} does not hold a single top-level folder")
    return tops[0]


def child_environment() -> dict[str, str]:
    """This environment, with the plugin importable and nothing that picks a behaviour."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(SCRUBBED_PREFIXES) and key not in SCRUBBED
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    return env


# -- running


def run_pytest(run: Run, pytest_args: Sequence[str], timeout: float) -> Run:
    """The suite's own pytest run, from its tree, in one mode; the record is read back."""
    basetemp = run.tree.parent / f"tmp-{run.mode}"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        PLUGIN,
        f"--ctxguard-peer-mode={run.mode}",
        f"--ctxguard-peer-out={run.out}",
        f"--ctxguard-peer-module={run.suite.module}",
        f"--basetemp={basetemp}",
        *(PLUGIN_MODE_ARGS if run.mode == "plugin" else ()),
        "-q",
        "-rfE",
        "--color=no",
        *pytest_args,
    ]
    run.out.unlink(missing_ok=True)
    started = time.monotonic()
    with open(run.log, "w", encoding="utf-8") as log:
        log.write(f"$ cd {run.tree} && {' '.join(command)}\n\n")
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=run.tree,
            env=child_environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            run.exit_code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            os.killpg(process.pid, signal.SIGKILL)  # its own session: only what it started
            run.exit_code = process.wait()
    run.seconds = time.monotonic() - started
    if run.out.exists():
        with open(run.out, encoding="utf-8") as file:
            run.record = json.load(file)
    return run


def prepare(args: argparse.Namespace) -> list[Run]:
    runs = []
    for name in args.suite:
        suite = SUITES[name]
        installed = suite.installed_version()
        if installed is None:
            raise SystemExit(
                f"peer: {suite.distribution} is not installed: pip install -e '.[test,peer]'"
            )
        version = suite.version or installed
        if installed != version:
            raise SystemExit(
                f"peer: {suite.distribution} {installed} is installed, but its {version} tests"
                " are run against it: pip install -e '.[test,peer]'"
            )
        archive = args.sdist.get(name) or fetch_sdist(suite, version, args.cache_dir)
        folder = args.cache_dir / "work" / f"{suite.name}-{version}"
        for mode in args.mode:
            tree = extract(archive, folder / mode)
            runs.append(
                Run(suite, version, mode, tree, folder / f"{mode}.log", folder / f"{mode}.json")
            )
    return runs


def run_all(runs: list[Run], pytest_args: Sequence[str], args: argparse.Namespace) -> None:
    lock = threading.Lock()

    def one(run: Run) -> Run:
        run_pytest(run, pytest_args, args.timeout)
        with lock:
            state = "timed out" if run.timed_out else f"exit {run.exit_code}"
            print(
                f"peer: {run.suite.name} {run.version} {run.mode}: {state},"
                f" {run.seconds:.0f} s ({run.log})",
                flush=True,
            )
        return run

    # Each run is a process of its own in a tree of its own: they can run side by side.
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(one, run) for run in runs]:
            future.result()


# -- judging


def outcome_counts(record: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in record["outcomes"].values():
        outcome = entry.get("outcome") or "unknown"
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def differences(plain: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    """Tests whose outcome is not the same in both records (or that ran in only one)."""
    found = []
    for nodeid in sorted(set(plain["outcomes"]) | set(other["outcomes"])):
        before = plain["outcomes"].get(nodeid, {})
        after = other["outcomes"].get(nodeid, {})
        if before.get("outcome") != after.get("outcome"):
            found.append(
                {
                    "nodeid": nodeid,
                    "plain": before.get("outcome", "absent"),
                    "mode": after.get("outcome", "absent"),
                    "summary": after.get("summary") or before.get("summary") or "",
                    "longrepr": after.get("longrepr") or before.get("longrepr") or "",
                }
            )
    return found


def _shorten(path: Any, run: Run) -> Any:
    """A file path made readable: relative to the suite's tree or to site-packages."""
    if not isinstance(path, str):
        return path
    tree = str(run.tree) + os.sep
    if path.startswith(tree):
        return f"{run.suite.name}:{path[len(tree) :]}"
    marker = f"site-packages{os.sep}"
    if marker in path:
        return path[path.index(marker) + len(marker) :]
    repo = str(REPO) + os.sep
    return path[len(repo) :] if path.startswith(repo) else path


def report_key(report: dict[str, Any], run: Run) -> tuple[Any, ...]:
    """What makes two reports "the same": name and stable attributes."""
    attributes = []
    for key, value in sorted(report["attributes"].items()):
        if key in VOLATILE:
            continue
        if key == "thread.name" and isinstance(value, str):
            value = re.sub(r"\d+", "N", value)
        if key == "code.file.path":
            value = _shorten(value, run)
        attributes.append((key, tuple(value) if isinstance(value, list) else value))
    return (report["name"], tuple(attributes))


def group_reports(
    buckets: Iterable[tuple[str, dict[str, Any]]], kind: str, run: Run
) -> list[dict[str, Any]]:
    """Reports of one kind ("spans" or "counters") grouped by key, with their tests."""
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for bucket, reports in buckets:
        for report in reports.get(kind, []):
            key = report_key(report, run)
            group = groups.setdefault(
                key,
                {"name": key[0], "attributes": dict(key[1]), "count": 0, "tests": []},
            )
            group["count"] += report.get("value", 1)
            if bucket not in group["tests"]:
                group["tests"].append(bucket)
    return sorted(groups.values(), key=lambda g: (-g["count"], g["name"]))


def report_count(groups: dict[str, list[dict[str, Any]]]) -> int:
    """How many reports: the counters are exact (spans are rate limited), unless there are none."""
    counted = sum(group["count"] for group in groups["counters"])
    return counted or sum(group["count"] for group in groups["spans"])


def plugin_import_modules() -> list[str] | None:
    """ctxguard's modules that importing the pytest plugin's module alone brings (what
    pytest imports at start in every run once the package is installed), from a fresh
    interpreter of this environment; None if it cannot be imported."""
    code = (
        f"import json, sys, {PYTEST_PLUGIN};"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'ctxguard')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_environment()
    )
    return json.loads(done.stdout) if done.returncode == 0 else None


def group_findings(findings: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pytest plugin's findings grouped by category and text (paths in the text are
    relative to the suite's tree already), with their tests."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for finding in findings:
        key = (finding["category"], finding["message"])
        group = groups.setdefault(
            key, {"category": key[0], "message": key[1], "count": 0, "tests": []}
        )
        group["count"] += 1
        if finding["test"] not in group["tests"]:
            group["tests"].append(finding["test"])
    return sorted(groups.values(), key=lambda g: (-g["count"], g["category"], g["message"]))


def judge(
    runs: list[Run], allowed: Iterable[str] = (), plugin_modules: list[str] | None = None
) -> tuple[list[str], dict[str, Any], list[str]]:
    """The problems that fail the run, the per-suite results for the JSON file, and
    notes: the plain failures of the suites in ``allowed``. ``plugin_modules``: what
    importing the pytest plugin's module brings (``plugin_import_modules``)."""
    problems: list[str] = []
    notes: list[str] = []
    results: dict[str, Any] = {}
    for run in runs:
        label = f"{run.suite.name} {run.version} {run.mode}"
        suite = results.setdefault(
            run.suite.name, {"version": run.version, "modes": {}, "differences": {}}
        )
        entry: dict[str, Any] = {
            "exit_code": run.exit_code,
            "timed_out": run.timed_out,
            "seconds": round(run.seconds, 1),
            "log": str(run.log),
            "tree": str(run.tree),
        }
        suite["modes"][run.mode] = entry
        record = run.record
        if run.timed_out or record is None or run.exit_code not in RAN:
            why = "timed out" if run.timed_out else f"pytest exited {run.exit_code}"
            problems.append(f"{label}: {why} (a crash, usage error or no test run): see {run.log}")
            if record is None:
                continue
        assert record is not None
        entry["record"] = record
        entry["counts"] = outcome_counts(record)
        buckets = record["reports"]
        collection = [(b, r) for b, r in buckets.items() if b == "<collection>"]
        during = [(b, r) for b, r in buckets.items() if b != "<collection>"]
        entry["collection_reports"] = {
            kind: group_reports(collection, kind, run) for kind in ("spans", "counters")
        }
        entry["test_reports"] = {
            kind: group_reports(during, kind, run) for kind in ("spans", "counters")
        }
        in_collection = report_count(entry["collection_reports"])
        if in_collection:
            problems.append(f"{label}: {in_collection} ctxguard reports during collection")
        module_file = record["modules"].get(run.suite.module) or ""
        if not module_file or module_file.startswith(str(run.tree)):
            problems.append(
                f"{label}: {run.suite.module} was imported from {module_file or 'nowhere'},"
                " not from the installed package"
            )
        ctx = record["ctxguard"]
        plugin = ctx.get("pytest_plugin") or {}
        if not plugin.get("registered"):
            problems.append(
                f"{label}: ctxguard's pytest plugin was not registered (its pytest11 entry"
                " point is missing: reinstall the package, pip install -e .)"
            )
        expected_mode = "warn" if run.mode == "plugin" else None
        if plugin.get("registered") and plugin.get("mode") != expected_mode:
            problems.append(
                f"{label}: ctxguard's pytest plugin ran in mode {plugin.get('mode')},"
                f" expected {expected_mode}"
            )
        if run.mode == "plain":
            if ctx["hooks_installed_at_end"]:
                problems.append(f"{label}: ctxguard's hooks were installed in the plain mode")
            extra = sorted(set(ctx.get("modules", [])) - set(plugin_modules or []))
            if plugin_modules is None:
                problems.append(f"{label}: could not import {PYTEST_PLUGIN} on its own")
            elif extra:
                problems.append(
                    f"{label}: the plain mode imported ctxguard modules that importing the"
                    f" pytest plugin's module does not: {', '.join(extra)}"
                )
        if run.mode == "plugin" and plugin.get("registered"):
            summary = plugin.get("summary") or {}
            if not summary.get("active") or summary.get("judged", 0) < record["tests_run"]:
                problems.append(
                    f"{label}: the pytest plugin judged {summary.get('judged')} of"
                    f" {record['tests_run']} tests (active: {summary.get('active')})"
                )
        findings = record.get("findings", [])
        entry["findings"] = group_findings(findings)
        faults = [f for f in findings if f["category"] == "CtxGuardPluginWarning"]
        if faults:
            problems.append(f"{label}: the pytest plugin failed: {faults[0]['message'][:500]}")
        if findings and run.mode != "plugin":
            problems.append(f"{label}: {len(findings)} pytest plugin findings, but not enabled")
        if run.mode != "plain":
            pushes = sum(p["value"] for p in ctx["observed"].get("ctxguard.context.pushes", []))
            if not pushes or not ctx["hooks_installed_at_end"]:
                problems.append(
                    f"{label}: ctxguard saw {pushes} context pushes (hooks installed at the end:"
                    f" {ctx['hooks_installed_at_end']}): the mode tested nothing"
                )
        if run.mode == "guard" and not ctx["apps_guarded"]:
            problems.append(f"{label}: no app was guarded")
        if run.mode == "plain":
            broken = sorted(
                nodeid
                for nodeid, outcome in record["outcomes"].items()
                if outcome.get("outcome") in ("failed", "error")
            )
            if broken and run.suite.name in allowed:
                notes.append(
                    f"{label}: {len(broken)} tests fail without ctxguard (allowed; compared"
                    f" with the ctxguard modes like any other): {', '.join(broken)}"
                )
            elif broken:
                problems.append(
                    f"{label}: {len(broken)} tests fail without ctxguard: the environment is"
                    f" wrong, not ctxguard (e.g. {broken[0]}); see {run.log}"
                )
    by_key = {(run.suite.name, run.mode): run for run in runs}
    for run in runs:
        plain = by_key.get((run.suite.name, "plain"))
        if run.mode == "plain" or plain is None or plain.record is None or run.record is None:
            continue
        found = differences(plain.record, run.record)
        results[run.suite.name]["differences"][run.mode] = found
        if found:
            problems.append(
                f"{run.suite.name} {run.version} {run.mode}: {len(found)} tests differ from plain"
            )
    return problems, results, notes


# -- telling


def _attribute_text(attributes: dict[str, Any]) -> str:
    shown = []
    location = ""
    if "code.file.path" in attributes:
        location = (
            f" at {attributes.get('code.function.name')}"
            f" ({attributes['code.file.path']}:{attributes.get('code.line.number')})"
        )
    for key, value in attributes.items():
        if key.startswith("code.") or key in ("ctxguard.hint", "exception.stacktrace"):
            continue
        shown.append(f"{key.removeprefix('ctxguard.')}={value}")
    return ", ".join(shown) + location


def _print_groups(title: str, groups: list[dict[str, Any]], details: int) -> None:
    if not groups:
        return
    print(f"    {title}:")
    for group in groups:
        print(
            f"      {group['count']:>5} x {group['name']}: {_attribute_text(group['attributes'])}"
        )
        hint = group["attributes"].get("ctxguard.hint")
        if hint:
            print(textwrap.indent(textwrap.fill(f"hint: {hint}", 100), " " * 16))
        tests = group["tests"]
        shown = ", ".join(tests[:details]) + (
            f", ... ({len(tests)} in all)" if len(tests) > details else ""
        )
        print(textwrap.indent(textwrap.fill(f"in: {shown}", 100), " " * 16))


def summarize(runs: list[Run], results: dict[str, Any], details: int) -> None:
    """The table of outcomes, then per run what differs and what ctxguard reported."""
    columns = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    header = f"{'suite':<24}{'mode':<9}" + "".join(f"{c:>8}" for c in columns)
    header += f"{'differ':>8}{'coll.rep':>10}{'test.rep':>10}{'finds':>7}{'secs':>7}"
    print("\n" + header)
    print("-" * len(header))
    for run in runs:
        entry = results[run.suite.name]["modes"][run.mode]
        label = f"{run.suite.name} {run.version}"
        if "counts" not in entry:
            print(f"{label:<24}{run.mode:<9}  (no results: exit {run.exit_code})")
            continue
        counts = entry["counts"]
        differ = results[run.suite.name]["differences"].get(run.mode)
        collected = report_count(entry["collection_reports"])
        during = report_count(entry["test_reports"])
        line = f"{label:<24}{run.mode:<9}" + "".join(f"{counts.get(c, 0):>8}" for c in columns)
        line += f"{'-' if differ is None else len(differ):>8}{collected:>10}{during:>10}"
        finds = sum(group["count"] for group in entry.get("findings", []))
        line += f"{finds if run.mode == 'plugin' else '-':>7}{run.seconds:>7.0f}"
        print(line)
    print("(coll.rep / test.rep: ctxguard counter increments during collection / during tests;")
    print(" finds: findings of ctxguard's pytest plugin, --ctxguard=warn, in the plugin mode)")
    sources = {
        run.record["modules"].get("ctxguard")
        for run in runs
        if run.record is not None and run.mode != "plain"
    }
    for source in sorted(filter(None, sources)):
        print(f"(ctxguard imported from {source})")

    for run in runs:
        entry = results[run.suite.name]["modes"][run.mode]
        differ = results[run.suite.name]["differences"].get(run.mode) or []
        if "counts" not in entry:
            continue
        reports = entry["collection_reports"], entry["test_reports"]
        findings = entry.get("findings", [])
        if not differ and not findings and not any(any(r.values()) for r in reports):
            continue
        print(f"\n== {run.suite.name} {run.version} {run.mode}")
        if differ:
            print("    tests that differ from plain:")
            for found in differ:
                print(f"      {found['nodeid']}: {found['plain']} -> {found['mode']}")
                if found["summary"]:
                    print(f"          {found['summary'][:300]}")
        _print_groups("spans during collection", entry["collection_reports"]["spans"], details)
        _print_groups(
            "counters during collection", entry["collection_reports"]["counters"], details
        )
        _print_groups("spans during tests", entry["test_reports"]["spans"], details)
        _print_groups("counters during tests", entry["test_reports"]["counters"], details)
        _print_findings(findings, details)


def _print_findings(findings: list[dict[str, Any]], details: int) -> None:
    if not findings:
        return
    print("    findings of ctxguard's pytest plugin (--ctxguard=warn):")
    for group in findings:
        lines = group["message"].removeprefix("ctxguard: ").splitlines()
        print(f"      {group['count']:>5} x {group['category']}: {lines[0]}")
        for more in lines[1:]:
            print(textwrap.indent(textwrap.fill(more.strip(), 100), " " * 16))
        tests = group["tests"]
        shown = ", ".join(tests[:details]) + (
            f", ... ({len(tests)} in all)" if len(tests) > details else ""
        )
        print(textwrap.indent(textwrap.fill(f"in: {shown}", 100), " " * 16))


def main(argv: Sequence[str] | None = None) -> int:
    args, pytest_args = parse_args(sys.argv[1:] if argv is None else argv)
    unmet = unmet_peer_requirements()
    for requirement in unmet:
        print(f"peer: warning: the peer extra wants {requirement}", file=sys.stderr)
    runs = prepare(args)
    started = time.monotonic()
    run_all(runs, pytest_args, args)
    problems, results, notes = judge(runs, args.allow_plain_failures, plugin_import_modules())
    summarize(runs, results, args.details)
    for note in notes:
        print(f"\npeer: {note}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(
            {
                "ok": not problems,
                "problems": problems,
                "allowed_plain_failures": notes,
                "unmet_peer_requirements": unmet,
                "argv": sys.argv,
                "pytest_args": pytest_args,
                "python": sys.version.split()[0],
                "versions": {
                    name: _version(name)
                    for name in (
                        "flask-ctxguard",
                        "flask",
                        "werkzeug",
                        "pytest",
                        "opentelemetry-sdk",
                    )
                },
                "seconds": round(time.monotonic() - started, 1),
                "suites": results,
            },
            file,
            indent=1,
        )
    print(f"\npeer: full results in {args.output}")
    if problems:
        print("\npeer: FAILED")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    if "plain" not in args.mode:
        print("peer: no plain run, so no outcome was compared; nothing reported during collection")
    else:
        print("peer: ctxguard changed no outcome and reported nothing during collection")
    return 0


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
