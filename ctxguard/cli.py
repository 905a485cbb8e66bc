"""The ``ctxguard`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        from .integrations.check import main as check

        return check(argv[1:])
    parser = argparse.ArgumentParser(prog="ctxguard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="run a small Flask app that leaks contexts and show what ctxguard records",
    )
    commands.add_parser(
        "check",
        help="load an app (module:app, module:create_app()) and report contexts left open"
        " and proxies touched at import, and production policy findings (for CI)",
        add_help=False,
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run()
    return 2


if __name__ == "__main__":
    sys.exit(main())
