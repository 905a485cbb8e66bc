"""A garbage collection inside ctxguard never hangs a thread, and leaves the counts exact.

A collection can run in the middle of any code (wherever it allocates), and the
finalisers it runs can re-enter ctxguard: an abandoned streamed response (the
flask#6123 case) reports its leak when finalised. If that re-entry waits on a
lock the same thread already holds (one of ctxguard's, or the OpenTelemetry
SDK's while it collects metrics), the thread hangs for ever, and so does every
later request or metric collection that needs that lock.

Each case runs ``gc_faults.py`` in a subprocess (a hang must not take the test
run with it) with a collection forced inside one critical section, with
abandoned bodies around, and checks that it finishes and that every leak and
every error was counted once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ABANDONED = 20
ERRORS = 30

SECTIONS = {
    "locks": "every lock ctxguard makes, collecting while held",
    "throttle": "the rate limit of spans and log lines",
    "instruments": "making the metric instruments",
    "install": "installing the hooks again",
    "sdk-aggregation": "the OpenTelemetry SDK collecting a counter, holding its lock",
    "sdk-span": "the OpenTelemetry SDK ending ctxguard's span",
    "logging": "a log handler emitting ctxguard's line, holding its lock",
    "ledger-push": "the ledger recording a push",
    "ledger-prune": "the ledger forgetting closed contexts",
    "workers": "the ledger registering a new thread",
}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_a_collection_inside_a_critical_section_neither_hangs_nor_miscounts(section):
    """A collection forced inside the section, with abandoned response bodies whose
    finalisers report leaks: the process finishes (no deadlock), every one of the 20
    leaks and 30 proxy errors is counted exactly once, and the collection really ran
    inside the section."""
    try:
        done = subprocess.run(
            [sys.executable, os.path.join(HERE, "gc_faults.py"), section],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=HERE,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: a collection inside {SECTIONS[section]} deadlocked the thread")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["collections"] >= 1, "no collection ran inside the section"
    assert result["leaks"] == ABANDONED
    assert result["errors"] == ERRORS
    assert result["leak_spans"] >= 1
