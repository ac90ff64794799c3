"""JAX's persistent compilation cache in the benchmark workers.

The "first call (warm cache)" of a JAX program is its first call in a fresh
process whose persistent cache already holds the program, as in a user's
second run of the same script. The parent gives each JAX unit an empty
directory:

1. the measuring (cold) worker runs with no cache at all; once a unit is
   measured it turns the cache on (`enable`), clears JAX's in-memory caches,
   calls each timed program again, which compiles it once more and writes it
   to the directory, and turns the cache off (`write_programs`);
2. a second fresh worker turns the cache on before anything compiles and times
   only the first call of each timed program: tracing, lowering, the cache
   look-up, loading the executable and the run.

JAX never writes a program that contains a host callback (``pure_callback``,
``debug.callback``: the callback is a pointer into the process that compiled
it), so such a program compiles again in the second process; `CacheEvents`
counts the look-ups and hits, and `callback_targets` names the callbacks.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: Environment variables through which a user's cache settings would reach a
#: worker (``JAX_<option>`` sets every JAX option; neuralode's experiments
#: command reads ``NEURALODE_CACHE_DIR``): all are removed.
_ENV_PREFIXES = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE")
_ENV_NAMES = ("JAX_ENABLE_COMPILATION_CACHE", "NEURALODE_CACHE_DIR")
#: XLA flags naming a cache (autotune results, kernels) are removed likewise.
_XLA_CACHE_FLAG = re.compile(r"--xla_\w*cache\w*(=\S*)?")


def without_cache_settings(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less every JAX and XLA compilation-cache setting."""
    clean = {
        name: value
        for name, value in env.items()
        if not (name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES)
    }
    if "XLA_FLAGS" in clean:
        flags = _XLA_CACHE_FLAG.sub("", clean["XLA_FLAGS"])
        clean["XLA_FLAGS"] = " ".join(flags.split())
    return clean


def enable(directory: str) -> None:
    """Read and write every compiled program in `directory` from now on."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every program, however quick to compile or small; -1 also stops
    # JAX from raising the size threshold for the file system.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()  # the cache is set up at the next compile


def disable() -> None:
    """Back to no persistent cache (the state of a fresh worker)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def write_programs(directory: str, programs: Iterable[tuple[Callable, tuple]]) -> None:
    """Compile each ``(jitted, args)`` afresh with the cache on, so it is stored.

    Tracing alone stores the small programs that tracing runs eagerly; a
    program with a host callback is not compiled again, as JAX would not
    store it anyway.
    """
    import jax

    enable(directory)
    try:
        jax.clear_caches()  # otherwise the calls reuse the in-memory executables
        for program, args in programs:
            if not callback_targets(program.lower(*args).as_text()):
                jax.block_until_ready(program(*args))
    finally:
        disable()


class CacheEvents:
    """Counts the persistent cache's look-ups and hits (``jax.monitoring``)."""

    def __init__(self) -> None:
        import jax

        self.counts: collections.Counter[str] = collections.Counter()
        jax.monitoring.register_event_listener(self._record)

    def _record(self, event: str, **kwargs: Any) -> None:
        if event.startswith("/jax/compilation_cache/"):
            self.counts[event.rsplit("/", 1)[-1]] += 1

    def snapshot(self) -> tuple[int, int]:
        """Look-ups and hits so far."""
        return (
            self.counts["compile_requests_use_cache"],
            self.counts["cache_hits"],
        )


_EVENTS: list[CacheEvents] = []


def events() -> CacheEvents:
    """This process's `CacheEvents` (registered on first use)."""
    if not _EVENTS:
        _EVENTS.append(CacheEvents())
    return _EVENTS[0]


def callback_targets(lowered_text: str) -> set[str]:
    """Host-callback custom calls in a lowered program's text (never cached)."""
    calls = re.findall(r"custom_call @(\w+)", lowered_text)
    return {target for target in calls if "callback" in target}


def warm_note(looked_up: int, hits: int, callbacks: set[str]) -> str | None:
    """What the report says about a warm first call that compiled something."""
    if hits >= looked_up:
        return None
    note = f"warm cache: {hits} of {looked_up} compilations found"
    if callbacks:
        note += " (host callback in the program: JAX never caches it)"
    return note
