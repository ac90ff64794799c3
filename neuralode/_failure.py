"""Raising a failed solve's status at run time, with the time it reached.

The loop carries a result code; this check runs once, after the loop, on a few
scalars, so it never sits inside the loop where a host callback would force the
compiler to gather sharded state.
"""

from __future__ import annotations

import functools as ft

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from ._integrate import LoopStats
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
    "solver (e.g. diffrax.Kvaerno5 or scipy's Radau/LSODA), rescale the problem, "
    "or, if the stiffness is a transient, raise max_steps."
)


class SolveError(RuntimeError):
    """A solve failed (max_steps, step-size underflow or non-finite values)."""


def failure_message(
    code: int,
    t_reached: float,
    t0: float,
    t1: float,
    h_last: float,
    stiffness: float,
    num_steps: int,
    num_accepted: int,
    max_steps: int,
    solver_name: str,
    phase: str = "",
) -> str:
    """The message of a failed solve: what happened, where, and what to do."""
    where = f"at t={t_reached:.6g} before t1={t1:.6g}"
    if phase:
        where += f" in the {phase}"
    counts = (
        f"{num_steps} steps ({num_accepted} accepted, {num_steps - num_accepted} "
        f"rejected), last step size {abs(h_last):.3g}"
    )
    if code == RESULTS.max_steps_reached:
        head = f"neuralode: max_steps={max_steps} reached {where}"
    elif code == RESULTS.dt_underflow:
        head = f"neuralode: step size underflow {where}"
    elif code == RESULTS.nonfinite:
        head = (
            f"neuralode: non-finite values (NaN/inf) in the state or vector field "
            f"{where}; the step size shrank to {abs(h_last):.3g} without a finite step"
        )
    else:
        head = f"neuralode: solve failed with {RESULTS.message(code)} {where}"
    msg = f"{head} [{solver_name}, {counts}]."
    if code in (RESULTS.max_steps_reached, RESULTS.dt_underflow):
        if np.isfinite(stiffness) and stiffness >= _STIFF_H_LAMBDA:
            msg += (
                f" The step size had collapsed to {abs(h_last):.3g} on an interval of "
                f"{abs(t1 - t0):.3g}, with h·|λ| ≈ {stiffness:.2g} at the last step. "
                + _STIFF_ADVICE
            )
        elif code == RESULTS.dt_underflow:
            msg += (
                " The solution may blow up (a singularity) near this time, or the "
                "tolerances may be below what the floating-point precision allows."
            )
        else:
            msg += " Raise max_steps, or loosen rtol/atol."
    return msg


def _raise_on_failure(
    result,
    t_reached,
    t0,
    t1,
    h_last,
    stiffness,
    num_steps,
    num_accepted,
    *,
    max_steps,
    solver_name,
    phase,
):
    result = np.asarray(result)
    failed = np.flatnonzero(result.reshape(-1) != RESULTS.successful)
    if failed.size == 0:
        return
    i = failed[0]

    def pick(x):
        x = np.asarray(x)
        return np.broadcast_to(x, result.shape).reshape(-1)[i].item()

    message = failure_message(
        pick(result),
        pick(t_reached),
        pick(t0),
        pick(t1),
        pick(h_last),
        pick(stiffness),
        pick(num_steps),
        pick(num_accepted),
        max_steps,
        solver_name,
        phase,
    )
    raise SolveError(message)


def raise_if_failed(
    stats: LoopStats,
    direction,
    t0,
    t1,
    max_steps: int,
    solver_name: str,
    phase: str = "",
) -> Array:
    """Check a solve: raise `SolveError` at run time (under jit too) if it failed.

    `direction` maps the loop's time back to the user's (t = direction · τ).
    The host callback runs only on failure (under `lax.cond`), once per solve
    even under `vmap` (whose rule checks the whole batch in one call), and
    outside the solver loop, so it neither slows a successful solve nor makes
    the partitioner gather sharded state.

    **Returns:** an integer zero that the caller ties into its outputs with
    `tie`. In a single-device process the check is a `pure_callback`, which
    runs only if its value is used; a `jax.debug.callback` needs no tie, but
    its effect takes every call of the compiled program off JAX's C++ dispatch
    path (about 90 µs, run or not). With several devices the check stays a
    `jax.debug.callback`: in an SPMD program the partitioner runs a
    `pure_callback` on one device and broadcasts its value, and when it raises
    the other devices wait at that broadcast forever.
    """
    values = (
        stats.result,
        direction * stats.t_reached,
        t0,
        t1,
        stats.h_last,
        stats.stiffness,
        stats.num_steps,
        stats.num_accepted,
    )
    values = tuple(lax.stop_gradient(jnp.asarray(v)) for v in values)
    return _checker(max_steps, solver_name, phase)(*values)


def tie(tree: PyTree, token: Array) -> PyTree:
    """`tree` with its first floating leaf made to depend on the zero `token`.

    Subtracting zero changes no value, signed zeros included, but XLA cannot
    drop a runtime value, so the check that computed `token` runs. A tree
    without floating leaves (nothing to differentiate) is returned as it is.
    """
    leaves, treedef = jax.tree.flatten(tree)
    for i, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            leaves[i] = leaf - token.astype(leaf.dtype)
            break
    return jax.tree.unflatten(treedef, leaves)


@ft.cache
def _checker(max_steps: int, solver_name: str, phase: str):
    raise_ = ft.partial(
        _raise_on_failure, max_steps=max_steps, solver_name=solver_name, phase=phase
    )

    def callback(*values):
        raise_(*values)
        return np.zeros((), np.int32)

    def zero_on_success(result, *rest):
        failed = jnp.any(result != RESULTS.successful)
        zero = jnp.zeros((), jnp.int32)
        if jax.device_count() > 1:
            call = lambda: jax.debug.callback(raise_, result, *rest)
            lax.cond(failed, call, lambda: None)
            return zero
        shape = jax.ShapeDtypeStruct((), jnp.int32)
        call = lambda: jax.pure_callback(callback, shape, result, *rest)
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
        # One call for the whole batch; nested vmaps recurse through `check`.
        token = check(*values)
        return jnp.broadcast_to(token, (axis_size,)), True

    return check
