"""Events: stop a solve where a condition cond(t, y, args) crosses zero.

Detection happens in the step loop: after every accepted step from t_n to
t_n + h the loop evaluates each condition at the step's end, and a sign change
from the value at t_n (in the condition's direction) stops the loop *before*
that step is taken: the loop ends at (t_n, y_n) with the step size h of the
step that crosses (`EventStop`). Everything after that is ordinary, fully
differentiable JAX (`locate`): the crossing step is recomputed from (t_n, y_n),
and the event time is the root of g(θ) = cond(t_n + θh, y(t_n + θh)) on its
dense-output interpolant, θ ∈ [0, 1], found by `_event_root.crossing_fraction`
and differentiated by the implicit function theorem. The gradient of the event
time therefore reaches y_n (and through the adjoint's rule y0 and the
parameters) without any adjoint knowing about events, and

    dt*/dp = -(∂g/∂p + ∂g/∂y·∂y/∂p) / (∂g/∂t + ∂g/∂y·f)

holds to rounding, with ∂y/∂p and f those of the discrete solve's interpolant.

A condition that crosses zero and back within one step has the same sign at
both ends of it. The loop also evaluates each condition's rate dg/dt along
the solution (one JVP of cond per step, with f at the step's end, which the
step has computed already); where the cubic Hermite interpolant of g through
the values and rates at the two ends has the other sign at one of a few
points inside the step (`hidden_crossing`), the step is retried once,
ending at the first such point, so that the crossing shows as a sign
change. A dip too brief for that cubic and those points to see is missed
(documented on `Event`). A condition that is
exactly zero at the first time does not fire there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from . import _interpolation as interp
from ._event_root import crossing_fraction
from ._state import State


class Event(eqx.Module):
    """Stop the solve at the first time a condition crosses zero.

    `cond(t, y, args)` returns a real scalar (a function, a closure over traced
    arrays, or an `equinox.Module` whose arrays are parameters). The solve stops
    at the first crossing: `direction=+1` fires only from negative to positive,
    `-1` only from positive to negative and `0` either way, "from" and "to"
    in the order the solve runs (a backward-in-time solve runs from `ts[0]`
    down to `ts[-1]`). A list of conditions fires on the first of them to
    cross; `direction` is then one value for all or one per condition, and
    `Solution.event_index` tells which fired.

    The event time is located on the dense-output interpolant of the step
    across which a condition changes sign, to a few units in the last place,
    and is differentiable (implicit function theorem).

    A crossing and re-crossing within one step (no sign change at the step's
    ends) is found where the cubic through the condition's values and rates
    dg/dt at the two ends reveals it (the step is then retried, shorter; with
    adaptive steps only). A dip much briefer than the step that this cubic
    misses is not detected: tighten `rtol`, or use small fixed steps, if such
    grazing events matter. A condition exactly zero at the initial time does
    not fire there, nor when it leaves zero; it fires at its next crossing.
    """

    cond: Callable | tuple[Callable, ...]
    direction: int | tuple[int, ...] = eqx.field(default=0, static=True)

    def __init__(self, cond: Callable | Sequence[Callable], direction: Any = 0):
        if isinstance(cond, Sequence) and not isinstance(cond, str):
            cond = tuple(cond)
            if not cond:
                raise ValueError("neuralode: Event needs at least one condition")
            for i, c in enumerate(cond):
                if not callable(c):
                    raise TypeError(
                        f"neuralode: Event condition {i} must be callable as "
                        f"cond(t, y, args), got {c!r}"
                    )
        elif not callable(cond):
            raise TypeError(
                "neuralode: Event(cond) needs cond(t, y, args) -> scalar, or a "
                f"list of such functions; got {cond!r}"
            )
        count = len(cond) if isinstance(cond, tuple) else 1
        self.cond = cond
        self.direction = _check_directions(direction, count)

    @property
    def conditions(self) -> tuple[Callable, ...]:
        """The conditions, as a tuple."""
        return self.cond if isinstance(self.cond, tuple) else (self.cond,)

    @property
    def directions(self) -> tuple[int, ...]:
        """One direction per condition."""
        if isinstance(self.direction, tuple):
            return self.direction
        return (self.direction,) * len(self.conditions)


def _check_directions(direction: Any, count: int) -> int | tuple[int, ...]:
    def one(d: Any) -> int:
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d not in (
            -1, 0, 1,
        ):  # fmt: skip
            raise ValueError(
                f"neuralode: Event direction must be -1, 0 or +1, got {d!r}"
            )
        return int(d)

    if isinstance(direction, Sequence) and not isinstance(direction, str):
        if len(direction) != count:
            raise ValueError(
                f"neuralode: Event has {count} condition(s) but {len(direction)} "
                "directions; give one direction for all or one per condition"
            )
        return tuple(one(d) for d in direction)
    return one(direction)


class EventFunction(NamedTuple):
    """The loop's view of an event: `values(τ, y) -> (k,)` condition values on
    flat states, and each condition's direction in the loop's time τ."""

    values: Callable[[Array, State], Array]
    directions: tuple[int, ...]


class EventStop(NamedTuple):
    """Where a loop with an event stopped: `hit` whether a condition crossed,
    `fired` which ones did across the stopping step, `t_rel` the time t_n the
    loop reached (from its origin τ_0), `h` the size of the crossing step from
    there, `carry` the method's carry for that step (None if it has none)."""

    hit: Bool[Array, ""]
    fired: Bool[Array, " k"]
    t_rel: Float[Array, ""]
    h: Float[Array, ""]
    carry: Any = None


