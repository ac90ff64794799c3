"""`solve` and `odeint`: the public entry points of the solver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoint import AbstractAdjoint, BacksolveAdjoint
from ._adjoint_common import direction_and_tau
from ._controller import AbstractController, ConstantStepSize, PIController
from ._event import Event, locate
from ._failure import nan_tangents_unless, raise_if_failed, tie
from ._integrate import LoopStats, SolverConfig
from ._interpolating_adjoint import InterpolatingAdjoint
from ._problem import (
    check_precision,
    check_steps,
    check_throw,
    check_tolerances,
    check_ts,
    make_problem,
)
from ._solution import RESULTS, Solution
from ._solvers import AbstractSolver, Dopri5
from ._state import present


def solve(
    f: Callable,
    y0: PyTree[ArrayLike],
    ts: ArrayLike,
    args: PyTree = None,
    *,
    solver: AbstractSolver = Dopri5(),
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    max_steps: int = 4096,
    adjoint: AbstractAdjoint = BacksolveAdjoint(),
    controller: PIController | ConstantStepSize = PIController(),
    throw: bool = True,
    event: Event | None = None,
) -> Solution:
    """Solve dy/dt = f(t, y, args) from ts[0] and return y at every time of ts.

    The solver steps freely (adaptively for embedded pairs) and reads the values
    at `ts` off its dense-output interpolant, so many output times cost no extra
    steps. `ts` may decrease, which solves backwards in time.

    **Arguments:**

    - `f`: the vector field `f(t, y, args)`, returning a pytree like `y`: a
      function, a closure over (traced) arrays, or an `equinox.Module` whose array
      leaves are parameters. Gradients reach all three and `args`.
    - `y0`: the initial state at `ts[0]`, any pytree of floating arrays.
    - `ts`: a 1-D array of at least two strictly monotonic output times.
    - `args`: passed to `f` unchanged.
    - `solver`: an explicit Runge–Kutta method (`Dopri5()` by default).
    - `rtol`, `atol`: tolerances of the weighted RMS error norm
      `sqrt(mean((err / (atol + rtol·max(|y_n|, |y_{n+1}|)))²))`.
    - `dt0`: the first step size; `None` chooses it automatically (Hairer's
      algorithm). Fixed-step solvers use it for every step.
    - `max_steps`: the most steps (accepted and rejected) before failing.
    - `adjoint`: how reverse-mode derivatives are computed (`BacksolveAdjoint`,
      `CheckpointAdjoint`, `ReversibleAdjoint`, `InterpolatingAdjoint` or
      `ForwardMode`).
    - `controller`: `PIController()` (adaptive steps) or `ConstantStepSize()`
      (every step `dt0`, even for an embedded pair).
    - `throw`: raise on failure (at run time, under `jit` too); with `False` the
      failure is returned in `Solution.result`.
    - `event`: an `Event`: stop at the first time one of its conditions
      crosses zero (see `Event`). The solve takes no step after the event;
      `ys` at output times up to the event time are the solution there, and
      NaN at output times after it. `stats` count the step across the event
      as accepted, and the evaluations of its recomputation.

    **Returns:** a `Solution` with `ts`, `ys` (leading axis `len(ts)`), `stats` and
    `result`, and with an event `event_time` (`ts[-1]` if none happened),
    `event_state`, `event_happened` and `event_index` (which condition fired).
    """
    config, problem, params, y0_flat, ts = _prepare(
        f, y0, ts, args, solver, rtol, atol, dt0, max_steps, adjoint, controller,
        throw, event,
    )  # fmt: skip
    ts_given = ts
    ts, ts_ok = _runtime_checked_times(ts)
    (ys_flat,), stats = _loop(adjoint, config, problem, params, y0_flat, ts)
    located = None
    if event is not None:
        direction, tau = direction_and_tau(ts)
        stop = present(stats.event)  # set: the loop ran with the event
        located = locate(config, problem, params, direction, tau, (ys_flat,), stop)
        (ys_flat,) = located.ys
    if ts_ok is not None:
        # Bad traced ts: NaN outputs (and gradients) and their own code.
        stats = stats._replace(
            result=jnp.where(ts_ok, stats.result, RESULTS.invalid_ts).astype(
                stats.result.dtype
            )
        )
        ys_flat = ys_flat * jnp.where(ts_ok, 1, jnp.nan).astype(ys_flat.dtype)
    if throw:
        direction = jnp.sign(ts[-1] - ts[0])
        token = raise_if_failed(
            stats,
            direction,
            ts_given[0],
            ts_given[-1],
            config.max_steps,
            type(solver).__name__,
            time_dependent=config.time_dependent,
        )
        ys_flat = tie(ys_flat, token)
    ys = jax.vmap(problem.unravel)(ys_flat)
    if located is None:
        return Solution(
            ts=ts_given, ys=ys, stats=_stats_dict(stats), result=stats.result
        )
    hit = present(stats.event).hit  # located: the loop ran with an event
    counts = _stats_dict(stats)
    counts["num_accepted"] = counts["num_accepted"] + hit.astype(jnp.int32)
    counts["num_rejected"] = counts["num_steps"] - counts["num_accepted"]
    counts["num_fevals"] = counts["num_fevals"] + located.fevals
    (y_event,) = located.y
    return Solution(
        ts=ts_given,
        ys=ys,
        stats=counts,
        result=stats.result,
        event_time=(direction * located.tau).astype(ts_given.dtype),
        event_state=problem.unravel(y_event),
        event_happened=hit,
        event_index=located.index,
    )


_NO_JVP = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"


def _loop(adjoint: AbstractAdjoint, config, problem, params, y0_flat, ts):
    """`adjoint.loop`, with JAX's refusal of forward mode through a custom_vjp
    rule turned into advice on what works."""
    try:
        return adjoint.loop(config, problem, params, (y0_flat,), ts)
    except TypeError as e:
        if _NO_JVP not in str(e):
            raise
        raise TypeError(
            f"neuralode: {type(adjoint).__name__} defines a reverse-mode rule "
            "(jax.custom_vjp), which forward-mode differentiation (jax.jvp, "
            "jax.jacfwd, and jax.hessian, which is jacfwd of jacrev) cannot go "
            "through. For forward mode pass adjoint=neuralode.ForwardMode(); for "
            "second derivatives in reverse mode use jax.jacrev(jax.jacrev(f)) "
            "(or jax.grad of a gradient), which BacksolveAdjoint and "
            "CheckpointAdjoint support (ReversibleAdjoint and InterpolatingAdjoint "
            "give first derivatives only)."
        ) from None


def _runtime_checked_times(ts: Array) -> tuple[Array, Array | None]:
    """Traced `ts` cannot be checked at trace time: returns `ts` (replaced by
    harmless increasing times where invalid, so the loop stays bounded) and
    whether they are finite and strictly monotonic; None for concrete `ts`,
    which `check_ts` has checked already."""
    if not isinstance(ts, jax.core.Tracer):
        return ts, None
    steps = jnp.diff(ts) * jnp.sign(ts[-1] - ts[0])
    ok = jnp.all(jnp.isfinite(ts)) & jnp.all(steps > 0)
    safe = jnp.linspace(0, 1, ts.shape[0], dtype=ts.dtype)
    ts = jnp.where(ok, nan_tangents_unless(ts, ok), lax.stop_gradient(safe))
    return ts, ok


def _stats_dict(stats: LoopStats) -> dict[str, Array]:
    return {
        "num_steps": stats.num_steps,
        "num_accepted": stats.num_accepted,
        "num_rejected": stats.num_steps - stats.num_accepted,
        "num_fevals": stats.num_fevals,
        "num_jacobians": present(stats.num_jacobians),  # every loop counts them
        **(
            {}
            if stats.switch_counts is None
            else {
                "num_switches": stats.switch_counts[0],
                "num_stiff_steps": stats.switch_counts[1],
            }
        ),
    }


def _prepare(
    f, y0, ts, args, solver, rtol, atol, dt0, max_steps, adjoint, controller, throw,
    event=None,
):  # fmt: skip
    """Check every input at trace time and flatten the problem."""
    ts = check_ts(ts)
    rtol, atol = check_tolerances(rtol, atol)
    if not isinstance(controller, AbstractController):
        raise TypeError(
            "neuralode: controller must be PIController() or ConstantStepSize(), got "
            f"{controller!r}"
        )
    check_throw(throw)
    dt0 = check_steps(solver, dt0, max_steps, controller.adaptive)
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            "neuralode: adjoint must be BacksolveAdjoint(), CheckpointAdjoint(), "
            "ReversibleAdjoint(), InterpolatingAdjoint() or ForwardMode(), got "
            f"{adjoint!r}"
        )
    if event is not None:
        if not isinstance(event, Event):
            raise TypeError(
                "neuralode: event must be neuralode.Event(cond, direction=...), got "
                f"{event!r}"
            )
        if not adjoint.supports_events:
            raise TypeError(
                f"neuralode: {type(adjoint).__name__} does not support events; use "
                "BacksolveAdjoint(), CheckpointAdjoint(), InterpolatingAdjoint() or "
                "ForwardMode() with event="
            )
    problem, params, y0_flat = make_problem(f, y0, ts[0], args, event)
    if solver.adaptive and controller.adaptive:
        check_precision(rtol, jnp.result_type(y0_flat))
    time_dtype = jnp.result_type(ts.dtype, jnp.real(y0_flat).dtype)
    ts = ts.astype(time_dtype)
    config = SolverConfig(
        solver,
        controller,
        rtol,
        atol,
        dt0,
        int(max_steps),
        time_dependent=problem.time_dependent,
        throw=throw,
    )
    return config, problem, params, y0_flat, ts


def backward_stats(
    f: Callable,
    y0: PyTree[ArrayLike],
    ts: ArrayLike,
    args: PyTree = None,
    *,
    loss: Callable[[PyTree], Array] | None = None,
    solver: AbstractSolver = Dopri5(),
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    max_steps: int = 4096,
    adjoint: BacksolveAdjoint | InterpolatingAdjoint = BacksolveAdjoint(),
    controller: PIController | ConstantStepSize = PIController(),
) -> dict[str, Array]:
    """Step and evaluation counts of the backward pass of `BacksolveAdjoint`
    or `InterpolatingAdjoint`.

    Solves forward, takes the cotangent ȳ = ∂loss/∂ys (default loss: Σ ys²/2 of
    every leaf, i.e. ȳ = ys), and runs exactly the backward pass that `jax.grad`
    would run, returning its statistics instead of the gradient. Jittable.

    **Arguments:** those of `solve`, plus `loss` (a scalar function of `ys`).

    **Returns:** a dict of integer arrays `num_steps`, `num_accepted`,
    `num_rejected`, `num_fevals` (evaluations of the augmented field, each one
    `jax.vjp` of f) and `result` (0 on success); for `InterpolatingAdjoint`
    also `num_recomputed_fevals`, the evaluations of f that recomputing the
    forward steps cost.
    """
    if not isinstance(adjoint, BacksolveAdjoint | InterpolatingAdjoint):
        raise TypeError(
            "neuralode: backward_stats measures the backward pass of "
            f"BacksolveAdjoint or InterpolatingAdjoint; got adjoint={adjoint!r}"
        )
    config, problem, params, y0_flat, ts = _prepare(
        f, y0, ts, args, solver, rtol, atol, dt0, max_steps, adjoint, controller, True
    )
    direction = jnp.sign(ts[-1] - ts[0])
    tau = direction * ts

    def cotangent(ys_flat):
        if loss is None:
            return ys_flat
        ys_tree = jax.vmap(problem.unravel)(ys_flat)
        return jax.vmap(problem.ravel)(jax.grad(loss)(ys_tree))

    if isinstance(adjoint, InterpolatingAdjoint):
        stats, recomputed = adjoint.backward_pass_stats(
            config, problem, params, direction, tau, (y0_flat,), cotangent
        )
        return {
            **_stats_dict(stats),
            "num_recomputed_fevals": recomputed,
            "result": stats.result,
        }
    out_index = adjoint._grid(tau)[1]
    (ys_grid,), forward = adjoint.forward(
        config, problem, params, direction, (y0_flat,), tau
    )
    ys_bar = cotangent(ys_grid[out_index])
    ys_grid_bar = jnp.zeros_like(ys_grid).at[out_index].add(ys_bar)
    _, stats = adjoint.backward(
        config,
        problem,
        params,
        direction,
        tau,
        (ys_grid,),
        (ys_grid_bar,),
        forward.output_steps,
        forward.h_last,
    )
    return {**_stats_dict(stats), "result": stats.result}


def odeint(
    f: Callable,
    y0: PyTree[ArrayLike],
    ts: ArrayLike,
    args: PyTree = None,
    **kwargs: Any,
) -> PyTree[Array]:
    """Solve dy/dt = f(t, y, args) and return only `ys`, raising on failure.

    Takes the keywords of `solve` except `throw` (always on). `ys` has the pytree
    structure of `y0` with a leading axis of `len(ts)`, and `ys[0]` equals `y0`.
    """
    if "throw" in kwargs:
        raise TypeError(
            "neuralode: odeint always raises on failure; use solve(throw=False)"
        )
    return solve(f, y0, ts, args, **kwargs).ys
