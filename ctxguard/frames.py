"""Finding the user's line of code on the stack, cheaply.

A site is ``(code, lasti)``: the code object and instruction offset of the
first frame of the application's own code. Keeping the code object keeps no
locals alive (unlike a frame or a traceback), and the line number is worked
out from the offset only when the site is reported.

Which code is the application's follows the rule users know from Sentry's
"in-app" frames: the standard library and installed distributions
(``site-packages``, ``dist-packages``) are library code; the app's own package
is the user's even when it is installed there (the usual container image);
``in_app_include`` and ``in_app_exclude`` (module prefixes) adjust it.
Flask's, Werkzeug's and ctxguard's own frames are never the user's, and the
search stops at a server's frames.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import Any, NamedTuple

Site = tuple[CodeType, int]

_getframe = sys._getframe

#: Packages whose frames are the context machinery itself: never the user's,
#: whatever ``in_app_include`` says.
MACHINERY_PACKAGES = ("ctxguard", "flask", "werkzeug")
#: Frames where the search gives up: the server or the task runner is calling.
INFRASTRUCTURE_PACKAGES = (
    "gunicorn",
    "waitress",
    "gevent",
    "eventlet",
    "uwsgi",
    "uwsgidecorators",
    "bjoern",
    "meinheld",
    "celery",
)
#: Standard-library modules that run work for a server, a thread, a pool or an
#: event loop: the search gives up there too, as at a server's frames. Frames
#: of the rest of the standard library (``contextlib``, ``functools``,
#: ``logging``, ``copy``, ...) were called by the code below them, and the
#: search goes on through them to it.
STDLIB_INFRASTRUCTURE = (
    "threading",
    "asyncio",
    "concurrent.futures",
    "multiprocessing",
    "socketserver",
    "http.server",
    "wsgiref",
    "sched",
)

USER = 0
_LIBRARY = 1
_INFRASTRUCTURE = 2
_STDLIB = 3

#: Kind of each file seen so far, keyed by the code's file name: a str caches
#: its hash, so the lookup is cheap (hashing a code object is not), and every
#: frame of one file is of one kind. Read-only outside this module, where the
#: ledger's push hook uses it to skip the walk when the caller is user code.
file_kinds: dict[str, int] = {}
#: The standard library's directories; their site-packages is not the stdlib.
_stdlib: tuple[str, ...] = ()
_ctxguard_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: The demo's bundled app is user code that happens to ship inside ctxguard.
_demo_file = _ctxguard_dir + "demo.py"
#: Where Flask's contexts push themselves and Werkzeug's proxies look them up:
#: never a useful fallback site.
_machinery_files: tuple[str, ...] = ()
_INSTALLED = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)

#: Module prefixes that are the user's code (``in_app_include``) or not
#: (``in_app_exclude``), and the apps' own packages and directories. Process
#: wide, like the classification they feed; only ever added to while hooked.
_include: set[str] = set()
_exclude: set[str] = set()
_app_packages: set[str] = set()
_app_dirs: tuple[str, ...] = ()


def _in(module: str, prefixes: Iterable[str]) -> bool:
    """Is ``module`` one of ``prefixes`` or inside one of them (``a`` covers
    ``a.b``, not ``ab``)?"""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _stdlib_dirs() -> tuple[str, ...]:
    dirs = set()
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.abspath(path) + os.sep)
    return tuple(dirs)


def refresh() -> None:
    """Forget what was worked out about files (new packages, new options)."""
    global _stdlib, _machinery_files
    _stdlib = _stdlib_dirs()
    _machinery_files = tuple(
        getattr(sys.modules.get(name), "__file__", None) or "<none>"
        for name in ("flask.ctx", "werkzeug.local")
    )
    file_kinds.clear()


def configure(include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
    """Add module prefixes to the user's code (``include``) or to library code."""
    before = (len(_include), len(_exclude))
    _include.update(include)
    _exclude.update(exclude)
    if (len(_include), len(_exclude)) != before:
        file_kinds.clear()


def add_app(import_name: object, root_path: object) -> None:
    """The app's own package and directory are the user's code, installed or not.

    ``import_name`` gives the package (``myapp`` for ``myapp.web``); the
    directory counts only when it is the app's own, not an interpreter-wide
    one (a single-module app installed straight into ``site-packages`` has
    that as its root path).
    """
    global _app_dirs
    changed = False
    if isinstance(import_name, str) and import_name and import_name != "__main__":
        package = import_name.split(".")[0]
        if package not in _app_packages:
            _app_packages.add(package)
            changed = True
    if isinstance(root_path, str) and root_path:
        path = os.path.abspath(root_path) + os.sep
        shared = path.endswith(_INSTALLED) or path in _stdlib
        if not shared and path not in _app_dirs:
            _app_dirs = (*_app_dirs, path)
            changed = True
    if changed:
        file_kinds.clear()


