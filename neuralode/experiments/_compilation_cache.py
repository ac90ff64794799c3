"""JAX's persistent compilation cache, in the user's cache directory.

JAX stores each compiled program under a key that hashes the lowered program,
its compile options, the JAX and jaxlib versions and the backend, so a changed
program (other shapes or dtypes, another solver or tolerance) or another JAX
gets another key and is compiled afresh. An entry that cannot be read (a
truncated or overwritten file) makes JAX warn and compile again; the damaged
file stays, and warns in every run, until the directory is deleted. JAX does
not check that a readable entry is the program of its key: the cache must be
writable by its owner only. The keys include the directory's path, so a cache
that is moved or copied elsewhere starts cold. Programs with a host callback,
as `throw=True`'s failure check is, are never stored.

Tracing and lowering still run in every process: the cache saves the XLA
compilation only.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

#: Environment variables that name the cache directory, in order of precedence.
CACHE_DIR_VARIABLES = ("NEURALODE_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR")

#: Programs that compile faster than this are not stored (JAX's default is 1 s,
#: which would skip most of ours); 0 stores every program, including JAX's
#: small eager operations, which load from disk faster than they compile.
MIN_COMPILE_TIME_SECS = 0.0

# The JAX options that `enable_compilation_cache` sets.
_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def default_cache_dir() -> Path:
    """The directory `enable_compilation_cache` uses when given none.

    The first of `$NEURALODE_CACHE_DIR` and `$JAX_COMPILATION_CACHE_DIR` that is
    set, else `$XDG_CACHE_HOME/neuralode/jax` (XDG base directory
    specification: only an absolute `$XDG_CACHE_HOME` counts), else
    `~/.cache/neuralode/jax`.
    """
    for name in CACHE_DIR_VARIABLES:
        if value := os.environ.get(name):
            return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "neuralode" / "jax"


def enable_compilation_cache(
    directory: str | os.PathLike[str] | None = None,
) -> Path | None:
    """Store compiled programs in `directory` and load them from there.

    Call it before the programs to be cached are compiled. JAX runs what it
    loads from the cache, so a new directory is created for its owner only, and
    one that anyone can write to is refused.

    **Arguments:**

    - `directory`: where to keep the cache; `default_cache_dir()` if None.

    **Returns:**

    The directory in use (absolute), or None if it cannot be created or
    written or anyone can write to it: then a `RuntimeWarning` says so and JAX
    compiles without a persistent cache.
    """
    path = default_cache_dir() if directory is None else Path(directory)
    # Absolute: JAX puts the path into the compile options, and so into the
    # cache keys.
    path = path.expanduser().absolute()
    problem = _check_directory(path)
    if problem is not None:
        warnings.warn(
            f"neuralode: not using {path} as the compilation cache: {problem}; "
            f"compiling without a persistent cache (set {CACHE_DIR_VARIABLES[0]} "
            "to a directory of your own)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _set_options((str(path), MIN_COMPILE_TIME_SECS, -1))  # -1: entries of any size
    return path


@contextlib.contextmanager
def persistent_cache(
    directory: str | os.PathLike[str] | None = None,
) -> Iterator[Path | None]:
    """`enable_compilation_cache` for a `with` block; JAX's settings after it.

    For callers in a process that goes on compiling afterwards (tests calling
    the experiments command, a notebook), which should not find JAX's
    configuration changed. Yields what `enable_compilation_cache` returns.
    """
    previous = tuple(getattr(jax.config, name) for name in _OPTIONS)
    try:
        yield enable_compilation_cache(directory)
    finally:
        _set_options(previous)


def _check_directory(path: Path) -> str | None:
    """Why `path` cannot hold the cache, or None if it can (creating it)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"cannot write to it ({e.strerror or e})"
    if path.stat().st_mode & stat.S_IWOTH:
        return "anyone can write to it, and JAX runs the programs it loads"
    return None


def _set_options(values: tuple[object, ...]) -> None:
    for name, value in zip(_OPTIONS, values, strict=True):
        jax.config.update(name, value)
    # JAX opens its cache at the first compilation and keeps it: start over, so
    # that these settings take effect even after something was compiled.
    jax_cache.reset_cache()
