"""Turning a user's call into a flat, pure problem, with trace-time checks.

The solver loop works on one flat vector y and a pure vector field
``f_flat(τ, (y,), params, direction)`` whose every traced input is explicit in
``params``: the user's `args`, the array leaves of an `equinox.Module` field,
and any traced arrays the field closes over (found with `jax.closure_convert`);
non-numeric leaves of `args` stay static. Time runs
forwards inside the loop: τ = d·t with direction d = sign(t_last - t_first), and
the field becomes d·f(d·τ, y, args).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from ._solvers import AbstractSolver


class ODEProblem(eqx.Module):
    """A flattened problem: `f_flat(τ, (y_flat,), params, direction) -> (dy/dτ,)`.

    `ravel` flattens a pytree like the user's y into one vector and `unravel`
    rebuilds it.
    """

    field: Callable = eqx.field(static=True)
    ravel: Callable = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)
    # Whether f reads t at all (an autonomous field has no time resolution
    # to respect).
    time_dependent: bool = eqx.field(default=True, static=True)
    # The event's conditions (`EventCondition`), or None without an event.
    condition: Any = eqx.field(default=None, static=True)

    def f_flat(
        self, tau: Array, state: tuple[Array], params: PyTree, direction: Array
    ) -> tuple[Array]:
        """dy/dτ for the state `(y_flat,)`."""
        (y,) = state
        field_arrays, args, consts = params[:3]
        t = direction * tau
        out = self.field(field_arrays, consts)(t, self.unravel(y), args)
        flat = self.ravel(out)
        return ((direction * flat).astype(y.dtype),)


class EventCondition(eqx.Module):
    """An event's conditions on flat states: `values(τ, (y_flat,), params,
    direction) -> (k,)`, reading the user's `args` (params[1]) and the
    conditions' own arrays (params[3])."""

    conditions: Callable = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)
    directions: tuple[int, ...] = eqx.field(static=True)

    def values(
        self, tau: Array, state: tuple[Array], params: PyTree, direction: Array
    ) -> Array:
        (y,) = state
        args = params[1]
        cond_arrays, cond_consts = params[3]
        t = direction * tau
        return self.conditions(cond_arrays, cond_consts)(t, self.unravel(y), args)


def _describe(tree: PyTree) -> str:
    leaves = jax.tree_util.tree_structure(tree)
    shapes = [
        f"{jnp.result_type(x).name}{list(jnp.shape(x))}" for x in jax.tree.leaves(tree)
    ]
    return f"{leaves} with leaves {shapes}"


def check_ts(ts: Any) -> Array:
    """Validate the output times; returns them as a floating array."""
    if not hasattr(ts, "shape"):
        ts = np.asarray(ts)
    if jnp.ndim(ts) != 1:
        raise ValueError(
            f"neuralode: ts must be a 1-D array of times, got shape {jnp.shape(ts)}"
        )
    if ts.shape[0] < 2:
        raise ValueError(
            "neuralode: ts needs at least 2 times (the initial time and one output "
            f"time), got {ts.shape[0]}"
        )
    if not jnp.issubdtype(jnp.result_type(ts), jnp.floating):
        if jnp.issubdtype(jnp.result_type(ts), jnp.complexfloating):
            raise TypeError("neuralode: ts must be real, got complex times")
        ts = jnp.asarray(ts, dtype=jnp.result_type(float))
    if not isinstance(ts, jax.core.Tracer):
        values = np.asarray(ts)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"neuralode: ts must be finite, got {values}")
        steps = np.diff(values)
        if not (np.all(steps > 0) or np.all(steps < 0)):
            bad = int(np.argmax(~((steps > 0) if steps[0] > 0 else (steps < 0))))
            raise ValueError(
                "neuralode: ts must be strictly increasing or strictly decreasing; "
                f"ts[{bad}]={values[bad]} and ts[{bad + 1}]={values[bad + 1]} break "
                "the order"
            )
    return jnp.asarray(ts)


def check_y0(y0: PyTree) -> None:
    leaves = jax.tree.leaves(y0)
    if not leaves:
        raise ValueError("neuralode: y0 has no array leaves")
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"neuralode: y0 must hold floating arrays, got a leaf of dtype "
                f"{dtype.name} and shape {jnp.shape(leaf)}; convert it, e.g. "
                "y0.astype(jnp.float32)"
            )


def check_tolerances(rtol: Any, atol: Any) -> tuple[float, float]:
    values = []
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, jax.core.Tracer):
            raise TypeError(
                f"neuralode: {name} must be a Python number, not a traced array"
            )
        try:
            if np.ndim(value) != 0 or isinstance(value, bool | complex | str):
                raise TypeError
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"neuralode: {name} must be one real number (the same tolerance "
                f"for every component), got {value!r}"
            ) from None
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"neuralode: {name} must be >= 0 and finite, got {value}")
        values.append(value)
    if values[0] == 0 and values[1] == 0:
        raise ValueError("neuralode: rtol and atol cannot both be zero")
    return values[0], values[1]


def check_throw(throw: Any) -> bool:
    """`throw` must be a Python bool: it decides what the program contains."""
    if not isinstance(throw, bool):
        raise TypeError(f"neuralode: throw must be True or False, got {throw!r}")
    return throw


#: The largest max_steps: the loop counts steps in int32.
MAX_STEPS_LIMIT = 2**31 - 2


def check_precision(rtol: float, dtype: Any) -> None:
    """Refuse a relative tolerance finer than the state's floating-point
    resolution: no step's error could honour it (bfloat16 resolves 8e-3), so
    the result would be wrong however the steps were chosen."""
    eps = float(jnp.finfo(jnp.real(jnp.zeros((), dtype)).dtype).eps)
    if 0 < rtol < eps:
        name = jnp.dtype(dtype).name
        raise ValueError(
            f"neuralode: rtol={rtol:g} is finer than the resolution of the "
            f"{name} state (machine epsilon {eps:.3g}); no solve can honour it. "
            f"Pass rtol >= {eps:.3g}, or solve in a wider dtype (float32 or "
            "float64) and cast the result."
        )


def check_steps(
    solver: AbstractSolver, dt0: Any, max_steps: Any, adaptive: bool = True
) -> float | None:
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"neuralode: solver must be a neuralode solver such as neuralode.Dopri5(), "
            f"got {solver!r}"
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer):
        raise TypeError(f"neuralode: max_steps must be an int, got {max_steps!r}")
    if not 1 <= max_steps <= MAX_STEPS_LIMIT:
        raise ValueError(
            f"neuralode: max_steps must be between 1 and {MAX_STEPS_LIMIT} (step "
            f"counters are int32), got {max_steps}"
        )
    if dt0 is None:
        if not solver.adaptive:
            raise ValueError(
                f"neuralode: {type(solver).__name__} is a fixed-step solver and needs "
                "a step size: pass dt0=..., or use an adaptive solver such as Dopri5()"
            )
        if not adaptive:
            raise ValueError(
                "neuralode: ConstantStepSize() takes every step of size dt0: pass "
                "dt0=..."
            )
        return None
    if isinstance(dt0, jax.core.Tracer):
        raise TypeError("neuralode: dt0 must be a Python number, not a traced array")
    dt0 = abs(float(dt0))
    if not np.isfinite(dt0) or dt0 == 0:
        raise ValueError(f"neuralode: dt0 must be nonzero and finite, got {dt0}")
    return dt0


def flattener(y0: PyTree) -> tuple[Callable, Callable]:
    """`(ravel, unravel)` between pytrees like y0 and one flat vector.

    When every leaf has the same dtype and the same leading (batch) size B > 1,
    the vector is laid out batch-first: row b holds every leaf's entries of
    sample b. A batch sharded along its leading axis then stays block-sharded
    in the flat vector. Otherwise this is `jax.flatten_util.ravel_pytree`. The
    RMS error norm does not depend on the order.
    """
    leaves, treedef = jax.tree.flatten(y0)
    dtypes = {jnp.result_type(leaf) for leaf in leaves}
    batch = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(leaves) < 2 or len(dtypes) != 1 or len(batch) != 1 or None in batch:
        _, unravel = ravel_pytree(y0)
        return (lambda tree: ravel_pytree(tree)[0]), unravel
    (b,) = batch
    if b is None or b < 2:  # (b is not None here: excluded above)
        _, unravel = ravel_pytree(y0)
        return (lambda tree: ravel_pytree(tree)[0]), unravel
    shapes = [jnp.shape(leaf) for leaf in leaves]
    widths = [int(np.prod(shape[1:], dtype=int)) for shape in shapes]
    (dtype,) = dtypes

    def ravel(tree: PyTree) -> Array:
        rows = [jnp.reshape(leaf, (b, -1)) for leaf in jax.tree.leaves(tree)]
        return jnp.concatenate(rows, axis=1).reshape(-1).astype(dtype)

    def unravel_rows(flat: Array) -> PyTree:
        rows = jnp.reshape(flat, (b, -1))
        out, start = [], 0
        for shape, width in zip(shapes, widths, strict=True):
            out.append(jnp.reshape(rows[:, start : start + width], shape))
            start += width
        return jax.tree.unflatten(treedef, out)

    return ravel, unravel_rows


def _split_field(f: Callable) -> tuple[PyTree, Callable]:
    """Separate the array leaves of an equinox.Module field from its static rest."""
    if isinstance(f, eqx.Module):
        arrays, static = eqx.partition(f, eqx.is_array)
        return arrays, lambda a: eqx.combine(a, static)
    return None, lambda a: f


def make_problem(
    f: Callable, y0: PyTree, t0: Array, args: PyTree, event: Any = None
) -> tuple[ODEProblem, PyTree, Array]:
    """Check the field's output against y0 and flatten everything.

    With an `Event`, its conditions are checked to return real scalars and
    flattened like f: their arrays and closed-over tracers become params[3].

    **Returns:** `(problem, params, y0_flat)`.
    """
    check_y0(y0)
    if not callable(f):
        raise TypeError(f"neuralode: f must be callable as f(t, y, args), got {f!r}")
    field_arrays, rebuild = _split_field(f)
    ravel, unravel = flattener(y0)
    y0_flat = ravel(y0)
    t0 = jnp.asarray(t0)

    # Leaves of args that are not numbers (functions, strings) stay static.
    args_arrays, args_static = eqx.partition(args, _is_numeric)
    args_arrays = jax.tree.map(_as_array, args_arrays)

    def call(field_arrays, t, y, args_arrays):
        args = eqx.combine(args_arrays, args_static)
        return rebuild(field_arrays)(t, y, args)

    try:
        closed, out_shape = jax.make_jaxpr(call, return_shape=True)(
            field_arrays, t0, y0, args_arrays
        )
    except TypeError as e:
        if _rejects_three_arguments(f):
            raise TypeError(
                "neuralode: the vector field must be callable as f(t, y, args) "
                f"(three arguments); {f!r} does not accept them"
            ) from e
        raise TypeError(f"neuralode: calling f(t, y, args) failed: {e}") from e
    expected = jax.eval_shape(lambda y: y, y0)
    same_structure = jax.tree_util.tree_structure(out_shape) == (
        jax.tree_util.tree_structure(expected)
    )
    if not same_structure or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(
            jax.tree.leaves(out_shape), jax.tree.leaves(expected), strict=True
        )
    ):
        raise ValueError(
            "neuralode: f(t, y, args) must return the same structure, shapes and "
            f"dtypes as y0.\n  y0:        {_describe(expected)}\n"
            f"  f returned: {_describe(out_shape)}"
        )
    t_index = len(jax.tree.leaves(field_arrays))
    time_dependent = _uses_input(closed.jaxpr, t_index)
    # Hoist traced arrays that f closes over into explicit inputs, so that the
    # custom_vjp adjoints can return their cotangents.
    converted, consts = jax.closure_convert(call, field_arrays, t0, y0, args_arrays)

    def field(field_arrays, consts):
        return lambda t, y, args: converted(field_arrays, t, y, args, *consts)

    params = (field_arrays, args_arrays, list(consts))
    condition = None
    if event is not None:
        condition, cond_params = _flat_condition(
            event, t0, y0, args_arrays, args_static, unravel
        )
        params = (*params, cond_params)
    problem = ODEProblem(
        field=field,
        ravel=ravel,
        unravel=unravel,
        time_dependent=time_dependent,
        condition=condition,
    )
    return problem, jax.tree.map(_as_array, params), y0_flat


def _flat_condition(event, t0, y0, args_arrays, args_static, unravel):
    """The event's conditions as one function of (cond_arrays, consts) returning
    the (k,) vector of their values, after checking each returns a real scalar."""
    conditions = event.conditions
    split = [_split_field(c) for c in conditions]
    cond_arrays = [arrays for arrays, _ in split]

    def call(cond_arrays, t, y, args_arrays):
        args = eqx.combine(args_arrays, args_static)
        values = []
        for i, (_, rebuild) in enumerate(split):
            value = rebuild(cond_arrays[i])(t, y, args)
            shape, dtype = jnp.shape(value), jnp.result_type(value)
            if shape not in ((), (1,)) or not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"neuralode: Event condition {i} must return a real floating "
                    f"scalar, got {dtype.name}{list(shape)}"
                )
            values.append(jnp.reshape(value, ()))
        return jnp.stack(values)

    try:
        jax.eval_shape(call, cond_arrays, t0, y0, args_arrays)
    except TypeError as e:
        if "neuralode:" in str(e):
            raise
        raise TypeError(f"neuralode: calling cond(t, y, args) failed: {e}") from e
    converted, consts = jax.closure_convert(call, cond_arrays, t0, y0, args_arrays)

    def values(cond_arrays, consts):
        return lambda t, y, args: converted(cond_arrays, t, y, args, *consts)

    directions = event.directions
    return EventCondition(values, unravel, directions), (cond_arrays, list(consts))


def _rejects_three_arguments(f: Callable) -> bool:
    """Whether f's signature cannot bind (t, y, args) (False if unknown)."""
    try:
        inspect.signature(f).bind(0.0, 0.0, None)
    except TypeError:
        return True
    except ValueError:  # no signature (some builtins)
        return False
    return False


def _uses_input(jaxpr, index: int) -> bool:
    """Whether input `index` of a jaxpr feeds any equation or output."""
    var = jaxpr.invars[index]
    if any(var is out for out in jaxpr.outvars):
        return True
    return any(any(v is var for v in eqn.invars) for eqn in jaxpr.eqns)


def _is_numeric(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(
        x, bool | int | float | complex | np.ndarray | np.generic
    )


def _as_array(x: Any) -> Any:
    """Numbers and NumPy arrays become JAX arrays, so that every numeric leaf of
    the parameters is an explicit (possibly differentiable) input."""
    if isinstance(x, bool | int | float | complex | np.ndarray | np.generic):
        return jnp.asarray(x)
    return x
