"""What a ledger written as Python-level hooks costs before it does anything else.

``app.app_context()`` push+pop (bench.py's (b)) with stripped-down hooks built up
one feature at a time, against bare Flask and against ctxguard's own hooks:

  wrappers   a Python wrapper around Flask's ``push`` and ``pop`` that only calls it
  + worker   each looks the thread's ledger up (a ``threading.local`` attribute)
  + record   push appends a record to that ledger, pop checks the top one and removes it
  + site     the record holds the push site (the caller's code and offset) and the time
  + counters each counts (``next()`` on an ``itertools.count``): every feature the
             ledger keeps for a push from user code, and nothing else
  ctxguard   ``ctxguard.install()``

Each step is measured as time (rounds alternated in one process, as bench.py
does) and, with ``--instructions``, as machine instructions per push+pop under
``valgrind --tool=cachegrind`` (one process per step, collector off; see
instructions.py). The step that crosses the target is the floor of this
design. Standard library and Flask only; always exits 0.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import flask.ctx
from flask import Flask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import time_app_context
from instructions import per_run

import ctxguard

STEPS = ("bare", "wrappers", "+ worker", "+ record", "+ site", "+ counters", "ctxguard")
_PUSH = flask.ctx.AppContext.push
_POP = flask.ctx.AppContext.pop


class _Worker:
    __slots__ = ("open", "request")

    def __init__(self) -> None:
        self.open: list[list[Any]] = []
        self.request: Any = None


def _hooks(step: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The push and pop hooks of one step (each step adds to the one before)."""
    push, pop = _PUSH, _POP
    local = threading.local()
    local.worker = _Worker()
    getframe, monotonic = sys._getframe, time.monotonic
    pushes, pops = itertools.count(), itertools.count()
    level = STEPS.index(step)

    if level == 1:

        def hook_push(self: Any) -> None:
            push(self)

        def hook_pop(self: Any, exc: Any = None) -> None:
            pop(self, exc)

    elif level == 2:

        def hook_push(self: Any) -> None:
            push(self)
            local.worker  # noqa: B018

        def hook_pop(self: Any, exc: Any = None) -> None:
            local.worker  # noqa: B018
            pop(self, exc)

    elif level == 3:

        def hook_push(self: Any) -> None:
            push(self)
            w = local.worker
            w.open.append([self, w.request])

        def hook_pop(self: Any, exc: Any = None) -> None:
            w = local.worker
            records = w.open
            if records and records[-1][0] is self and records[-1][1] is w.request:
                records.pop()
            pop(self, exc)

    elif level == 4:

        def hook_push(self: Any) -> None:
            push(self)
            w = local.worker
            frame = getframe(1)
            w.open.append([self, w.request, (frame.f_code, frame.f_lasti), monotonic()])

        def hook_pop(self: Any, exc: Any = None) -> None:
            w = local.worker
            records = w.open
            if records and records[-1][0] is self and records[-1][1] is w.request:
                records.pop()
            pop(self, exc)

    else:

        def hook_push(self: Any) -> None:
            push(self)
            w = local.worker
            frame = getframe(1)
            w.open.append([self, w.request, (frame.f_code, frame.f_lasti), monotonic()])
            next(pushes)

        def hook_pop(self: Any, exc: Any = None) -> None:
            w = local.worker
            records = w.open
            if records and records[-1][0] is self and records[-1][1] is w.request:
                records.pop()
            pop(self, exc)
            next(pops)

    return hook_push, hook_pop


def use(step: str) -> None:
    """Put the process in the state of ``step``."""
    ctxguard.uninstall()
    flask.ctx.AppContext.push = _PUSH  # type: ignore[method-assign]
    flask.ctx.AppContext.pop = _POP  # type: ignore[method-assign]
    if step == "ctxguard":
        ctxguard.install()
    elif step != "bare":
        hook_push, hook_pop = _hooks(step)
        flask.ctx.AppContext.push = hook_push  # type: ignore[method-assign]
        flask.ctx.AppContext.pop = hook_pop  # type: ignore[method-assign]


def times(rounds: int, n: int) -> dict[str, list[float]]:
    app = Flask("floor")
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    for r in range(rounds):
        order = STEPS if r % 2 == 0 else tuple(reversed(STEPS))
        for step in order:
            use(step)
            time_app_context(app, n // 10, time.process_time)
            gc.collect()
            samples[step].append(time_app_context(app, n, time.process_time))
        print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    use("bare")
    return samples


def _child(step: str, n: int) -> None:
    app = Flask("floor")
    use(step)
    time_app_context(app, 200, time.process_time)
    gc.collect()
    gc.disable()
    time_app_context(app, n, time.process_time)


def instructions(step: str, n: int) -> float:
    return per_run([sys.executable, os.path.abspath(__file__), "--child", step], n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("-n", type=int, default=20000, help="push+pop pairs per round")
    parser.add_argument("--cpu", type=int, help="pin the process to this one CPU (Linux)")
    parser.add_argument(
        "--instructions", action="store_true", help="also count instructions (valgrind)"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return 0
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    counted: dict[str, float] = {}
    if args.instructions:
        if shutil.which("valgrind") is None:
            print("valgrind not found (Debian: apt-get install valgrind): times only")
        else:
            counted = {step: instructions(step, args.n) for step in STEPS}
    samples = times(args.rounds, args.n)
    bare = statistics.median(samples["bare"])
    print(f"Python {sys.version.split()[0]}, Flask {_flask_version()}; {args.rounds} rounds")
    print(f"{'step':12} {'us/pair':>8} {'ratio':>6} {'instr/pair':>11} {'ratio':>6}")
    for step in STEPS:
        median = statistics.median(samples[step])
        line = f"{step:12} {median * 1e6:8.3f} {median / bare:6.3f}"
        if counted:
            line += f" {counted[step]:11,.0f} {counted[step] / counted['bare']:6.3f}"
        print(line)
    return 0


def _flask_version() -> str:
    from importlib.metadata import version

    return version("flask")


if __name__ == "__main__":
    sys.exit(main())
