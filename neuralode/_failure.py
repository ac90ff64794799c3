"""Raising a failed solve's status at run time, with the time it reached.

The loop carries a result code; this check runs once, after the loop, on a few
scalars, so it never sits inside the loop where a host callback would force the
compiler to gather sharded state.
"""

from __future__ import annotations

import contextlib
import functools as ft
import logging
import re
from typing import NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from ._integrate import RESOLVED_SPACINGS, LoopStats
from ._solution import RESULTS

# Explicit RK methods leave their stability region on the negative real axis at
# h·|λ| ≈ 2 to 3.5 (Euler 2, RK4 2.8, Dopri5 3.3). Accuracy-limited steps of a
# non-stiff problem sit far below that, so a solve that failed with h·|λ| past
# 1.5 is limited by stability: the problem is stiff (Hairer & Wanner, Solving
# ODEs II, IV.2).
_STIFF_H_LAMBDA = 1.5
_STIFF_ADVICE = (
    "The problem looks stiff: explicit Runge-Kutta methods must keep h·|λ| inside "
    "their small stability region, so the step size collapsed. Use an implicit "
    "solver: solver=neuralode.Rodas5P() (Rosenbrock, one Jacobian per step), "
    "neuralode.Kvaerno5() (ESDIRK with Newton iterations), or "
    "neuralode.AutoSwitch() (explicit while non-stiff, Rodas5P while stiff)."
)
# Solvers that are not limited by explicit stability (by class name).
_IMPLICIT_SOLVERS = frozenset({"Rodas5P", "Kvaerno5", "AutoSwitch"})
_BACKSOLVE_ADVICE = (
    " BacksolveAdjoint re-integrates the state backwards in time, where a decay "
    "(a stiff or contracting problem) becomes growth. Use "
    "adjoint=neuralode.CheckpointAdjoint() (the exact gradient of the discrete "
    "solve, in bounded memory) or neuralode.ForwardMode() (for few parameters)."
)


class SolveError(RuntimeError):
    """A solve failed: max_steps, step-size underflow, non-finite values, a
    backward solve that could not follow the forward one, or invalid `ts`.

    Raised directly by calls that are not compiled (eager `solve`, `odeint`,
    `jax.grad` of them). Inside `jax.jit` / `eqx.filter_jit` JAX delivers the
    failure as an exception whose text contains this message: a
    `jax.errors.JaxRuntimeError` from a call that compiles, a `ValueError` from
    a later call of the compiled function (JAX's C++ dispatch path). Run the
    compiled function inside `reraise_failures()` to get a `SolveError` with
    only the message either way.
    """


_RAISED = re.compile(r"SolveError: (neuralode: .*)", re.DOTALL)


def solve_error_from(error: BaseException) -> SolveError | None:
    """The `SolveError` that a JAX runtime error carries, or None."""
    if isinstance(error, SolveError):
        return error
    # JAX raises a failed callback as JaxRuntimeError on the call that compiles
    # and as ValueError on later calls dispatched from C++.
    if not isinstance(error, jax.errors.JaxRuntimeError | ValueError):
        return None
    match = _RAISED.search(str(error))
    return None if match is None else SolveError(match.group(1).strip())


class reraise_failures(contextlib.ContextDecorator):
    """Turn a failed solve inside compiled code into a plain `SolveError`.

    Use as a context manager or decorator around calls of jitted functions:

        with neuralode.reraise_failures():
            loss = train_step(model, x)      # a jax.jit / eqx.filter_jit function

    The `jax.errors.JaxRuntimeError` or `ValueError` (see `SolveError`) that a
    neuralode failure check raises is re-raised as `SolveError` with the
    neuralode message alone; every other exception passes through unchanged.
    """

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        found = None if error is None else solve_error_from(error)
        if found is None or found is error:
            return False
        raise found from None


