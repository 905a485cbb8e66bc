"""ctxguard's overhead as machine instructions per operation (deterministic).

Timings on a shared machine move by 10-30 % from round to round; instruction
counts do not. This runs each operation of ``bench.py`` under
``valgrind --tool=cachegrind`` (no cache simulation) twice, with ``N`` and
``2N`` operations after the same warm-up, so the difference is the cost of
``N`` operations and nothing else (start-up, imports and warm-up cancel out;
the garbage collector is off while they run, see ``_child``).
Each variant runs in a process of its own: bare (``ctxguard.uninstall()``) and
guarded (``ctxguard.install()``, and ``CtxGuard`` for (a)).

Instructions are not time: a Python call or an allocation runs at a lower
rate than Flask's own straight-line code, so a ratio of instructions is a
lower bound of the ratio of times. Use it to see what a change saves; use
``bench.py`` for the time ratios the targets are about.

Needs ``valgrind`` (Debian: ``apt-get install valgrind``). Standard library
only; always exits 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

#: Operation -> (what it is, operations per unit N).
OPERATIONS = {
    "a": "hello-world request through wsgi_app",
    "b": "app_context() push+pop",
    "c": "request.method in a request",
    "thread": "Thread start+join",
    "executor": "executor submit+result",
}
#: bare: ``uninstall()``; hooks: ``install()`` only (no middleware); guarded: ``install()``,
#: and ``CtxGuard`` on the app for (a).
VARIANTS = ("bare", "hooks", "guarded")


def _child(operation: str, variant: str, n: int) -> None:
    """Run ``n`` operations in the state ``variant`` names (inside valgrind)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench  # the operations, as bench.py times them

    import ctxguard

    app = bench.make_app("app")
    if variant != "bare":
        if operation == "a" and variant == "guarded":
            ctxguard.CtxGuard(app, environment="production")
        ctxguard.install()
    else:
        ctxguard.uninstall()
    clock = _no_clock
    run: dict[str, Any] = {
        "a": lambda k: bench.time_requests(app.wsgi_app, k, clock),
        "b": lambda k: bench.time_app_context(app, k, clock),
        "c": lambda k: bench.time_proxy_reads(app, k, clock),
        "thread": lambda k: bench.time_threads(k, clock),
        "executor": lambda k: bench.time_executor(k, clock),
    }
    run[operation](200)  # warm-up: caches, specialised bytecode, first-request work
    # A full collection walks every object of the process (millions of
    # instructions): whether one falls in the N or the 2N run would swamp the
    # difference. Garbage made per operation still shows in bench.py's times.
    gc.collect()
    gc.disable()
    run[operation](n)


def _no_clock() -> float:
    return 1.0


def valgrind_count(command: list[str]) -> int:
    """Instructions the whole process ``command`` ran, under cachegrind."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                f"--cachegrind-out-file={os.path.join(tmp, 'cg.out')}",
                *command,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    match = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"valgrind run failed ({command[2:]}):\n{proc.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def per_run(command: list[str], n: int) -> float:
    """Instructions per operation of ``command + [N]``: its run with 2n operations
    minus its run with n (start-up, imports and warm-up cancel out)."""
    return (valgrind_count([*command, str(2 * n)]) - valgrind_count([*command, str(n)])) / n


def per_operation(operation: str, variant: str, n: int, python: str) -> float:
    script = os.path.abspath(__file__)
    return per_run([python, script, "--child", operation, variant], n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        default=",".join(OPERATIONS),
        help="comma-separated operations among " + ", ".join(OPERATIONS),
    )
    parser.add_argument("-n", type=int, default=0, help="operations per step (default: per op)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure")
    parser.add_argument("--child", nargs=3, metavar=("OP", "VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        operation, variant, n = args.child
        _child(operation, variant, int(n))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind not found (Debian: apt-get install valgrind)")
        return 0
    defaults = {"a": 2000, "b": 20000, "c": 50000, "thread": 500, "executor": 2000}
    print(f"instructions per operation, {args.python}")
    print(f"{'operation':40} {'bare':>10} {'hooks':>10} {'guarded':>10} {'added':>9} {'ratio':>7}")
    for operation in args.only.split(","):
        n = args.n or defaults[operation]
        bare = per_operation(operation, "bare", n, args.python)
        guarded = per_operation(operation, "guarded", n, args.python)
        # Only (a) has a middleware: elsewhere "hooks" and "guarded" are the same state.
        hooks = per_operation(operation, "hooks", n, args.python) if operation == "a" else None
        print(
            f"{operation + ' ' + OPERATIONS[operation]:40} {bare:10,.0f}"
            f" {'' if hooks is None else f'{hooks:,.0f}':>10} {guarded:10,.0f}"
            f" {guarded - bare:+9,.0f} {guarded / bare:7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