def crossed(g_prev: Array, g_new: Array, directions: tuple[int, ...]) -> Array:
    """Which conditions changed sign from g_prev to g_new in their direction.

    Up means g_prev < 0 <= g_new, down g_prev > 0 >= g_new: a condition at
    exactly zero does not fire when it leaves zero, and NaN never fires.
    """
    up = (g_prev < 0) & (g_new >= 0)
    down = (g_prev > 0) & (g_new <= 0)
    d = np.asarray(directions)
    return jnp.where(d > 0, up, jnp.where(d < 0, down, up | down))


#: Where `hidden_crossing` reads the cubic inside a step.
HIDDEN_SAMPLES = tuple(k / 8 for k in range(1, 8))


def hidden_crossing(
    g0: Array, m0: Array, g1: Array, m1: Array, directions: tuple[int, ...]
) -> tuple[Array, Array]:
    """Whether a condition seems to cross zero and back within a step, and where.

    With g0, g1 the values at the step's ends and m0, m1 the derivatives along
    the step times its size (h·dg/dt), the cubic Hermite interpolant
    p(θ) = (2θ³ - 3θ² + 1)g0 + (θ³ - 2θ² + θ)m0 + (3θ² - 2θ³)g1 + (θ³ - θ²)m1
    approximates g on θ ∈ [0, 1]. Where g0 and g1 have the same sign but p
    has the other sign (in the condition's direction) at one of
    `HIDDEN_SAMPLES`, returns True and the first such θ, else False and 1.
    Multiply-adds only, no division: the check runs on every step.
    """
    d = np.asarray(directions)
    up_possible = (g0 < 0) & (g1 < 0) & (d >= 0)
    down_possible = (g0 > 0) & (g1 > 0) & (d <= 0)
    best = jnp.ones_like(g0)
    for theta in reversed(HIDDEN_SAMPLES):
        t2, t3 = theta * theta, theta * theta * theta
        p = (
            (2 * t3 - 3 * t2 + 1) * g0
            + (t3 - 2 * t2 + theta) * m0
            + (3 * t2 - 2 * t3) * g1
            + (t3 - t2) * m1
        )
        flips = (up_possible & (p >= 0)) | (down_possible & (p <= 0))
        best = jnp.where(flips, theta, best)
    return best < 1, best


