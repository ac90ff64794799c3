"""Hybrid systems: a flow interrupted by events, each followed by a state reset.

A bouncing ball is the example: it falls until its height crosses zero, its
velocity is reset (v ← -e·v), and it flies on. `solve_hybrid` runs this as a
`lax.scan` over at most `max_events + 1` segments, each a `solve` with the
event from where the previous one stopped, so the whole trajectory is one
jittable, vmappable and differentiable computation: gradients flow through
each segment's adjoint, each event time (implicit function theorem) and each
reset into the next segment's start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree, Real

from ._event import Event
from ._problem import check_ts
from ._solution import RESULTS
from ._solve import solve
from ._state import present


class HybridSolution(eqx.Module):
    """What `solve_hybrid` returns.

    - `ts`: the output times, as given.
    - `ys`: the trajectory at `ts` (a pytree like `y0`, leading axis `len(ts)`),
      each output from the segment it falls in; an output at an event time is
      the state just before the reset.
    - `event_times`: the times of the events, shape `(max_events,)`, NaN for
      events that did not happen.
    - `num_events`: how many events happened (at most `max_events`).
    - `stats`: the segments' counts added up (`num_steps`, `num_accepted`,
      `num_rejected`, `num_fevals`, `num_jacobians`).
    - `result`: 0 if every segment succeeded, else the first failure's code.
    """

    ts: Real[Array, " times"]
    ys: PyTree[Array]
    event_times: Real[Array, " max_events"]
    num_events: Int[Array, ""]
    stats: dict[str, Int[Array, ""]]
    result: Int[Array, ""]

    @property
    def successful(self) -> Bool[Array, ""]:
        return self.result == RESULTS.successful


def solve_hybrid(
    f: Callable,
    y0: PyTree[ArrayLike],
    ts: ArrayLike,
    args: PyTree = None,
    *,
    event: Event,
    reset: Callable,
    max_events: int,
    **solve_kwargs: Any,
) -> HybridSolution:
    """Solve dy/dt = f(t, y, args) with `y ← reset(t, y, args)` at each event.

    From `ts[0]`, solve until `event` fires (or `ts[-1]`); at the event time t*
    continue from `reset(t*, y(t*), args)`. The trajectory stops at the
    `max_events`-th event (outputs after it are NaN, as after `solve`'s event),
    or reaches `ts[-1]` if fewer events happen.

    Choose the event's `direction` so that the crossing just handled cannot
    fire again at the restart: a ball reset to fly upwards from height zero
    starts each segment with its condition at (or within rounding of) zero,
    which `direction=-1` (falling through zero) ignores. A condition exactly
    zero at a segment's start never fires there. Events that pile up in finite
    time (Zeno behaviour, such as a ball with restitution below 1 coming to
    rest) are cut off by `max_events`.

    **Arguments:** those of `solve` (passed on through `solve_kwargs`), and

    - `event`: the `Event` that ends each segment.
    - `reset(t, y, args)`: the state after an event at time t, a pytree like y.
    - `max_events`: the most events (a Python int ≥ 1): the scan runs
      `max_events` segments of one compiled solve.

    **Returns:** a `HybridSolution`. Everything is jittable and
    differentiable (with respect to y0, args, the parameters of f, cond and
    reset) through the adjoint in `solve_kwargs`.
    """
    if not isinstance(event, Event):
        raise TypeError(
            f"neuralode: solve_hybrid needs event=neuralode.Event(...), got {event!r}"
        )
    if not callable(reset):
        raise TypeError(
            f"neuralode: reset must be callable as reset(t, y, args), got {reset!r}"
        )
    if isinstance(max_events, bool) or not isinstance(max_events, int):
        raise TypeError(f"neuralode: max_events must be an int, got {max_events!r}")
    if max_events < 1:
        raise ValueError(f"neuralode: max_events must be >= 1, got {max_events}")
    if "event" in solve_kwargs:
        raise TypeError("neuralode: pass the event once, as event=")
    ts = check_ts(ts)
    n_out = ts.shape[0]
    direction = jnp.sign(ts[-1] - ts[0])
    # Segment output times: the segment's start, then max(ts[i], start + iδ)
    # in the solve's direction, strictly monotonic whatever the start (outputs
    # at or before the start are placeholders, not used).
    span = jnp.maximum(jnp.abs(ts[0]), jnp.abs(ts[-1]))
    delta = 64 * (jnp.nextafter(span, jnp.inf) - span)
    offsets = delta * jnp.arange(n_out, dtype=ts.dtype)

    def segment_times(start):
        later = jnp.maximum(direction * ts, direction * start + offsets)
        return (direction * later).at[0].set(start)

    def segment(carry, k):
        start, y_start, ys, times, count, stats, result, going = carry
        seg_ts = segment_times(start)
        sol = solve(f, y_start, seg_ts, args, event=event, **solve_kwargs)
        happened = sol.event_happened & going
        event_time = present(sol.event_time)  # solved with an event
        end = jnp.where(happened, event_time, ts[-1])
        # Outputs this segment owns: after its start (from ts[0] for the
        # first), up to its end.
        after = (direction * ts > direction * start) | (k == 0)
        owned = going & after & (direction * ts <= direction * end)
        ys = jax.tree.map(
            lambda acc, new: jnp.where(
                owned.reshape((-1,) + (1,) * (new.ndim - 1)), new, acc
            ),
            ys,
            sol.ys,
        )
        times = times.at[k].set(jnp.where(happened, event_time, jnp.nan))
        y_next = reset(event_time, sol.event_state, args)
        y_next = jax.tree.map(
            lambda new, old: jnp.where(happened, new, old).astype(old.dtype),
            y_next,
            y_start,
        )
        stats = {
            name: value + jnp.where(going, sol.stats[name], 0)
            for name, value in stats.items()
        }
        result = jnp.where(
            (result == RESULTS.successful) & going, sol.result, result
        ).astype(result.dtype)
        start = jnp.where(happened, event_time, ts[-1])
        carry = (
            start, y_next, ys, times, count + happened.astype(jnp.int32), stats,
            result, happened,
        )  # fmt: skip
        return carry, None

    y0 = jax.tree.map(jnp.asarray, y0)
    ys0 = jax.tree.map(lambda x: jnp.full((n_out,) + x.shape, jnp.nan, x.dtype), y0)
    zero = jnp.zeros((), jnp.int32)
    names = ("num_steps", "num_accepted", "num_rejected", "num_fevals")
    stats0 = {name: zero for name in (*names, "num_jacobians")}
    carry0 = (
        ts[0], y0, ys0, jnp.full(max_events, jnp.nan, ts.dtype), zero, stats0,
        zero, jnp.ones((), bool),
    )  # fmt: skip
    carry, _ = lax.scan(segment, carry0, jnp.arange(max_events))
    _, _, ys, times, count, stats, result, _ = carry
    return HybridSolution(ts, ys, times, count, stats, result)
