"""How the kernels are compiled, and the on-disk cache that follows the whole package.

Theory of operation
-------------------
Every kernel is compiled by numba without the GIL (``nogil``), with numpy's
error model (no exceptions: nothing here raises) and without numba's
reference-counting runtime (nothing here allocates: the kernels borrow
memory that callers keep alive).  It is compiled at its first call, for the
argument types of that call, and its machine code is kept on disk.

numba's own on-disk cache (``cache=True``) is keyed on the one source file
that holds the function: each function's index records a hash of that file
and is void when the file changes.  A kernel's machine code, however, holds
more than its own file: the helpers it calls or inlines, the intrinsics that
emit its loads and stores, the layout and spec constants it compiles in, all
from other modules of this package.  Under numba's key, a change in one of
them would leave every caller's cached code stale.

So the kernels of this package are cached under a key of the whole package,
:data:`SOURCE_KEY`, the SHA-256 of every source file in it, taken when the
package is imported.  The key names the cache directory
(``numba-<first 16 hex digits>``) and is the source stamp numba writes in
each index: any change in any file of the package starts a new directory,
where everything compiles afresh, and the directories of other keys beside
it are removed then.  Within a directory numba's index still tells apart
signatures, CPUs (including ``NUMBA_CPU_NAME``) and numba versions.

The directory lies where numba would put a cache: under
``$NUMBA_CACHE_DIR`` when it is set, else in the package's ``__pycache__``,
else in numba's user-wide cache directory, whichever is writable first.  A
cache that cannot be written costs the next start a compilation, nothing
else: the compiled code is in memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FunctionType
from typing import Any, TypeVar, cast

import numba
from numba.core import caching as _caching
from numba.core import config as _config
from numba.core.dispatcher import Dispatcher
from numba.misc import appdirs as _appdirs

__all__ = [
    "OPTIONS",
    "PACKAGE",
    "SOURCE_KEY",
    "PackageCache",
    "cache_dir",
    "inlined",
    "kernel",
    "source_key",
]

F = TypeVar("F", bound=Callable[..., Any])

# numba's cache machinery and configuration carry no annotations.
caching: Any = _caching
config: Any = _config
appdirs: Any = _appdirs

PACKAGE = Path(__file__).resolve().parent
"""The directory of the kernels package: every ``*.py`` in it is part of the key."""

# Any: ``_nrt`` is not among the options numba's annotations list.
OPTIONS: dict[str, Any] = {
    "nogil": True,
    "error_model": "numpy",
    # Nothing here allocates: arrays are borrowed from callers that keep them alive.
    "_nrt": False,
}
"""numba options of every kernel."""

_DIR_PREFIX = "numba-"
_KEY_DIGITS = 16


def source_key(package: Path = PACKAGE) -> str:
    """The SHA-256 of the package's source files (names and contents), in hex."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        for part in (path.name.encode(), path.read_bytes()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


SOURCE_KEY = source_key()
"""The key of the sources this process compiles (taken at import, before any kernel is defined)."""


def _bases() -> list[Path]:
    """Where a cache directory may go, in numba's order of preference."""
    # numba's name for a source directory in a shared cache: its name and a hash of its path.
    tag = caching._CacheLocator.get_suitable_cache_subpath(str(PACKAGE / "__init__.py"))
    user_wide = Path(appdirs.AppDirs(appname="numba", appauthor=False).user_cache_dir) / tag
    in_tree = PACKAGE / "__pycache__"
    if config.CACHE_DIR:
        return [Path(config.CACHE_DIR) / tag, in_tree, user_wide]
    return [in_tree, user_wide]


@functools.cache
def cache_dir() -> Path | None:
    """The directory of this key's machine code, None when no place is writable.

    Created on first use; when this process creates it, the directories of
    other keys beside it are removed.
    """
    for base in _bases():
        path = base / f"{_DIR_PREFIX}{SOURCE_KEY[:_KEY_DIGITS]}"
        try:
            created = not path.is_dir()
            path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        except OSError:
            continue
        if created:
            for stale in base.glob(f"{_DIR_PREFIX}*"):
                if stale != path and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
        return path
    return None


class _PackageLocator(caching._CacheLocator):  # type: ignore[misc]
    """numba's cache locator for the package's functions: :func:`cache_dir`, :data:`SOURCE_KEY`."""

    def __init__(self, py_func: FunctionType, py_file: str, path: Path) -> None:
        # numba's warnings about uncachable functions name the file.
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._path = path

    def get_cache_path(self) -> str:
        return str(self._path)

    def get_source_stamp(self) -> str:
        return SOURCE_KEY

    def get_disambiguator(self) -> str:
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func: FunctionType, py_file: str) -> _PackageLocator | None:
        path = cache_dir()
        if path is None or Path(py_file).resolve().parent != PACKAGE:
            return None
        return cls(py_func, py_file, path)


class _PackageCacheImpl(caching.FunctionCache._impl_class):  # type: ignore[misc]
    _locator_classes = [_PackageLocator]


class PackageCache(caching.FunctionCache):  # type: ignore[misc]
    """numba's per-function cache, located by the package's key instead of the function's file."""

    _impl_class = _PackageCacheImpl

    def save_overload(self, sig: object, data: object) -> None:
        # Unwritable, or removed under us by a start with other sources.
        with contextlib.suppress(OSError):
            super().save_overload(sig, data)


def _compile(fn: F, options: dict[str, Any]) -> Dispatcher[F]:
    dispatcher = cast("Dispatcher[F]", numba.njit(**options)(fn))
    if cache_dir() is not None:
        # What ``cache=True`` would install (Dispatcher.enable_caching), under our key.
        dispatcher._cache = PackageCache(fn)  # type: ignore[attr-defined]
    return dispatcher


def kernel(fn: F) -> Dispatcher[F]:
    """Compile ``fn`` without the GIL at its first call, its machine code cached on disk.

    The dispatcher takes the arguments ``fn`` is annotated with; numba
    infers their machine types at each new combination.
    """
    return _compile(fn, OPTIONS)


def inlined(fn: F) -> Dispatcher[F]:
    """Like :func:`kernel`, and inlined into its callers at numba's IR level.

    For the per-chain steps of the hot loops: a call between separately
    compiled functions passes every array field on the stack and returns
    through memory, which costs more than these steps themselves.
    """
    return _compile(fn, {"inline": "always", **OPTIONS})