def event_function(problem: Any, params: Any, direction: Array) -> EventFunction | None:
    """The event of a problem with a condition (see `_problem.EventCondition`),
    bound to its parameters; None for a problem without one."""
    condition = getattr(problem, "condition", None)
    if condition is None:
        return None
    return EventFunction(
        lambda tau, y: condition.values(tau, y, params, direction),
        condition.directions,
    )


class Located(NamedTuple):
    """The event inside the crossing step: `tau` its time (in τ), `y` the state
    there, `index` the condition that fired first, `ys` the outputs with those
    inside the step read off its interpolant (NaN after the event), `fevals`
    the vector-field evaluations the recomputed step cost."""

    tau: Array
    y: State
    index: Array
    ys: State
    fevals: Array


def locate(
    config: Any,
    problem: Any,
    params: Any,
    direction: Array,
    tau: Array,
    ys: State,
    stop: EventStop,
) -> Located:
    """Find the event in the step the loop stopped before (differentiably).

    `ys` are the loop's outputs at `tau`, frozen at the stopping state y_n
    after t_n (so ys[-1] is y_n when an event happened). Without an event the
    time is τ[-1], the state ys[-1] and the outputs are unchanged.
    """
    origin = tau[0]
    solver = config.solver
    condition = problem.condition
    real = jnp.real(ys[0]).dtype
    y_n = tuple(leaf[-1] for leaf in ys)
    t_n = lax.stop_gradient(stop.t_rel)
    h = lax.stop_gradient(stop.h)

    def f(s, y):
        return problem.f_flat(origin + s, y, params, direction)

    def found():
        carried = {} if stop.carry is None else {"carry": stop.carry}
        step = solver.step(
            f, t_n, y_n, f(t_n, y_n), h, dense=True,
            tolerances=(config.rtol, config.atol), **carried,
        )  # fmt: skip
        coeffs = tuple(jnp.stack(list(d)) for d in step.dense)

        def state_at(theta):
            return tuple(
                interp.evaluate(y, c, theta) for y, c in zip(y_n, coeffs, strict=True)
            )

        def g(i):
            return lambda theta: condition.values(
                origin + t_n + theta.astype(h.dtype) * h,
                state_at(theta),
                params,
                direction,
            )[i].astype(real)

        # A few units in the last place of the event time, in units of θ.
        end = jnp.abs(origin + t_n) + jnp.abs(h)
        tol = 4 * jnp.finfo(real).eps * end / jnp.abs(h)
        thetas = []
        for i in range(len(condition.directions)):
            theta = crossing_fraction(g(i), tol, real)
            # The loop saw this condition cross; a root lost to rounding in
            # the recomputed step sits at the step's end.
            theta = jnp.where(jnp.isnan(theta), 1, theta)
            thetas.append(jnp.where(stop.fired[i], theta, jnp.inf))
        thetas = jnp.stack(thetas)
        index = jnp.argmin(thetas).astype(jnp.int32)
        theta = jnp.clip(thetas[index], 0, 1)
        y_event = state_at(theta)
        # Outputs inside the crossing step, up to the event, from its interpolant.
        since = ((tau - origin - t_n) / h).astype(real)
        inside = (since > 0) & (since <= theta)
        after = since > theta
        ys_out = tuple(
            jnp.where(
                after[:, None],
                jnp.nan,
                jnp.where(
                    inside[:, None],
                    jax.vmap(lambda s, y=y, c=c: interp.evaluate(y, c, s))(
                        jnp.clip(since, 0, 1)
                    ),
                    leaf,
                ),
            ).astype(leaf.dtype)
            for leaf, y, c in zip(ys, y_n, coeffs, strict=True)
        )
        fevals = jnp.asarray(
            1 + (solver.fevals_per_step or 0)
            if step.cost is None
            else 1 + step.cost[0],
            jnp.int32,
        )
        tau_event = origin + t_n + theta.astype(h.dtype) * h
        return Located(tau_event, y_event, index, ys_out, fevals)

    def none():
        return Located(
            tau[-1],
            y_n,
            jnp.zeros((), jnp.int32),
            ys,
            jnp.zeros((), jnp.int32),
        )

    return lax.cond(stop.hit, found, none)