def reset() -> None:
    """Forget the options and the apps (for ``uninstall``)."""
    global _app_dirs
    _include.clear()
    _exclude.clear()
    _app_packages.clear()
    _app_dirs = ()
    file_kinds.clear()
    _described.clear()


def _is_stdlib(path: str) -> bool:
    for prefix in _stdlib:
        if path.startswith(prefix):
            return not path[len(prefix) :].startswith(("site-packages", "dist-packages"))
    return False


def _in_app_dir(path: str) -> bool:
    """Under an app's directory, and not in an environment kept there (``.venv``)."""
    for directory in _app_dirs:
        if path.startswith(directory):
            rest = os.sep + path[len(directory) :]
            return _INSTALLED[0] not in rest and _INSTALLED[1] not in rest
    return False


def _classify(filename: str, module: object) -> int:
    """The kind of a file's frames, given the module name its code runs in."""
    name = module if isinstance(module, str) else ""
    top = name.partition(".")[0]
    path = filename if filename.startswith("<") else os.path.abspath(filename)
    if path == _demo_file:
        kind = USER
    elif path.startswith(_ctxguard_dir) or top in MACHINERY_PACKAGES:
        kind = _LIBRARY
    elif top in INFRASTRUCTURE_PACKAGES:
        kind = _INFRASTRUCTURE
    elif name and _in(name, _include):
        kind = USER
    elif name and _in(name, _exclude):
        kind = _LIBRARY
    elif path.startswith("<"):
        kind = _STDLIB if path.startswith("<frozen") else USER
    elif _is_stdlib(path):
        kind = _INFRASTRUCTURE if _in(name, STDLIB_INFRASTRUCTURE) else _STDLIB
    elif (top and top in _app_packages) or _in_app_dir(path):
        kind = USER
    elif _INSTALLED[0] in path or _INSTALLED[1] in path:
        kind = _LIBRARY
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


def site_from(frame: FrameType | None, limit: int = 16) -> Site | None:
    """The first user frame from ``frame`` outwards.

    Library and standard-library frames are looked through (a context entered
    with ``contextlib.ExitStack``, a proxy touched from ``logging`` or
    ``copy``: the user's code called them). The search stops at a server's,
    a task runner's or the standard library's thread, pool and event-loop
    frames: what lies below them did not make this call. When no user frame
    is found, the first frame that is not ctxguard's, Flask's context
    machinery or Werkzeug's proxies is returned instead (for example Flask's
    own ``stream_with_context`` generator), so a site is never lost.
    """
    fallback = None
    kinds = file_kinds
    while frame is not None and limit:
        code = frame.f_code
        filename = code.co_filename
        kind = kinds.get(filename)
        if kind is None:
            kind = _classify(filename, frame.f_globals.get("__name__"))
        if kind == USER:
            return code, frame.f_lasti
        if (
            fallback is None
            and not filename.startswith(_ctxguard_dir)
            and filename not in _machinery_files
        ):
            fallback = (code, frame.f_lasti)
        if kind == _INFRASTRUCTURE:
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


#: Sites already described, by code identity and offset (hashing a code object walks
#: its bytecode): one line of code reported again and again is worked out once.
_described: dict[tuple[int, int], tuple[Any, Location]] = {}


def describe(site: Site | None) -> Location | None:
    """Turn a site into file, line and function (only when reporting)."""
    if site is None:
        return None
    code, lasti = site
    key = (id(code), lasti)
    known = _described.get(key)
    if known is not None and known[0] is code:
        return known[1]
    location = _describe(code, lasti)
    if len(_described) > 1_000:  # bounded, whatever the sites
        _described.clear()
    _described[key] = (code, location)
    return location


def _describe(code: Any, lasti: int) -> Location:
    line = code.co_firstlineno
    for start, end, lineno in code.co_lines():
        if start <= lasti < end and lineno is not None:
            line = lineno
            break
    return Location(
        code.co_filename, line, code.co_qualname if hasattr(code, "co_qualname") else code.co_name
    )


refresh()
