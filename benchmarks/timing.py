"""Timing, the fori-loop "limit", evaluation counting and compiled memory.

Timing method: the first call (for JAX: trace + compile + first run) is timed on
its own, then the function is called ``R`` times, ``R`` chosen so the repeats
take about `target_s` seconds (at least `min_repeats`, fewer only when a single
call is so slow that `max_total_s` would be exceeded). Every call waits for its
result (``block_until_ready``). When a limit program is given, it is called
after each repeat (interleaved), so solver and limit see the same machine load;
time / limit is the median of the per-repeat ratios.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    """How long and how often to repeat a measurement."""

    target_s: float = 2.0
    min_repeats: int = 5
    max_repeats: int = 200
    max_total_s: float = 10.0
    floor_repeats: int = 3


QUICK_TIMING = TimingSettings(
    target_s=0.05, min_repeats=2, max_repeats=5, max_total_s=1.0, floor_repeats=1
)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Result of `measure`: first call and repeat statistics, in seconds."""

    first_call_s: float
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    limit_s: float | None = None
    time_over_limit: float | None = None


def _repeats_for(one_call_s: float, settings: TimingSettings) -> int:
    wanted = math.ceil(settings.target_s / max(one_call_s, 1e-9))
    repeats = min(max(wanted, settings.min_repeats), settings.max_repeats)
    if repeats * one_call_s > settings.max_total_s:
        fit = int(settings.max_total_s / max(one_call_s, 1e-9))
        repeats = max(settings.floor_repeats, min(repeats, fit))
    return repeats


def _once(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - start, out


def first_call(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> tuple[float, Any]:
    """Seconds taken by the first call (trace + compile + run) and its output."""
    return _once(fn, sync)


def repeat(
    fn: Callable[[], Any],
    sync: Callable[[Any], Any],
    settings: TimingSettings,
    first_call_s: float,
    limit: Callable[[], Any] | None = None,
) -> Timing:
    """Repeat ``sync(fn())``, interleaved with calls of the `limit` program."""
    if limit is not None:
        _once(limit, jax_sync)  # compile the limit outside the measurement
    samples: list[float] = []
    limits: list[float] = []
    repeats = 1
    while len(samples) < repeats:
        samples.append(_once(fn, sync)[0])
        if limit is not None:
            limits.append(_once(limit, jax_sync)[0])
        if len(samples) == 1:
            repeats = _repeats_for(samples[0] + sum(limits), settings)
    ratio = None
    if limits:
        ratio = statistics.median(a / b for a, b in zip(samples, limits, strict=True))
    return Timing(
        first_call_s=first_call_s,
        median_s=statistics.median(samples),
        min_s=min(samples),
        max_s=max(samples),
        repeats=len(samples),
        limit_s=statistics.median(limits) if limits else None,
        time_over_limit=ratio,
    )


def time_call(
    fn: Callable[[], Any],
    sync: Callable[[Any], Any],
    settings: TimingSettings,
) -> tuple[Timing, Any]:
    """First call and repeats of ``sync(fn())``; returns the first call's output."""
    first_s, out = first_call(fn, sync)
    return repeat(fn, sync, settings, first_s), out


def jax_sync(out: Any) -> Any:
    """Block until every array in `out` is computed."""
    import jax

    return jax.block_until_ready(out)


def limit_program(field: Callable, n_fwd: int, n_bwd: int = 0) -> Callable:
    """A jitted loop of exactly `n_fwd` evaluations of `field` then `n_bwd` VJPs.

    The state is carried through an Euler-like update so that no evaluation can
    be hoisted out of the loop or removed; each backward iteration evaluates
    the field and its VJP with respect to the state and the parameters, as one
    step of a backsolve adjoint does.
    """
    import jax
    import jax.numpy as jnp

    tmap = jax.tree_util.tree_map

    def program(y0: Any, params: Any, t: Any) -> Any:
        leaf = jax.tree_util.tree_leaves(y0)[0]
        h = jnp.asarray(1e-4, leaf.dtype)

        def fwd_body(i: Any, y: Any) -> Any:
            return tmap(lambda a, b: a + h * b, y, field(t, y, params))

        y = jax.lax.fori_loop(0, n_fwd, fwd_body, y0)
        if n_bwd == 0:
            return y

        def bwd_body(i: Any, carry: Any) -> Any:
            y, cot, gacc = carry
            dy, vjp = jax.vjp(lambda yy, pp: field(t, yy, pp), y, params)
            gy, gp = vjp(cot)
            y = tmap(lambda a, b: a - h * b, y, dy)
            cot = tmap(lambda a, b: a + h * b, cot, gy)
            gacc = tmap(lambda a, b: a + h * b, gacc, gp)
            return y, cot, gacc

        zeros = tmap(jnp.zeros_like, params)
        return jax.lax.fori_loop(0, n_bwd, bwd_body, (y, y, zeros))

    return jax.jit(program)


def limit_callable(
    field: Callable, y0: Any, params: Any, t: Any, n_fwd: int, n_bwd: int = 0
) -> Callable[[], Any]:
    """A zero-argument call of `limit_program` on the problem's inputs."""
    program = limit_program(field, n_fwd, n_bwd)
    return lambda: program(y0, params, t)


class EvalCounter:
    """Counts vector-field evaluations through a host callback (counting runs only)."""

    def __init__(self) -> None:
        self.count = 0

    def _bump(self) -> None:
        self.count += 1

    def wrap(self, field: Callable) -> Callable:
        """`field` with a ``jax.debug.callback`` that increments the count."""
        import jax

        def counted(t: Any, y: Any, params: Any) -> Any:
            jax.debug.callback(self._bump)
            return field(t, y, params)

        return counted

    def measure(self, fn: Callable[[], Any]) -> int:
        """Evaluations made by one call of `fn` (waiting for pending callbacks)."""
        import jax

        self.count = 0
        jax_sync(fn())
        jax.effects_barrier()
        return self.count


def compiled_temp_bytes(jitted: Any, *args: Any) -> int | None:
    """XLA's temporary-buffer size for ``jitted(*args)``, or None if unavailable."""
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
        return int(analysis.temp_size_in_bytes)
    except Exception:  # backends without memory analysis
        return None
