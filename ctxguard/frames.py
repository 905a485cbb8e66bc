"""Finding the user's line of code on the stack, cheaply.

A site is ``(code, lasti)``: the code object and instruction offset of the
first frame that is not Flask's, Werkzeug's, ctxguard's or a known
extension's. Keeping the code object keeps no locals alive (unlike a frame or
a traceback), and the line number is worked out from the offset only when
the site is reported.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import NamedTuple

Site = tuple[CodeType, int]

_getframe = sys._getframe

#: Packages whose frames are never the user's code.
LIBRARY_PACKAGES = (
    "ctxguard",
    "flask",
    "werkzeug",
    "flask_sqlalchemy",
    "flask_login",
    "flask_wtf",
    "flask_caching",
    "flask_babel",
    "flask_restful",
    "flask_restx",
    "flask_smorest",
    "flask_migrate",
    "sqlalchemy",
    "asgiref",
    "blinker",
    "opentelemetry",
    "sentry_sdk",
)
#: Frames where the search gives up: the server or the interpreter is calling.
INFRASTRUCTURE_PACKAGES = ("gunicorn", "waitress", "gevent", "eventlet", "uwsgi", "celery")

USER = 0
_LIBRARY = 1
_INFRASTRUCTURE = 2
_STDLIB = 3

#: Kind of each file seen so far, keyed by the code's file name: a str caches
#: its hash, so the lookup is cheap (hashing a code object is not), and every
#: frame of one file is of one kind. Read-only outside this module, where the
#: ledger's push hook uses it to skip the walk when the caller is user code.
file_kinds: dict[str, int] = {}
_library_dirs: tuple[str, ...] = ()
_infrastructure_dirs: tuple[str, ...] = ()
#: The standard library's directories; their site-packages is not the stdlib.
_stdlib: tuple[str, ...] = ()
_ctxguard_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: The demo's bundled app is user code that happens to ship inside ctxguard.
_demo_file = _ctxguard_dir + "demo.py"
#: Where Flask's contexts push themselves and Werkzeug's proxies look them up:
#: never a useful fallback site.
_machinery_files: tuple[str, ...] = ()


def _package_dirs(names: Iterable[str]) -> tuple[str, ...]:
    dirs = []
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            try:
                import importlib.util

                spec = importlib.util.find_spec(name)
            except Exception:
                spec = None
            locations = list(spec.submodule_search_locations or []) if spec else []
        else:
            locations = list(getattr(module, "__path__", []) or [])
        dirs.extend(os.path.abspath(loc) + os.sep for loc in locations)
    return tuple(dirs)


def _stdlib_dirs() -> tuple[str, ...]:
    dirs = set()
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.abspath(path) + os.sep)
    return tuple(dirs)


def refresh() -> None:
    """Work out the library directories again (after new packages were imported)."""
    global _library_dirs, _infrastructure_dirs, _stdlib, _machinery_files
    _library_dirs = _package_dirs(LIBRARY_PACKAGES)
    _infrastructure_dirs = _package_dirs(INFRASTRUCTURE_PACKAGES)
    _stdlib = _stdlib_dirs()
    _machinery_files = tuple(
        getattr(sys.modules.get(name), "__file__", None) or "<none>"
        for name in ("flask.ctx", "werkzeug.local")
    )
    file_kinds.clear()


def _is_stdlib(path: str) -> bool:
    for prefix in _stdlib:
        if path.startswith(prefix):
            return not path[len(prefix) :].startswith(("site-packages", "dist-packages"))
    return False


def _classify(filename: str) -> int:
    if filename.startswith("<"):
        kind = _STDLIB if filename.startswith("<frozen") else USER
    else:
        path = os.path.abspath(filename)
        if path == _demo_file:
            kind = USER
        elif path.startswith(_library_dirs):
            kind = _LIBRARY
        elif path.startswith(_infrastructure_dirs):
            kind = _INFRASTRUCTURE
        elif _is_stdlib(path):
            kind = _STDLIB
        else:
            kind = USER
    if len(file_kinds) > 50_000:
        file_kinds.clear()
    file_kinds[filename] = kind
    return kind


def user_site(depth: int = 2, limit: int = 16) -> Site | None:
    """The site of the caller ``depth`` frames up, skipping library frames."""
    try:
        frame = _getframe(depth)
    except ValueError:
        return None
    return site_from(frame, limit)


def site_from(
    frame: FrameType | None, limit: int = 16, *, through_stdlib: bool = False
) -> Site | None:
    """The first user frame from ``frame`` outwards.

    The search stops at the server's frames, and at the standard library's
    unless ``through_stdlib`` (a proxy touched from ``logging`` or ``copy``
    was touched by the user's code that called them; a context pushed from
    ``threading``'s bootstrap was not). When no user frame is found, the
    first frame that is not ctxguard's, Flask's context machinery or
    Werkzeug's proxies is returned instead (for example Flask's own
    ``stream_with_context`` generator), so a site is never lost.
    """
    fallback = None
    kinds = file_kinds
    while frame is not None and limit:
        code = frame.f_code
        filename = code.co_filename
        kind = kinds.get(filename)
        if kind is None:
            kind = _classify(filename)
        if kind == USER:
            return code, frame.f_lasti
        if (
            fallback is None
            and not filename.startswith(_ctxguard_dir)
            and filename not in _machinery_files
        ):
            fallback = (code, frame.f_lasti)
        if kind == _INFRASTRUCTURE or (kind == _STDLIB and not through_stdlib):
            break
        frame = frame.f_back
        limit -= 1
    return fallback


def stack_text(frame: FrameType | None, limit: int = 32) -> str:
    """A traceback-style listing of the stack from ``frame`` outwards.

    For the ``exception.stacktrace`` of a span event: file, line and function
    of each frame, most recent call last, without reading source files (which
    is what makes ``record_exception`` cost tens of microseconds).
    """
    lines = []
    while frame is not None and limit:
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
        frame = frame.f_back
        limit -= 1
    lines.append("Traceback (most recent call last):")
    lines.reverse()
    return "\n".join(lines)


class Location(NamedTuple):
    """A site as people read it."""

    file: str
    line: int
    function: str


def where(location: Location | None, unknown: str) -> str:
    """``file:line in function`` for log lines, or ``unknown``."""
    if location is None:
        return unknown
    return f"{location.file}:{location.line} in {location.function}"


def describe(site: Site | None) -> Location | None:
    """Turn a site into file, line and function (slow: only when reporting)."""
    if site is None:
        return None
    code, lasti = site
    line = code.co_firstlineno
    for start, end, lineno in code.co_lines():
        if start <= lasti < end and lineno is not None:
            line = lineno
            break
    return Location(
        code.co_filename, line, code.co_qualname if hasattr(code, "co_qualname") else code.co_name
    )


refresh()
