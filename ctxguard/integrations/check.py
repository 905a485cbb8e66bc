"""``ctxguard check``: what an app does wrong before it serves a request, for CI.

Loads the app the way ``flask --app`` does (``module:app``, ``module:create_app()``,
``path/to/app.py``), with ctxguard's hooks installed, and reports with the file
and line of the user's code:

- contexts pushed while the app was imported or made, and left open (a
  module-level ``app.app_context().push()``: shared by every request of that
  thread, torn down by none);
- a Flask proxy touched outside its context while importing, which made the
  import fail (``current_app`` at module level);
- with ``--environment production`` (the default), the production policy's
  findings for the app as loaded (debug mode, Werkzeug's debugger in the WSGI
  chain, a configuration that keeps contexts after a failing request).

Exit status: 0 nothing found, 1 findings, 2 the app could not be loaded.
``--format json`` prints ``{"target", "environment", "findings": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from dataclasses import asdict, dataclass
from typing import Any

from .. import frames, ledger, policy, process, telemetry

ENVIRONMENTS = ("production", "development", "testing")


@dataclass(frozen=True)
class Finding:
    """One thing found, at a place in the user's code when known."""

    kind: str  # "open_context", "proxy_error" or "policy"
    message: str
    file: str | None = None
    line: int | None = None
    function: str | None = None
    rule: str | None = None

    def text(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file is not None else ""
        return f"{where}{self.message}"


class LoadError(Exception):
    """The app could not be loaded for a reason that is not a context error."""


def _split(target: str) -> tuple[str, str | None]:
    """``path:name`` as ``flask --app`` splits it (a Windows drive's colon is kept)."""
    parts = re.split(r":(?![\\/])", target, maxsplit=1)
    return parts[0], parts[1] if len(parts) > 1 and parts[1] else None


def _located(tb: Any) -> tuple[str | None, int | None, str | None]:
    """File, line and function of the user's frame nearest to where ``tb`` was raised."""
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return None, None, None
    location = frames.describe(frames.site_from(last.tb_frame, 64))
    if location is None:
        return None, None, None
    return location.file, location.line, location.function


def load(target: str) -> tuple[Any, list[Finding]]:
    """Import and make the app; what went wrong with contexts meanwhile."""
    from flask.cli import NoAppException, locate_app, prepare_import

    path, name = _split(target)
    module = prepare_import(path)  # puts the app's directory on sys.path, as flask does
    findings: list[Finding] = []
    try:
        app = locate_app(module, name)
    except NoAppException as exc:
        raise LoadError(str(exc)) from None
    except RuntimeError as exc:
        text = str(exc)
        if "outside of" not in text or "context" not in text:
            raise LoadError(_trace(exc)) from None
        file, line, function = _located(exc.__traceback__)
        findings.append(
            Finding(
                "proxy_error",
                f"a Flask proxy is used outside its context while the app is imported:"
                f" {text.splitlines()[0]}",
                file,
                line,
                function,
            )
        )
        return None, findings
    except Exception as exc:
        raise LoadError(_trace(exc)) from None
    return app, findings


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


def run(target: str, environment: str = "production") -> tuple[list[Finding], Any]:
    """The findings for ``target``, and the app (None when the import failed)."""
    process.install()
    w = ledger.worker()
    before = {id(item.handle) for item in ledger.open_contexts(w)}
    app, findings = load(target)
    for item in ledger.open_contexts(w):
        if id(item.handle) in before or not item.reachable:
            continue
        location = item.location
        findings.append(
            Finding(
                "open_context",
                f"{'an application' if item.kind == telemetry.KIND_APP else 'a request'} context"
                " is pushed while the app is imported and never popped: every request on this"
                " thread runs inside it and its teardown never runs; use `with"
                " app.app_context():` around the code that needs it",
                location.file if location else None,
                location.line if location else None,
                location.function if location else None,
            )
        )
    if app is not None and environment == "production":
        for violation in policy.app_violations(app, app.wsgi_app):
            findings.append(
                Finding("policy", f"production policy: {violation.detail}", rule=violation.rule)
            )
    return findings, app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctxguard check",
        description="Load a Flask app as `flask --app` does, with ctxguard's hooks, and report"
        " contexts pushed at import and left open, proxies used outside their context at"
        " import, and production policy findings.",
        epilog="Exit status: 0 nothing found, 1 findings, 2 the app could not be loaded.",
    )
    parser.add_argument("target", help="the app, as flask --app takes it: module:app, ...")
    parser.add_argument("--environment", choices=ENVIRONMENTS, default="production")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    try:
        findings, _ = run(args.target, args.environment)
    except LoadError as exc:
        print(f"ctxguard check: cannot load {args.target}:\n{exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(
            json.dumps(
                {
                    "target": args.target,
                    "environment": args.environment,
                    "findings": [asdict(f) for f in findings],
                },
                indent=2,
            )
        )
    else:
        for finding in findings:
            print(finding.text())
        print(f"ctxguard check: {len(findings)} finding(s) in {args.target}")
    return 1 if findings else 0
