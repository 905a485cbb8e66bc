"""The pytest plugin (``ctxguard.integrations.pytest_plugin``, docs/pytest.md).

Each test writes a test file with ``pytester`` and runs pytest on it in a
subprocess (the plugin installs process-wide hooks, and this suite's own
conftest uninstalls ctxguard around every test of the outer process). The
plugin is loaded there as users get it: by its ``pytest11`` entry point.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import pytest

from ctxguard import telemetry
from ctxguard.integrations import pytest_plugin

FLASK_APP = """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pytest
    from flask import Flask, request

    app = Flask(__name__)
    app.testing = True

    @app.route("/")
    def index():
        return "hello"

    @app.route("/go")
    def go():
        from flask import redirect
        return redirect("/")
"""


def write(pytester: pytest.Pytester, name: str, body: str) -> str:
    """A test module made of the small app above and ``body``; returns its source."""
    source = textwrap.dedent(FLASK_APP) + textwrap.dedent(body)
    return pytester.makepyfile(**{name: source}).read_text()


def line_of(source: str, marker: str) -> int:
    return next(i for i, text in enumerate(source.splitlines(), 1) if marker in text)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args)


def test_the_entry_point_is_registered():
    """The plugin is found by pytest in every run once the package is installed, under the
    name ``-p no:ctxguard`` uses (if this fails: pip install -e . again)."""
    found = [
        ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "ctxguard"
    ]
    assert [ep.value for ep in found] == ["ctxguard.integrations.pytest_plugin"]


def test_telemetry_names_agree():
    """The plugin reads events by the span names and attributes ctxguard emits (copied so that
    the plugin module imports nothing of ctxguard until enabled)."""
    names = {
        "SPAN_CONTEXT_ERROR": telemetry.SPAN_CONTEXT_ERROR,
        "SPAN_CONTEXT_LEAK": telemetry.SPAN_CONTEXT_LEAK,
        "SPAN_POLICY_VIOLATION": telemetry.SPAN_POLICY_VIOLATION,
        "_PROXY": telemetry.PROXY,
        "_CONTEXT_KIND": telemetry.CONTEXT_KIND,
        "_LEAK_SITE": telemetry.LEAK_SITE,
        "_CONTEXT_AGE": telemetry.CONTEXT_AGE,
        "_HINT": telemetry.HINT,
        "_THREAD_NAME": telemetry.THREAD_NAME,
        "_CODE_FUNCTION": telemetry.CODE_FUNCTION,
        "_CODE_FILE": telemetry.CODE_FILE,
        "_CODE_LINE": telemetry.CODE_LINE,
        "_HTTP_ROUTE": telemetry.HTTP_ROUTE,
        "_HTTP_METHOD": telemetry.HTTP_METHOD,
    }
    assert {name: getattr(pytest_plugin, name) for name in names} == names


# -- installed, not enabled

LEAKY = """
    def test_leaks():
        app.app_context().push()

    def test_thread_swallows_an_error():
        def work():
            try:
                request.path
            except RuntimeError:
                pass
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
"""


def test_inert_when_not_enabled(pytester):
    """Installed but not enabled, the plugin changes nothing: a test that leaks a context and
    one whose thread swallows a context error pass, and nothing of ctxguard is printed
    (the header has no ctxguard line)."""
    write(pytester, "test_leaky", LEAKY)
    result = run(pytester)
    result.assert_outcomes(passed=2)
    assert "ctxguard:" not in result.stdout.str()
    assert "ctxguard" not in result.stderr.str()


def test_inert_imports_nothing_and_installs_nothing(pytester):
    """Not enabled: no hook of ctxguard is installed, Flask is not imported, the plugin's only
    hooks are pytest_addoption and pytest_configure (none runs per test), and ctxguard's
    modules in sys.modules are exactly those that importing the plugin module brings."""
    pytester.makepyfile(
        test_modules="""
        import json
        import subprocess
        import sys

        CODE = (
            "import json, sys, ctxguard.integrations.pytest_plugin;"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'ctxguard')))"
        )

        def test_nothing_more_than_the_plugin_module(request):
            alone = json.loads(
                subprocess.run(
                    [sys.executable, "-c", CODE], capture_output=True, text=True, check=True
                ).stdout
            )
            here = sorted(m for m in sys.modules if m.split(".")[0] == "ctxguard")
            assert here == alone
            assert "flask" not in sys.modules
            process = sys.modules.get("ctxguard.process")
            assert process is None or not process.installed()
            manager = request.config.pluginmanager
            plugin = manager.get_plugin("ctxguard")
            assert plugin is sys.modules["ctxguard.integrations.pytest_plugin"]
            assert manager.get_plugin("ctxguard-guard") is None
            assert plugin.mode(request.config) is None
            assert plugin.summary(request.config) is None
            hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin))
            assert hooks == ["pytest_addoption", "pytest_configure"]
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_importing_the_plugin_module_imports_only_the_plugin():
    """What pytest imports at start when the package is installed: the plugin module and its
    two parent packages, nothing else of ctxguard and no OpenTelemetry."""
    code = (
        "import json, sys, ctxguard.integrations.pytest_plugin;"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('ctxguard', 'opentelemetry', 'flask'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [
        "ctxguard",
        "ctxguard.integrations",
        "ctxguard.integrations.pytest_plugin",
    ]


def test_p_no_ctxguard_unloads_it(pytester):
    """``-p no:ctxguard`` unloads the plugin: its option is then unknown."""
    write(pytester, "test_leaky", LEAKY)
    result = run(pytester, "-p", "no:ctxguard", "--ctxguard")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unrecognized arguments: --ctxguard*"])


# -- enabled: contexts left open


def test_a_leak_in_the_test_body_fails_it_at_teardown_with_the_push_site(pytester):
    """A context the test pushed and never popped fails the test (an error at teardown) with
    the kind of context and the file:line and function that pushed it; the header says
    ctxguard is on and in which mode."""
    source = write(
        pytester,
        "test_leak",
        """
        def test_leaks():
            app.app_context().push()  # the push
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=1, errors=1)
    line = line_of(source, "# the push")
    result.stdout.fnmatch_lines(
        [
            "ctxguard: on, mode fail (--ctxguard=fail)*",
            "*ERROR at teardown of test_leaks*",
            f"ctxguard: app context left open by the test: pushed at test_leak.py:{line}"
            " in test_leaks",
            "*ERROR test_leak.py::test_leaks - Failed: ctxguard: app context left open*",
        ]
    )


def test_a_leak_in_a_function_scoped_fixture_fails_the_test(pytester):
    """A function-scoped fixture is part of the test: what it pushes and does not pop fails
    the test, with the fixture's line; a request context left open is one report, with the
    app context it pushed for itself."""
    source = write(
        pytester,
        "test_fixture",
        """
        @pytest.fixture
        def pushed():
            ctx = app.test_request_context("/")
            ctx.push()  # the push
            yield ctx

        def test_uses_it(pushed):
            assert request.path == "/"
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=1, errors=1)
    line = line_of(source, "# the push")
    result.stdout.fnmatch_lines(
        [f"ctxguard: request context left open by the test: pushed at test_fixture.py:{line}*"]
    )
    # One report: not another for the app context Flask (up to 3.1) pushed with it.
    reported = [t for t in result.outlines if t.startswith("ctxguard: ") and "left open" in t]
    assert len(reported) == 1, reported


def test_broader_fixtures_own_their_contexts(pytester):
    """Contexts pushed by module-, class- and session-scoped fixtures stay open after each
    test (pytest tears them down later): they are the fixtures', not the tests'. Popped at
    the fixture's own teardown, nothing is reported."""
    write(
        pytester,
        "test_scopes",
        """
        @pytest.fixture(scope="session")
        def session_ctx():
            with app.app_context() as ctx:
                yield ctx

        @pytest.fixture(scope="module")
        def module_ctx(session_ctx):
            ctx = app.test_request_context("/module")
            ctx.push()
            yield ctx
            ctx.pop()

        class TestClass:
            @pytest.fixture(scope="class")
            def class_ctx(self, module_ctx):
                with app.test_request_context("/class") as ctx:
                    yield ctx

            def test_one(self, class_ctx):
                assert request.path == "/class"

            def test_two(self, class_ctx):
                assert request.path == "/class"

        def test_module(module_ctx):
            assert request.path == "/module"

        def test_module_again(module_ctx):
            with app.app_context():
                pass
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=4)
    assert "left open" not in result.stdout.str()


def test_a_broader_fixture_that_never_pops_is_reported_when_torn_down(pytester):
    """A module-scoped fixture that pushes a context and never pops it is reported once, when
    pytest tears the fixture down (an error at the teardown of the module's last test), naming
    the fixture and the push site; the tests that used it meanwhile pass."""
    source = write(
        pytester,
        "test_module_leak",
        """
        @pytest.fixture(scope="module")
        def pushed():
            app.app_context().push()  # the push
            yield

        def test_one(pushed):
            pass

        def test_two(pushed):
            pass
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=2, errors=1)
    line = line_of(source, "# the push")
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_two*",
            "ctxguard: app context left open by module-scoped fixture 'pushed' when it was"
            f" torn down: pushed at test_module_leak.py:{line} in pushed",
        ]
    )


def test_contexts_open_before_the_test_are_not_its_own(pytester):
    """A context pushed at import time (collection) and one left open by an earlier test are
    not the next test's: only the test that pushed it is reported."""
    write(
        pytester,
        "test_before",
        """
        app.app_context().push()  # at import

        def test_leaks():
            app.test_request_context().push()

        def test_after():
            pass
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks*"])
    assert "test_after - " not in result.stdout.str()


def test_balanced_pushes_and_pops_pass(pytester):
    """Contexts pushed and popped (with blocks, push/pop pairs, nested, in threads and
    executor tasks) give no report."""
    write(
        pytester,
        "test_balanced",
        """
        def test_with_blocks():
            with app.app_context():
                with app.test_request_context("/"):
                    assert request.path == "/"

        def test_push_pop():
            ctx = app.app_context()
            ctx.push()
            try:
                pass
            finally:
                ctx.pop()

        def test_in_threads():
            def work():
                with app.test_request_context("/t"):
                    return request.path
            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
            with ThreadPoolExecutor(2) as pool:
                assert pool.submit(work).result() == "/t"
        """,
    )
    run(pytester, "--ctxguard").assert_outcomes(passed=3)


def test_the_test_client_gives_no_false_report(pytester):
    """Flask's own test client used normally: plain requests, redirects followed,
    ``with client:`` blocks (which keep the last request's contexts until the block ends),
    session_transaction, and a module-scoped fixture holding a client inside ``with`` (whose
    kept contexts outlive each test until the fixture ends): nothing is reported."""
    write(
        pytester,
        "test_client",
        """
        from flask import session

        @pytest.fixture
        def client():
            return app.test_client()

        @pytest.fixture(scope="module")
        def kept():
            with app.test_client() as client:
                yield client

        def test_plain(client):
            assert client.get("/").data == b"hello"
            assert client.get("/go", follow_redirects=True).data == b"hello"

        def test_with_block(client):
            with client:
                client.get("/")
                assert request.path == "/"
                client.get("/go")
                assert request.path == "/go"

        def test_session(client):
            app.secret_key = "test"
            with client.session_transaction() as sess:
                sess["a"] = 1
            with client:
                client.get("/")
                assert session["a"] == 1

        def test_kept_one(kept):
            kept.get("/")
            assert request.path == "/"

        def test_kept_two(kept):
            kept.get("/go")
            assert request.path == "/go"
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=5)
    assert "ctxguard: " not in result.stdout.str().replace("ctxguard: on", "")


def test_unittest_and_xunit_setups(pytester):
    """unittest and xunit set-ups follow their scope: setUpClass (a client entered there, so
    its kept contexts are the class's) and setup_module belong to the class and the module,
    setUp/tearDown and setup_method to the test; balanced ones give no report, a setUp that
    pushes and never pops fails its test."""
    write(
        pytester,
        "test_unit",
        """
        import unittest

        def setup_module():
            global MODULE_CTX
            MODULE_CTX = app.app_context()
            MODULE_CTX.push()

        def teardown_module():
            MODULE_CTX.pop()

        class TestClient(unittest.TestCase):
            @classmethod
            def setUpClass(cls):
                cls.client = app.test_client()
                cls.client.__enter__()

            @classmethod
            def tearDownClass(cls):
                cls.client.__exit__(None, None, None)

            def test_a(self):
                self.client.get("/")
                assert request.path == "/"

            def test_b(self):
                self.client.get("/go")
                assert request.path == "/go"

        class TestBalanced(unittest.TestCase):
            def setUp(self):
                self.ctx = app.test_request_context("/")
                self.ctx.push()

            def tearDown(self):
                self.ctx.pop()

            def test_c(self):
                assert request.path == "/"

        class TestXunit:
            def setup_method(self):
                self.ctx = app.test_request_context("/x")
                self.ctx.push()

            def teardown_method(self):
                self.ctx.pop()

            def test_x(self):
                assert request.path == "/x"
        """,
    )
    source = write(
        pytester,
        "test_unit_leak",
        """
        import unittest

        class TestLeaky(unittest.TestCase):
            def setUp(self):
                app.test_request_context().push()  # the push

            def test_leaky(self):
                pass
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=5, errors=1)
    line = line_of(source, "# the push")
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of TestLeaky.test_leaky*",
            "ctxguard: request context left open by the test: pushed at"
            f" test_unit_leak.py:{line} in *setUp",  # TestLeaky.setUp from Python 3.11
        ]
    )


# -- enabled: threads and executor tasks


def test_a_thread_that_swallows_a_request_error_fails_the_test_with_the_hint(pytester):
    """``request`` used in a thread the test started, the RuntimeError caught there (the test
    never sees it): the test fails with the line that touched the proxy, the thread and
    ctxguard's hint."""
    source = write(
        pytester,
        "test_thread",
        """
        def test_thread():
            def work():
                try:
                    request.path  # the use
                except RuntimeError:
                    pass
            thread = threading.Thread(target=work, name="worker")
            thread.start()
            thread.join()
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(failed=1)
    line = line_of(source, "# the use")
    result.stdout.fnmatch_lines(
        [
            f"ctxguard: request used outside a request context at test_thread.py:{line} in"
            " *work (thread worker); the error did not reach the test",
            "  hint: *request*",
        ]
    )


def test_an_executor_task_error_fails_the_test(pytester):
    """An executor task whose error stays in its future (never read) fails the test, with the
    task's line and the hint."""
    source = write(
        pytester,
        "test_task",
        """
        def test_task():
            def work():
                return request.args  # the use
            with ThreadPoolExecutor(1) as pool:
                pool.submit(work)
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(failed=1)
    line = line_of(source, "# the use")
    result.stdout.fnmatch_lines(
        [
            f"ctxguard: request used outside a request context at test_task.py:{line}*",
            "  hint: *",
        ]
    )


def test_errors_that_reach_the_test_are_not_reported_again(pytester):
    """An outside-context error raised in the test's own thread is the test's (expected with
    pytest.raises, or failing it by itself); one re-raised from a future fails the test once,
    with Flask's own error, and ctxguard adds nothing."""
    write(
        pytester,
        "test_reached",
        """
        def test_expected():
            with pytest.raises(RuntimeError):
                request.path

        def test_caught_here():
            try:
                request.path
            except RuntimeError:
                pass

        def test_future():
            def work():
                return request.path
            with ThreadPoolExecutor(1) as pool:
                pool.submit(work).result()
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_reached.py::test_future - RuntimeError: Working*"])
    assert "did not reach the test" not in result.stdout.str()


def test_a_thread_that_ends_with_a_context_pushed_fails_the_test(pytester):
    """ctxguard's own leak report (a thread that ended with a context still pushed) fails the
    test that started the thread."""
    source = write(
        pytester,
        "test_thread_leak",
        """
        def test_thread_leak():
            def work():
                app.app_context().push()  # the push
            thread = threading.Thread(target=work, name="pusher")
            thread.start()
            thread.join()
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(failed=1)
    line = line_of(source, "# the push")
    result.stdout.fnmatch_lines(
        [
            "ctxguard: app context leaked at the end of thread pusher: pushed at"
            f" test_thread_leak.py:{line} in *work",
        ]
    )


# -- enabled: production policy


def test_policy_violations_are_reported(pytester):
    """An app guarded by ctxguard that ctxguard takes for a production app (neither testing
    nor debug) reports its production policy violations: they fail the test."""
    write(
        pytester,
        "test_policy",
        """
        import ctxguard

        def test_guarded_with_preserve():
            prod = Flask("prod")
            prod.config["PRESERVE_CONTEXT_ON_EXCEPTION"] = True
            ctxguard.CtxGuard(prod)
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["ctxguard: production policy violation preserve_context_on_exception (enforced)*"]
    )


def test_unguarded_production_apps_made_in_a_test_are_warned_about(pytester):
    """An app made during the test (here by a fixture, as a factory would), not guarded, that
    ctxguard would take for a production app at the end of the test (neither testing nor
    debug) is checked against the production policy: a warning (it is what the app would do
    in production, not what it did), even in fail mode. Apps made for testing are not
    checked."""
    source = write(
        pytester,
        "test_apps",
        """
        from werkzeug.debug import DebuggedApplication

        @pytest.fixture
        def prod():
            made = Flask("prod")  # made here
            made.wsgi_app = DebuggedApplication(made.wsgi_app, evalex=True)
            return made

        @pytest.fixture
        def for_testing():
            made = Flask("made")
            made.testing = True
            made.wsgi_app = DebuggedApplication(made.wsgi_app, evalex=True)
            return made

        def test_debugger_in_the_chain(prod):
            pass

        def test_for_testing(for_testing):
            pass
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=2, warnings=1)
    line = line_of(source, "# made here")
    result.stdout.fnmatch_lines(
        [
            f"*test_apps.py:{line}: PolicyViolationWarning: ctxguard: app made at"
            f" test_apps.py:{line} in prod, neither testing nor debug*debugger_middleware*",
        ]
    )


# -- warn mode, the ini option, the marker, bad values


def test_warn_mode_reports_warnings_and_the_tests_pass(pytester):
    """``--ctxguard=warn``: the same findings as warnings of ctxguard's categories, and the
    tests pass; ``-W error::<category>`` turns them back into errors."""
    source = write(pytester, "test_leaky", LEAKY)
    result = run(pytester, "--ctxguard=warn")
    result.assert_outcomes(passed=2, warnings=2)
    line = line_of(source, "app.app_context().push()")
    result.stdout.fnmatch_lines(
        [
            "ctxguard: on, mode warn (--ctxguard=warn)*",
            f"*test_leaky.py:{line}: ContextLeakWarning: ctxguard: app context left open by"
            " the test*",
            "*: ContextErrorWarning: ctxguard: request used outside a request context*",
        ]
    )
    strict = run(
        pytester,
        "--ctxguard=warn",
        "-W",
        "error::ctxguard.integrations.pytest_plugin.ContextLeakWarning",
    )
    strict.assert_outcomes(passed=2, errors=1, warnings=1)


@pytest.mark.parametrize(
    ("ini", "outcomes"),
    [
        ("true", {"passed": 1, "errors": 1}),
        ("fail", {"passed": 1, "errors": 1}),
        ("warn", {"passed": 1, "warnings": 1}),
        ("false", {"passed": 1}),
    ],
)
def test_the_ini_option_enables_it(pytester, ini, outcomes):
    """The ini option ``ctxguard`` (true or fail, warn, false or off) enables the plugin as
    the command line does."""
    pytester.makeini(f"[pytest]\nctxguard = {ini}\n")
    write(pytester, "test_leaky", "def test_leaks():\n    app.app_context().push()\n")
    run(pytester).assert_outcomes(**outcomes)


def test_the_command_line_wins_over_the_ini_option(pytester):
    """``--ctxguard=off`` turns off what the ini file turned on."""
    pytester.makeini("[pytest]\nctxguard = true\n")
    write(pytester, "test_leaky", LEAKY)
    result = run(pytester, "--ctxguard=off")
    result.assert_outcomes(passed=2)
    assert "ctxguard:" not in result.stdout.str()


def test_bad_values_are_usage_errors_naming_the_source_and_the_values(pytester):
    """A bad value, on the command line or in the ini file, stops pytest with a usage error
    that names where it came from and the values allowed."""
    write(pytester, "test_leaky", LEAKY)
    result = run(pytester, "--ctxguard=maybe")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*argument --ctxguard: invalid choice: 'maybe' (choose from 'fail', 'warn', 'off')*"]
    )
    pytester.makeini("[pytest]\nctxguard = sometimes\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: ctxguard: 'sometimes' is not a value of the ini option ctxguard (in *tox.ini):"
            " use fail (or true), warn, or off (or false)"
        ]
    )


def test_the_marker_sets_the_mode_of_one_test(pytester):
    """``@pytest.mark.ctxguard("off")`` or ``("warn")`` changes the mode for one test (a test
    that leaves a context open on purpose); a bad value fails that test clearly. Without the
    plugin enabled the marker is registered (so --strict-markers accepts it) and does
    nothing."""
    write(
        pytester,
        "test_marked",
        """
        @pytest.mark.ctxguard("off")
        def test_off():
            app.app_context().push()

        @pytest.mark.ctxguard("warn")
        def test_warn():
            app.app_context().push()

        @pytest.mark.ctxguard("loud")
        def test_bad():
            pass
        """,
    )
    result = run(pytester, "--ctxguard", "--strict-markers")
    result.assert_outcomes(passed=2, errors=1, warnings=1)
    result.stdout.fnmatch_lines(
        ["*ctxguard: @pytest.mark.ctxguard takes 'fail', 'warn' or 'off', not 'loud'*"]
    )
    run(pytester, "--strict-markers").assert_outcomes(passed=3)


def test_a_test_that_failed_gets_warnings_not_a_second_error(pytester):
    """A test that failed (or xfailed) and left a context open keeps its own outcome: the
    context left open (usually the pop its failure skipped) is a warning."""
    write(
        pytester,
        "test_failing",
        """
        def test_fails():
            app.app_context().push()
            assert False

        @pytest.mark.xfail(reason="on purpose")
        def test_xfails():
            app.app_context().push()
            assert False
        """,
    )
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(failed=1, xfailed=1, warnings=2)


# -- the fixture


def test_ctxguard_events_lists_the_events_of_the_test(pytester):
    """``ctxguard_events`` is the list of ctxguard's events during the test, for assertions;
    the events a test receives there are its own to check, so the plugin does not fail the
    test for them. It works without the plugin enabled too (hooks installed for the test)."""
    write(
        pytester,
        "test_events",
        """
        def test_events(ctxguard_events):
            def work():
                app.app_context().push()
            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
            assert [e.name for e in ctxguard_events] == ["ctxguard.context_leak"]
            event = ctxguard_events[0]
            assert event.attributes["ctxguard.leak.site"] == "thread_exit"
            assert event.location.endswith("test_events.py:%d" % (work.__code__.co_firstlineno + 1))

        def test_nothing(ctxguard_events):
            with app.app_context():
                pass
            assert ctxguard_events == []
        """,
    )
    run(pytester, "--ctxguard").assert_outcomes(passed=2)
    run(pytester).assert_outcomes(passed=2)


# -- never breaking a run


def test_the_plugins_own_faults_never_fail_a_test(pytester):
    """If the plugin itself fails (here: the ledger read raises), the tests keep their
    outcomes and one CtxGuardPluginWarning at the end says what happened."""
    pytester.makeconftest(
        """
        import ctxguard.ledger

        def boom(*args, **kwargs):
            raise ValueError("boom")

        ctxguard.ledger.opened_since = boom
        """
    )
    write(pytester, "test_leaky", LEAKY)
    result = run(pytester, "--ctxguard")
    result.assert_outcomes(passed=1, failed=1, warnings=1)
    result.stdout.fnmatch_lines(
        ["*CtxGuardPluginWarning: ctxguard's pytest plugin failed * time(s)*", "*boom*"]
    )


def test_it_uninstalls_only_what_it_installed(pytester):
    """Hooks the plugin installed are removed at the end of the session; hooks something else
    installed first are left in place."""
    pytester.makeconftest(
        """
        import os
        import pytest

        @pytest.hookimpl(trylast=True)
        def pytest_unconfigure(config):
            import ctxguard.process
            with open("installed_at_end", "w") as file:
                file.write(str(ctxguard.process.installed()))

        if os.environ.get("INSTALL_FIRST"):
            import ctxguard
            ctxguard.install()
        """
    )
    write(pytester, "test_one", "def test_one():\n    pass\n")
    run(pytester, "--ctxguard").assert_outcomes(passed=1)
    assert (pytester.path / "installed_at_end").read_text() == "False"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSTALL_FIRST", "1")
        run(pytester, "--ctxguard").assert_outcomes(passed=1)
    assert (pytester.path / "installed_at_end").read_text() == "True"