class _DropSolveErrorLogs(logging.Filter):
    """JAX logs every exception a host callback raises, with its traceback,
    before re-raising it; a `SolveError` is reported by its exception alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        return not (info and isinstance(info[1], SolveError))


for _name in ("jax._src.callback", "jax._src.debugging"):
    logging.getLogger(_name).addFilter(_DropSolveErrorLogs())


class Failure(NamedTuple):
    """The scalars a failure message is made of (one solve's, or per sample)."""

    result: Array
    t_reached: Array
    t0: Array
    t1: Array
    h_last: Array
    stiffness: Array
    growth: Array
    drift: Array
    num_steps: Array
    num_accepted: Array


#: Growth of the state's RMS norm (over max(1, its initial norm)) past which a
#: collapsing step size is read as a blow-up rather than stiffness.
_BLOW_UP_GROWTH = 1e4


def _time_resolution_limited(
    t: Array | float, h: Array | float, time_dtype: str
) -> Array | bool:
    spacing = float(np.spacing(np.asarray(abs(t), dtype=time_dtype)))
    return abs(h) <= RESOLVED_SPACINGS * spacing


def failure_message(failure: Failure, max_steps: int, solver_name: str,
                    phase: str = "", time_dtype: str = "float64",
                    time_dependent: bool = True) -> str:  # fmt: skip
    """The message of a failed solve: what happened, where, why, what to do."""
    f = failure
    code = int(f.result)
    where = f"at t={f.t_reached:.6g} before t1={f.t1:.6g}"
    if phase:
        where += f" in the {phase}"
    steps = int(f.num_steps)
    counts = (
        f"{steps} steps ({int(f.num_accepted)} accepted, "
        f"{steps - int(f.num_accepted)} rejected), last step size {abs(f.h_last):.3g}"
    )
    if code == RESULTS.max_steps_reached:
        head = f"neuralode: max_steps={max_steps} reached {where}"
    elif code == RESULTS.dt_underflow:
        head = f"neuralode: step size underflow {where}"
    elif code == RESULTS.nonfinite:
        head = (
            f"neuralode: non-finite values (NaN/inf) in the state or vector field "
            f"{where}; the step size shrank to {abs(f.h_last):.3g} without a finite "
            "step"
        )
    elif code == RESULTS.adjoint_drift:
        return (
            f"neuralode: BacksolveAdjoint's backward solve lost the forward "
            f"solution: at t={f.t_reached:.6g} the state it re-integrated backwards "
            f"differs from the stored forward state by {f.drift:.3g} times the "
            "tolerance, so the gradient would be wrong. The reverse-time dynamics "
            "of this problem amplify errors (a flow that contracts, or chaos). Use "
            "adjoint=neuralode.CheckpointAdjoint() (the exact gradient of the "
            "discrete solve, in bounded memory), or give BacksolveAdjoint more "
            "checkpoints (checkpoints=...) and tighter backward tolerances."
        )
    elif code == RESULTS.reversible_unstable:
        return (
            "neuralode: ReversibleAdjoint's reversible scheme was unstable on this "
            f"problem: its two coupled states ended {f.drift:.3g} times the "
            "tolerance apart, so the solution (and its gradient) missed the "
            "tolerance. The scheme's spurious mode grows by coupling/|R(hμ)| per "
            "step wherever a step contracts by more than the coupling (a "
            "contracting or stiff flow). Use adjoint=neuralode.CheckpointAdjoint() "
            "(the exact gradient of the plain discrete solve, in bounded memory) "
            "or neuralode.InterpolatingAdjoint()."
        )
    elif code == RESULTS.implicit_not_converged:
        head = (
            f"neuralode: the Newton iterations of the implicit stages did not "
            f"converge {where}, even as the step size shrank to {abs(f.h_last):.3g}"
        )
    elif code == RESULTS.invalid_ts:
        return (
            "neuralode: ts must be finite and strictly increasing or strictly "
            f"decreasing; the ts given at run time, from {f.t0:.6g} to {f.t1:.6g}, "
            "are not (checked at run time because ts was traced, e.g. under jit or "
            "vmap)"
        )
    else:
        head = f"neuralode: solve failed with {RESULTS.message(code)} {where}"
    msg = f"{head} [{solver_name}, {counts}]."
    backward = "backward" in phase
    if code == RESULTS.implicit_not_converged:
        advice = (
            " The vector field may be non-smooth or discontinuous here, or its "
            "Jacobian inaccurate (a custom_jvp rule). Try solver=neuralode.Rodas5P() "
            "(no Newton iterations) or raise Kvaerno5(max_newton_iterations=...)."
        )
        return msg + advice + (_BACKSOLVE_ADVICE if backward else "")
    if backward:
        # Tolerances and max_steps are not the cure for a backward solve that
        # a stiff or contracting problem defeats: the adjoint method is.
        return msg + _BACKSOLVE_ADVICE
    if code not in (RESULTS.max_steps_reached, RESULTS.dt_underflow):
        return msg
    return _diagnosis(f, msg, solver_name, time_dtype, time_dependent)


def _diagnosis(
    f: Failure, msg: str, solver_name: str, time_dtype: str, time_dependent: bool
) -> str:
    """Why a solve ran out of steps or step size: blow-up, time resolution,
    stiffness (explicit solvers), tolerances."""
    code = int(f.result)
    if np.isfinite(f.growth) and f.growth >= _BLOW_UP_GROWTH:
        return msg + (
            f" The state's norm grew {f.growth:.3g}-fold: the solution appears to "
            "blow up (a finite-time singularity) near this time."
        )
    if time_dependent and _time_resolution_limited(f.t_reached, f.h_last, time_dtype):
        spacing = float(np.spacing(np.asarray(abs(f.t_reached), dtype=time_dtype)))
        return msg + (
            f" The step size reached the time resolution: {time_dtype} times near "
            f"t={f.t_reached:.6g} are {spacing:.3g} apart, so a step's stages can no "
            "longer be placed at distinct times. Use float64 times "
            "(jax.config.update('jax_enable_x64', True)) or measure time from an "
            "origin nearer the solve."
        )
    explicit = solver_name not in _IMPLICIT_SOLVERS
    if explicit and np.isfinite(f.stiffness) and f.stiffness >= _STIFF_H_LAMBDA:
        return msg + (
            f" The step size had collapsed to {abs(f.h_last):.3g} on an interval of "
            f"{abs(f.t1 - f.t0):.3g}, with h·|λ| ≈ {f.stiffness:.2g} at the last "
            "step. " + _STIFF_ADVICE
        )
    if code == RESULTS.dt_underflow:
        return msg + (
            " The tolerances may be below what the floating-point precision "
            "allows, or the vector field is discontinuous here."
        )
    return msg + " Raise max_steps, or loosen rtol/atol."


def _raise_on_failure(*values, **static):
    failure = Failure(*(np.asarray(v).item() for v in values))
    if failure.result == RESULTS.successful:
        return
    raise SolveError(failure_message(failure, **static))


def failure_of(stats: LoopStats, direction, t0, t1) -> Failure:
    """The `Failure` of a loop's stats; `direction` maps the loop's time back to
    the user's (t = direction · τ)."""
    nan = jnp.full((), jnp.nan, jnp.result_type(stats.h_last))
    optional = lambda x: nan if x is None else x
    values = Failure(
        stats.result,
        direction * stats.t_reached,
        t0,
        t1,
        stats.h_last,
        stats.stiffness,
        optional(stats.growth),
        optional(stats.drift),
        stats.num_steps,
        stats.num_accepted,
    )
    return Failure(*(lax.stop_gradient(jnp.asarray(v)) for v in values))


def raise_if_failed(
    stats: LoopStats,
    direction,
    t0,
    t1,
    max_steps: int,
    solver_name: str,
    phase: str = "",
    time_dependent: bool = True,
) -> Array:
    """Check a solve: raise `SolveError` at run time (under jit too) if it failed.

    `direction` maps the loop's time back to the user's (t = direction · τ).
    The host callback runs only on failure (under `lax.cond`), once per solve
    even under `vmap` (whose rule first reduces the batch to its first failure
    with collectives, so a sharded batch is never gathered), and outside the
    solver loop. Called outside any trace (eagerly), it raises `SolveError`
    itself.

    **Returns:** an integer zero that the caller ties into its outputs with
    `tie`. In a single-device process the check is a `pure_callback`, which
    runs only if its value is used; a `jax.debug.callback` needs no tie, but
    its effect takes every call of the compiled program off JAX's C++ dispatch
    path. With several devices the check stays a `jax.debug.callback`: in an
    SPMD program the partitioner runs a `pure_callback` on one device and
    broadcasts its value, and when it raises the other devices wait at that
    broadcast forever.
    """
    failure = failure_of(stats, direction, t0, t1)
    time_dtype = jnp.result_type(failure.t_reached).name
    check = _checker(max_steps, solver_name, phase, time_dtype, time_dependent)
    try:
        return check(*failure)
    except jax.errors.JaxRuntimeError as error:
        # Eager evaluation runs the check on the spot: raise it as itself.
        found = solve_error_from(error)
        if found is None:
            raise
        raise found from None


def checked(config, tree: PyTree, stats: LoopStats, direction, t0, t1,
            phase: str = "") -> PyTree:  # fmt: skip
    """`tree` (a solve's gradient) made to report the solve's failure: with
    `config.throw`, tied to a check that raises `SolveError`; otherwise every
    floating leaf is NaN where the solve failed, so that a failed solve's
    gradient can never be mistaken for a real one."""
    if config.throw:
        name = type(config.solver).__name__
        token = raise_if_failed(
            stats, direction, t0, t1, config.max_steps, name, phase,
            config.time_dependent,
        )  # fmt: skip
        return tie(tree, token)
    ok = lax.stop_gradient(stats.result) == RESULTS.successful
    return jax.tree.map(
        lambda x: jnp.where(ok, x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.inexact)
        else x,
        tree,
    )  # fmt: skip


@jax.custom_jvp
def tie(tree: PyTree, token: Array) -> PyTree:
    """`tree` with its first floating leaf made to depend on the zero `token`.

    Subtracting zero changes no value, signed zeros included, but XLA cannot
    drop a runtime value, so the check that computed `token` runs. Tangents
    depend on it too (multiplied by 1 - token), so that a forward-mode
    derivative that drops the primal outputs still runs the check. A tree
    without floating leaves (nothing to differentiate) is returned as it is.
    """
    leaves, treedef = jax.tree.flatten(tree)
    for i, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            leaves[i] = leaf - token.astype(leaf.dtype)
            break
    return jax.tree.unflatten(treedef, leaves)


@tie.defjvp
def _tie_jvp(primals, tangents):
    tree, token = primals
    tree_dot, _ = tangents
    one = lambda x: (1 - token).astype(x.dtype)
    tree_dot = jax.tree.map(
        lambda x: x * one(x) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree_dot
    )
    return tie(tree, token), tree_dot


@jax.custom_jvp
def nan_tangents_unless(x: Array, ok: Array) -> Array:
    """x itself, with tangents (and so cotangents) NaN where `ok` is false: the
    derivative of something computed from invalid input is flagged, never 0."""
    return x


@nan_tangents_unless.defjvp
def _nan_tangents_jvp(primals, tangents):
    x, ok = primals
    return x, tangents[0] * jnp.where(ok, 1, jnp.nan).astype(x.dtype)


def _first_failure(failure: Failure) -> Failure:
    """The first failing sample of a batch (axis 0), by masked sums, which
    partition into all-reductions where a gather would move the batch."""
    failed = failure.result != RESULTS.successful
    first = jnp.argmax(failed)
    mask = jnp.arange(failed.shape[0]) == first
    pick = lambda v: jnp.sum(
        jnp.where(mask.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0), axis=0
    )
    return Failure(*(pick(v) for v in failure))


@ft.cache
def _checker(
    max_steps: int, solver_name: str, phase: str, time_dtype: str, time_dependent: bool
):
    raise_ = ft.partial(
        _raise_on_failure,
        max_steps=max_steps,
        solver_name=solver_name,
        phase=phase,
        time_dtype=time_dtype,
        time_dependent=time_dependent,
    )

    def callback(*values):
        raise_(*values)
        return np.zeros((), np.int32)

    def zero_on_success(*values):
        failed = values[0] != RESULTS.successful
        zero = jnp.zeros((), jnp.int32)
        if jax.device_count() > 1:
            call = lambda: jax.debug.callback(raise_, *values)
            lax.cond(failed, call, lambda: None)
            return zero
        shape = jax.ShapeDtypeStruct((), jnp.int32)
        call = lambda: jax.pure_callback(callback, shape, *values)
        return lax.cond(failed, call, lambda: zero)

    @jax.custom_batching.custom_vmap
    def check(*values):
        return zero_on_success(*values)

    @check.def_vmap
    def check_batched(axis_size, in_batched, *values):
        values = [
            v if batched else jnp.broadcast_to(v, (axis_size,) + v.shape)
            for v, batched in zip(values, in_batched, strict=True)
        ]
        # One check for the whole batch; nested vmaps recurse through `check`.
        token = check(*_first_failure(Failure(*values)))
        return jnp.broadcast_to(token, (axis_size,)), True

    return check
