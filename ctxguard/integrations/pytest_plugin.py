"""pytest plugin: a test fails when it leaves a Flask context open (docs/pytest.md).

Registered by the ``pytest11`` entry point ``ctxguard`` (``-p no:ctxguard``
unloads it) and inert unless enabled with ``--ctxguard`` (fail),
``--ctxguard=warn`` or the ini option ``ctxguard``. Disabled, it adds an
option, an ini key, a marker description and the ``ctxguard_events`` fixture,
and nothing else: no hook runs for any test, and this module imports only the
standard library and pytest (ctxguard's own modules are imported when the
plugin is enabled, or the fixture used).

Enabled, ctxguard's process hooks are installed at configure, and each test
is judged after its own teardown, on the thread that ran it:

- a context it (or a function-scoped fixture) pushed and left open;
- an outside-context error on another thread (a thread or an executor task
  the test started) that did not reach the test, a leak ctxguard reported
  (a thread or task that ended with a context pushed), and a production
  policy violation reported by a guarded app;
- an unguarded app made during the test that ctxguard would take for a
  production app, checked against the production policy (always a warning).

Contexts pushed while a fixture of broader scope was set up are that
fixture's; one still open when the fixture is torn down is reported then.
Findings fail the test (``fail``) or are warnings (``warn``:
:class:`CtxGuardWarning` subclasses, which ``-W error::...`` turns back into
errors). The plugin's own faults never fail a test: they are collected and
shown as one :class:`CtxGuardPluginWarning` at the end of the session.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # never at run time: importing ctxguard is what "inert" avoids
    from ctxguard.events import Event

__all__ = [
    "ContextErrorWarning",
    "ContextLeakWarning",
    "CtxGuardPluginWarning",
    "CtxGuardWarning",
    "PolicyViolationWarning",
]

#: Values of ``--ctxguard`` and of the marker.
MODES = ("fail", "warn", "off")
#: Ini values besides the modes, as pytest reads a boolean.
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "0", "")

# The telemetry names the plugin reads (ctxguard.telemetry, copied so that this
# module needs nothing of ctxguard until it is enabled; a test checks they agree).
SPAN_CONTEXT_ERROR = "ctxguard.context_error"
SPAN_CONTEXT_LEAK = "ctxguard.context_leak"
SPAN_POLICY_VIOLATION = "ctxguard.policy_violation"
_PROXY = "ctxguard.proxy"
_CONTEXT_KIND = "ctxguard.context.kind"
_LEAK_SITE = "ctxguard.leak.site"
_CONTEXT_AGE = "ctxguard.context.age"
_HINT = "ctxguard.hint"
_THREAD_NAME = "thread.name"
_CODE_FUNCTION = "code.function.name"
_CODE_FILE = "code.file.path"
_CODE_LINE = "code.line.number"
_HTTP_ROUTE = "http.route"
_HTTP_METHOD = "http.request.method"

#: Scopes whose fixtures outlive a test (pytest's ``Scope`` values).
_BROADER = ("class", "module", "package", "session")


class CtxGuardWarning(pytest.PytestWarning):
    """A ctxguard finding reported as a warning (``--ctxguard=warn``)."""


class ContextLeakWarning(CtxGuardWarning):
    """A Flask context left open: by the test, by a fixture, by a thread or a task."""


class ContextErrorWarning(CtxGuardWarning):
    """A Flask proxy used outside its context in a thread or task, the error swallowed there."""


class PolicyViolationWarning(CtxGuardWarning):
    """A production policy violation reported by an app guarded with ctxguard."""


class CtxGuardPluginWarning(pytest.PytestWarning):
    """The plugin itself failed; the checks it could not make were skipped."""


# --------------------------------------------------------------------------
# Options: the only hooks that run when the plugin is not enabled.


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ctxguard", "Flask context checks (ctxguard)")
    group.addoption(
        "--ctxguard",
        action="store",
        nargs="?",
        const="fail",
        default=None,
        choices=MODES,
        metavar="MODE",
        dest="ctxguard",
        help="fail a test that leaves a Flask context open or whose threads use one outside"
        " its context (--ctxguard or --ctxguard=fail); --ctxguard=warn: warnings instead;"
        " --ctxguard=off: not at all. Overrides the ini option ctxguard.",
    )
    parser.addini(
        "ctxguard",
        type="string",
        default="",
        help="ctxguard's checks: fail (or true), warn, or off (or false, the default)",
    )


_GUARD = pytest.StashKey["Guard"]()
_EVENTS = pytest.StashKey["list[Event]"]()


def resolve(config: pytest.Config) -> tuple[str, str]:
    """The mode and where it came from: the command line, else the ini file, else off.

    A bad ini value is a usage error naming the file and the allowed values
    (argparse checks the command line's).
    """
    option = config.getoption("ctxguard", None)
    if option is not None:
        return option, f"--ctxguard={option}"
    raw = config.getini("ctxguard")
    text = str(raw).strip().lower()
    where = f"ctxguard = {str(raw).strip()} in {config.inipath}" if config.inipath else "ini"
    if text in ("fail", "warn", "off"):
        return text, where
    if text in _TRUE:
        return "fail", where
    if text in _FALSE:
        return "off", where
    raise pytest.UsageError(
        f"ctxguard: {str(raw).strip()!r} is not a value of the ini option ctxguard"
        f" (in {config.inipath or 'the ini file'}): use fail (or true), warn, or off"
        " (or false)"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ctxguard(mode): ctxguard's checks for this test: 'fail', 'warn' or 'off'"
        " (only when ctxguard is enabled with --ctxguard or the ini option ctxguard)",
    )
    mode, source = resolve(config)
    if mode == "off":
        return
    guard = Guard(config, mode, source)
    config.stash[_GUARD] = guard
    guard.start()
    config.pluginmanager.register(guard, "ctxguard-guard")


def mode(config: pytest.Config) -> str | None:
    """The mode the plugin runs in for this session (``fail``, ``warn``), None when off."""
    guard = config.stash.get(_GUARD, None)
    return guard.mode if guard is not None else None


def summary(config: pytest.Config) -> dict[str, Any] | None:
    """What the plugin did this session, None when off: ``mode``, ``active`` (its hooks are
    in), ``tests`` (tests seen), ``judged`` (tests whose contexts were checked after their
    teardown), ``findings`` and ``faults`` (its own failures)."""
    guard = config.stash.get(_GUARD, None)
    if guard is None:
        return None
    return {
        "mode": guard.mode,
        "active": guard.active,
        "tests": guard.tests,
        "judged": guard.judged,
        "findings": guard.findings,
        "faults": guard.faults,
    }


# --------------------------------------------------------------------------
# The fixture: available whether or not the plugin is enabled.


@pytest.fixture
def ctxguard_events(request: pytest.FixtureRequest) -> Iterator[list[Event]]:
    """Every ctxguard event (``ctxguard.events.Event``) reported during the test.

    Each context error, leak and policy violation, in order, as it happens.
    Events the test receives here are its own to check: the plugin does not
    also report them. Without the plugin enabled, ctxguard's hooks are
    installed for the test (and removed after it) if nothing installed them.
    """
    import ctxguard
    from ctxguard import events, process

    installed_here = False
    if not process.installed():
        installed_here = ctxguard.install()
    found: list[Event] = []
    unsubscribe = events.subscribe(found.append)
    request.node.stash[_EVENTS] = found
    try:
        yield found
    finally:
        unsubscribe()
        if installed_here:
            ctxguard.uninstall()


# --------------------------------------------------------------------------
# Enabled.


class Finding:
    """One thing to report: a line of text (a second with the hint, when there is one).

    ``always_warn``: a warning even in fail mode (what an app would do in production,
    not what it did).
    """

    __slots__ = ("always_warn", "category", "filename", "lineno", "text")

    def __init__(
        self,
        category: type[CtxGuardWarning],
        text: str,
        filename: str | None = None,
        lineno: int | None = None,
        *,
        always_warn: bool = False,
    ) -> None:
        self.category = category
        self.text = text
        self.filename = filename
        self.lineno = lineno
        self.always_warn = always_warn


class _Test:
    """What the plugin knows about the test running now."""

    __slots__ = (
        "apps",
        "events",
        "ident",
        "item",
        "mark",
        "mode",
        "passed",
        "pending",
        "reached",
        "seen",
        "start",
        "worker",
    )

    def __init__(self, item: pytest.Item, mode: str, ident: int, start: float) -> None:
        self.item = item
        self.mode = mode
        self.ident = ident
        self.start = start
        #: ledger.Worker of the test's thread, None when not judged.
        self.worker: Any = None
        self.mark: dict[int, float] = {}
        #: (event, when it came, the broader fixture being set up then)
        self.events: list[tuple[Event, float, str | None]] = []
        self.seen = 0
        self.passed = True
        #: (file, line) of every frame the test's own failure went through.
        self.reached: set[tuple[str, int]] = set()
        self.pending: list[Finding] = []
        #: Flask apps made during the test (weakly), with where they were made.
        self.apps: list[tuple[weakref.ref[Any], Any]] = []


class _Owned:
    """Contexts pushed while one fixture of broader scope was set up."""

    __slots__ = ("name", "records", "scope")

    def __init__(self, name: str, scope: str, records: dict[int, float]) -> None:
        self.name = name
        self.scope = scope
        self.records = records


class Guard:
    """The enabled plugin: registered by ``pytest_configure`` only when a mode is on."""

    def __init__(self, config: pytest.Config, mode: str, source: str) -> None:
        self.config = config
        self.mode = mode
        self.source = source
        self.active = False
        self.installed_here = False
        self.unsubscribe: Any = None
        self.test: _Test | None = None
        #: The broader fixture being set up now (for events found meanwhile).
        self.fixture: str | None = None
        #: Per fixture definition, the contexts its setup pushed.
        self.owned: dict[int, _Owned] = {}
        #: Flask test clients that are values of broader fixtures or class attributes.
        self.clients: list[weakref.ref[Any]] = []
        self.tests = 0
        self.judged = 0
        self.findings = 0
        self.faults = 0
        self.first_fault = ""
        self.why_inactive = ""

    # -- the session

    def start(self) -> None:
        try:
            import ctxguard
            from ctxguard import apps, events, ledger, process, telemetry

            self._ledger = ledger
            if process.installed():
                self.active = True
            else:
                self.active = self.installed_here = ctxguard.install()
            if not self.active:
                self.why_inactive = (
                    "CTXGUARD_DISABLED is set"
                    if _disabled()
                    else "its hooks could not be installed (see the ctxguard log)"
                )
                return
            names = (
                telemetry.SPAN_CONTEXT_ERROR,
                telemetry.SPAN_CONTEXT_LEAK,
                telemetry.SPAN_POLICY_VIOLATION,
            )
            if names != (SPAN_CONTEXT_ERROR, SPAN_CONTEXT_LEAK, SPAN_POLICY_VIOLATION):
                raise RuntimeError(f"unexpected telemetry names {names}")
            stop_events = events.subscribe(self._listen)
            stop_apps = apps.subscribe(self._app_made)

            def unsubscribe() -> None:
                stop_events()
                stop_apps()

            self.unsubscribe = unsubscribe
        except Exception as exc:
            self.active = False
            self.why_inactive = "it failed to start"
            self._fault("start", exc)

    def pytest_report_header(self, config: pytest.Config) -> str:
        what = "fail" if self.mode == "fail" else "warn about"
        line = (
            f"ctxguard: on, mode {self.mode} ({self.source}): {what} tests that leave a Flask"
            " context open or whose threads use one outside its context"
        )
        if not self.active:
            line += f"; inactive: {self.why_inactive}"
        return line

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        try:
            if self.unsubscribe is not None:
                self.unsubscribe()
                self.unsubscribe = None
            if self.installed_here:
                import ctxguard

                self.installed_here = False
                ctxguard.uninstall()
        except Exception as exc:
            self._fault("unconfigure", exc)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.faults:
            return
        text = (
            f"ctxguard's pytest plugin failed {self.faults} time(s) and skipped the checks"
            f" it could not make; the first time:\n{self.first_fault}"
        )
        try:
            warnings.warn(CtxGuardPluginWarning(text), stacklevel=1)
        except Warning:  # the warning filters made it an error: never fail the run for it
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"warning: {text}", yellow=True)

    def _fault(self, where: str, exc: BaseException) -> None:
        self.faults += 1
        if not self.first_fault:
            detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.first_fault = f"in {where}: {detail.rstrip()}"

    # -- events, from any thread

    def _listen(self, event: Event) -> None:
        test = self.test
        if test is not None:
            test.events.append((event, time.monotonic(), self.fixture))

    def _app_made(self, app: Any) -> None:
        test = self.test
        if test is None:
            return
        from ctxguard import frames

        site = frames.site_from(sys._getframe(1), 32)
        test.apps.append((weakref.ref(app), site))

    # -- one test

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        self._begin(item)
        try:
            yield
        finally:
            self.test = None

    def _begin(self, item: pytest.Item) -> None:
        self.test = None
        if not self.active:
            return
        try:
            test = _Test(
                item=item,
                mode=self.mode,
                ident=threading.get_ident(),
                start=time.monotonic(),
            )
            marker = item.get_closest_marker("ctxguard")
            if marker is not None:
                test.mode = str(marker.args[0]) if marker.args else marker.kwargs.get("mode", "")
            from ctxguard import process

            if process.installed():
                test.worker = self._ledger.worker()
                test.mark = self._ledger.mark(test.worker)
            self.test = test
            self.tests += 1
        except Exception as exc:
            self._fault("test start", exc)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, Any, None]:
        scope = _scope(fixturedef)
        test = self.test
        if scope not in _BROADER or test is None or test.worker is None:
            yield
            return
        before: dict[int, float] | None = None
        outer = self.fixture
        try:
            before = self._ledger.mark(test.worker)
            self.fixture = f"{scope}-scoped fixture {fixturedef.argname!r}"
        except Exception as exc:
            self._fault("fixture setup", exc)
        outcome = yield
        self.fixture = outer
        if before is None:
            return
        try:
            records = self._ledger.mark(test.worker)
            new = {key: at for key, at in records.items() if before.get(key) != at}
            if new:
                owned = self.owned.setdefault(id(fixturedef), _Owned(fixturedef.argname, scope, {}))
                owned.records.update(new)
            if outcome.excinfo is None:
                self._remember_clients([outcome.get_result()])
        except Exception as exc:
            self._fault("fixture setup", exc)

    def pytest_fixture_post_finalizer(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> None:
        """A broader fixture torn down: are the contexts its setup pushed still open?"""
        owned = self.owned.pop(id(fixturedef), None)
        test = self.test
        if owned is None or test is None or test.worker is None:
            return
        try:
            if not self._judgeable(test):
                return
            now = self._ledger.mark(test.worker)
            still = {key for key, at in owned.records.items() if now.get(key) == at}
            if not still:
                return
            # Reported here, and not again as left open by the test tearing it down.
            test.mark.update({key: owned.records[key] for key in still})
            left = [
                item
                for item in self._ledger.open_contexts(test.worker, prune=False)
                if id(item.handle) in still and item.context() is not None
            ]
            how = f"left open by {owned.scope}-scoped fixture {owned.name!r} when it was torn down"
            test.pending.extend(self._leak(item, how) for item in _merged(left))
        except Exception as exc:
            self._fault("fixture teardown", exc)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        test = self.test
        if test is None or test.item is not item or call.when == "teardown":
            return
        try:
            report = outcome.get_result()
            if not report.passed or hasattr(report, "wasxfail"):
                test.passed = False
            if call.excinfo is not None:
                test.reached.update(_raised_at(call.excinfo.value))
        except Exception as exc:
            self._fault("report", exc)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        test = self.test
        if test is not None and test.item is item and test.mode not in MODES:
            bad, test.mode = test.mode, "off"
            pytest.fail(
                f"ctxguard: @pytest.mark.ctxguard takes 'fail', 'warn' or 'off', not {bad!r}",
                pytrace=False,
            )
        self._report(item, self._from_events(item))

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        self._report(item, self._from_events(item))

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        findings = self._from_events(item)
        test = self.test
        if test is not None and test.item is item:
            findings.extend(test.pending)
            test.pending = []
            findings.extend(self._left_open(test))
            findings.extend(self._apps(test))
        self._report(item, findings)

    # -- judging

    def _judgeable(self, test: _Test) -> bool:
        """The ledger is the one marked at the start (no uninstall or reset since)."""
        from ctxguard import process

        ledger = self._ledger
        return (
            process.installed()
            and ledger.known(test.worker)
            and threading.get_ident() == test.ident
            and ledger.worker() is test.worker
        )

    def _left_open(self, test: _Test) -> list[Finding]:
        """Contexts the test pushed on its thread and left open after its teardown."""
        if test.worker is None or test.mode == "off":
            return []
        try:
            if not self._judgeable(test):
                return []
            found = self._candidates(test)
            self.judged += 1
            if found:
                # A generator or response in a reference cycle may hold a context until
                # the collector runs; judge what is really left.
                gc.collect()
                found = self._candidates(test)
            return [self._leak(item, "left open by the test") for item in _merged(found)]
        except Exception as exc:
            self._fault("leak check", exc)
            return []

    def _candidates(self, test: _Test) -> list[Any]:
        exempt = dict(test.mark)
        for owned in self.owned.values():
            exempt.update(owned.records)
        # A test class's clients (set up by setUpClass, a class-scoped fixture) are the class's.
        cls = getattr(test.item, "cls", None)
        self._remember_clients(vars(cls).values() if cls is not None else ())
        clients = [client for ref in self.clients if (client := ref()) is not None]
        found = []
        for item in self._ledger.opened_since(test.worker, exempt, prune=False):
            if item.reported or item.nested:
                continue  # reported as a leak event, or lives (and is judged) elsewhere
            ctx = item.context()
            if ctx is None or any(_preserves(client, ctx) for client in clients):
                continue
            found.append(item)
        return found

    def _apps(self, test: _Test) -> list[Finding]:
        """Apps made during the test that ctxguard would take for production apps, checked
        against the production policy (apps guarded by ctxguard report for themselves)."""
        if not test.apps or test.mode == "off":
            return []
        try:
            from ctxguard import frames, policy, settings
            from ctxguard.extension import CtxGuard

            options = settings.resolve()
            found = []
            for ref, site in test.apps:
                app = ref()
                if app is None or CtxGuard.middleware(app) is not None:
                    continue
                environment = options.environment_for(bool(app.debug), bool(app.testing))
                if environment != "production" or options.policy == "off":
                    continue
                location = frames.describe(site)
                made = self._where(
                    location.file if location else None,
                    location.line if location else None,
                    location.function if location else None,
                )
                for violation in policy.app_violations(app, app.wsgi_app):
                    found.append(
                        Finding(
                            PolicyViolationWarning,
                            f"app made at {made}, neither testing nor debug (so production"
                            f" for ctxguard), breaks the production policy:"
                            f" {violation.rule}: {violation.detail}",
                            location.file if location else None,
                            location.line if location else None,
                            always_warn=True,
                        )
                    )
            return found
        except Exception as exc:
            self._fault("app check", exc)
            return []

    def _leak(self, item: Any, how: str) -> Finding:
        location = item.location
        where = self._where(
            location.file if location else None,
            location.line if location else None,
            location.function if location else None,
        )
        text = f"{item.kind} context {how}: pushed at {where}"
        if how == "left open by the test":
            text += (
                "\n  pop every context the test and its function-scoped fixtures push (a"
                " `with` block does); one meant to outlive the test belongs to a fixture of"
                " broader scope"
            )
        return Finding(
            ContextLeakWarning,
            text,
            location.file if location else None,
            location.line if location else None,
        )

    def _from_events(self, item: pytest.Item) -> list[Finding]:
        """What ctxguard reported since the last look, that is this test's to report."""
        test = self.test
        if test is None or test.item is not item:
            return []
        try:
            events = test.events[test.seen :]
            test.seen += len(events)
            if test.mode == "off" or not events:
                return []
            consumed = {id(event) for event in item.stash.get(_EVENTS, ())}
            found = []
            for event, at, fixture in events:
                if id(event) in consumed:
                    continue
                finding = self._finding(test, event, at)
                if finding is not None:
                    if fixture is not None:
                        finding.text += f"\n  (during the setup of {fixture})"
                    found.append(finding)
            return found
        except Exception as exc:
            self._fault("events", exc)
            return []

    def _finding(self, test: _Test, event: Event, at: float) -> Finding | None:
        attributes = event.attributes
        path = attributes.get(_CODE_FILE)
        line = attributes.get(_CODE_LINE)
        where = self._where(path, line, attributes.get(_CODE_FUNCTION))
        thread = attributes.get(_THREAD_NAME) or f"thread {event.thread_id}"
        if event.name == SPAN_CONTEXT_ERROR:
            if event.thread_id == test.ident:
                return None  # raised into the test itself, or caught there on purpose
            if path is not None and (os.path.abspath(str(path)), line) in test.reached:
                return None  # re-raised in the test (future.result(), a join that re-raises)
            kind = attributes.get(_CONTEXT_KIND)
            needed = "a request" if kind == "request" else "an application"
            text = (
                f"{attributes.get(_PROXY, 'a proxy')} used outside {needed} context at {where}"
                f" (thread {thread}); the error did not reach the test"
            )
            hint = attributes.get(_HINT)
            if hint:
                text += f"\n  hint: {hint}"
            return Finding(ContextErrorWarning, text, path, line)
        if event.name == SPAN_CONTEXT_LEAK:
            age = attributes.get(_CONTEXT_AGE)
            if isinstance(age, (int, float)) and at - age < test.start - 0.001:
                return None  # pushed before this test began: not its own
            site = attributes.get(_LEAK_SITE)
            when = {
                "thread_exit": f"at the end of thread {thread}",
                "task_end": f"at the end of an executor task (thread {thread})",
                "request_end": "at the end of request"
                f" {attributes.get(_HTTP_METHOD, '')} {attributes.get(_HTTP_ROUTE) or ''}".rstrip(),
                "request_start": "found stale at the start of a request",
            }.get(str(site), str(site))
            text = f"{attributes.get(_CONTEXT_KIND, '?')} context leaked {when}: pushed at {where}"
            return Finding(ContextLeakWarning, text, path, line)
        if event.name == SPAN_POLICY_VIOLATION:
            text = event.message.removeprefix("ctxguard: ") or "production policy violation"
            return Finding(PolicyViolationWarning, text)
        return None

    def _where(self, path: Any, line: Any, function: Any) -> str:
        if path is None:
            return "a place Flask chose (no code of the test or the app on the stack)"
        text = _relative(str(path), self.config)
        if line is not None:
            text += f":{line}"
        return f"{text} in {function}" if function else text

    # -- reporting

    def _report(self, item: pytest.Item, findings: list[Finding]) -> None:
        """Fail the test with every finding (``fail``), or warn once per finding.

        A test that did not pass (failed, skipped, xfail) gets warnings: its own
        outcome comes first, and a context it left open is usually the pop its
        failure skipped.
        """
        test = self.test
        if not findings or test is None or test.mode == "off":
            return
        self.findings += len(findings)
        failing = [f for f in findings if not f.always_warn]
        if test.mode == "fail" and test.passed and failing:
            for finding in findings:
                if finding.always_warn:
                    _warn(item, finding)
            pytest.fail("\n".join(f"ctxguard: {f.text}" for f in failing), pytrace=False)
        for finding in findings:
            _warn(item, finding)

    def _remember_clients(self, values: Iterable[Any]) -> None:
        """Flask test clients held by a broader fixture (or a test class): inside their
        ``with`` block the contexts they keep after each request are theirs."""
        for value in values:
            if isinstance(value, dict):
                inner = list(value.values())
            elif isinstance(value, (tuple, list)):
                inner = list(value)
            else:
                inner = [value]
            for candidate in inner:
                if _is_client(candidate) and not any(ref() is candidate for ref in self.clients):
                    try:
                        self.clients.append(weakref.ref(candidate))
                    except TypeError:
                        pass
        self.clients = [ref for ref in self.clients if ref() is not None]


def _warn(item: pytest.Item, finding: Finding) -> None:
    """A warning located at the finding's line (the test's own when it has none)."""
    if finding.filename is not None:
        filename, lineno = finding.filename, finding.lineno or 0
    else:
        filename, lineno = str(item.path), (item.location[1] or 0) + 1
    warnings.warn_explicit(
        finding.category(f"ctxguard: {finding.text}"), finding.category, filename, int(lineno)
    )


def _merged(items: list[Any]) -> list[Any]:
    """Without the app contexts that request contexts in ``items`` pushed for themselves
    (Flask up to 3.1 pushes one when none is current): one context left open, one report."""
    implicit = set()
    for item in items:
        if item.kind == "request":
            for token in list(getattr(item.context(), "_cv_tokens", None) or ()):
                if isinstance(token, tuple) and len(token) == 2 and token[1] is not None:
                    implicit.add(id(token[1]))
    return [item for item in items if item.kind == "request" or id(item.context()) not in implicit]


def _is_client(value: Any) -> bool:
    """Is this Flask's test client (or a subclass)? Told from the type alone: asking a
    Flask proxy for an attribute would look its context up."""
    return any(
        cls.__name__ == "FlaskClient" and cls.__module__ == "flask.testing"
        for cls in type(value).__mro__
    )


def _preserves(client: Any, ctx: Any) -> bool:
    """Does this Flask test client keep ``ctx`` pushed (``with client:``, after a request)?

    The contexts it keeps are the ones it entered, and (up to Flask 3.1) the app context
    a request context it entered pushed for itself.
    """
    try:
        if not client.preserve_context:
            return False
        for entry in list(getattr(client._context_stack, "_exit_callbacks", ())):
            callback = entry[1] if isinstance(entry, tuple) else entry
            kept = getattr(callback, "__self__", None)
            if kept is ctx:
                return True
            for token in list(getattr(kept, "_cv_tokens", None) or ()):
                if isinstance(token, tuple) and len(token) == 2 and token[1] is ctx:
                    return True
    except Exception:
        return False
    return False


def _scope(fixturedef: Any) -> str:
    scope = getattr(fixturedef, "scope", "function")
    return str(getattr(scope, "value", scope))


def _raised_at(exc: BaseException | None) -> set[tuple[str, int]]:
    """Every (file, line) in the tracebacks of an exception and those chained to it."""
    found: set[tuple[str, int]] = set()
    stack = [exc]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen or len(seen) > 100:
            continue
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            found.add((os.path.abspath(tb.tb_frame.f_code.co_filename), tb.tb_lineno))
            tb = tb.tb_next
        stack.extend((current.__cause__, current.__context__))
        stack.extend(getattr(current, "exceptions", ()) or ())
    return found


def _relative(path: str, config: pytest.Config) -> str:
    """A path as pytest shows node ids: relative to the root directory when under it."""
    try:
        rel = os.path.relpath(path, config.rootpath)
    except ValueError:  # another drive
        return path
    return path if rel.startswith(os.pardir) else rel


def _disabled() -> bool:
    return os.environ.get("CTXGUARD_DISABLED", "").strip().lower() in ("1", "true", "yes", "on")
