"""`NeuralODE`: an ODE solve wrapped as an equinox layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._adjoint import AbstractAdjoint, BacksolveAdjoint
from ._problem import check_throw
from ._solution import Solution
from ._solve import solve
from ._solvers import AbstractSolver, Dopri5


def _float_dtype(tree):
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("The initial state `y0` has no array leaves.")
    dtype = jnp.result_type(*leaves)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"The initial state must be floating point; got {dtype}.")
    return dtype


def check_int(name: str, value: Any, least: int) -> int:
    """`value` as a Python int, checked to be at least `least`.

    Python and NumPy integers are accepted, as `neuralode.solve` accepts them for
    `max_steps`; bools, floats and arrays are refused with a `TypeError`.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an int; got {value!r}.")
    if value < least:
        raise ValueError(f"`{name}` must be an int >= {least}; got {value!r}.")
    return int(value)


def concrete_time(name: str, value: Any) -> float | None:
    """`value` as a float when it is a concrete real scalar, None when traced.

    Python, NumPy and concrete JAX scalars are all accepted, so that checks
    such as `t0 < t1` do not silently skip NumPy numbers.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    dtype = np.asarray(value).dtype
    if np.ndim(value) != 0 or not (
        np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    ):
        raise TypeError(f"`{name}` must be a real scalar; got {value!r}.")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be finite; got {value}.")
    return value


def solver_options(layer: Any) -> dict[str, Any]:
    """The `odeint`/`solve` keywords stored on a layer (`NeuralODE`, `CNF`)."""
    names = ("solver", "rtol", "atol", "dt0", "max_steps", "adjoint")
    return {name: getattr(layer, name) for name in names}


@final
class NeuralODE(eqx.Module):
    r"""A neural ODE layer: maps $y(t_0)$ to the solution $y(t_1)$ of $y' = f(t, y)$.

    The layer solves $\frac{dy}{dt} = f_\theta(t, y, \text{args})$ from `t0` to
    `t1` with an adaptive Runge–Kutta solver and returns $y(t_1)$; gradients
    with respect to $y(t_0)$ and every array leaf of `field` come from the
    chosen adjoint method (Chen et al. 2018). It can be used like any other
    equinox layer, e.g. encoder → `NeuralODE` → linear head.

    With `augment=k > 0` the state is an array whose last axis is padded with
    `k` zeros before the solve, $[y, 0] \in \mathbb{R}^{d+k}$ (augmented neural
    ODEs, Dupont et al. 2019), so `field` must act on a last axis of size
    $d + k$. Both `model(y0)` and `model.trajectory(y0, ts)` return the full
    augmented state; `model.project(y)` drops the `k` extra channels.

    **Arguments:**

    - `field`: the vector field, called as `field(t, y, args)` and returning
      $dy/dt$ with the structure of `y` (e.g. `neuralode.nn.MLPField`).
    - `t0`, `t1`: the initial and final times (default 0 and 1).
    - `solver`: the Runge–Kutta solver (default `Dopri5()`).
    - `rtol`, `atol`: relative and absolute tolerances (default 1e-3 and 1e-6,
      the usual values for training).
    - `adjoint`: how gradients are computed (default `BacksolveAdjoint()`).
    - `dt0`: the initial step size, or None to select it automatically.
    - `max_steps`: the maximum number of solver steps.
    - `augment`: the number of zero channels appended to the state (default 0).
    - `throw`: raise `SolveError` when a solve fails (default). With False the
      failure is not raised: outputs the solve did not reach are NaN, and so is
      the gradient of a failed solve; the compiled program then holds no host
      callback (it can be exported with `jax.export`).

    **References:**

    Chen, Rubanova, Bettencourt, Duvenaud. *Neural Ordinary Differential
    Equations.* NeurIPS 2018.

    Dupont, Doucet, Teh. *Augmented Neural ODEs.* NeurIPS 2019.
    """

    field: Callable[..., PyTree]
    t0: float
    t1: float
    solver: AbstractSolver
    rtol: float
    atol: float
    adjoint: AbstractAdjoint
    dt0: float | None
    max_steps: int = eqx.field(static=True)
    augment: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        field: Callable[..., PyTree],
        *,
        t0: float = 0.0,
        t1: float = 1.0,
        solver: AbstractSolver | None = None,
        rtol: float = 1e-3,
        atol: float = 1e-6,
        adjoint: AbstractAdjoint | None = None,
        dt0: float | None = None,
        max_steps: int = 4096,
        augment: int = 0,
        throw: bool = True,
    ):
        if not callable(field):
            raise TypeError(f"`field` must be callable; got {type(field).__name__}.")
        augment = check_int("augment", augment, 0)
        max_steps = check_int("max_steps", max_steps, 1)
        start, end = concrete_time("t0", t0), concrete_time("t1", t1)
        if start is not None and start == end:
            raise ValueError(f"`t0` and `t1` must differ; both are {start}.")
        self.field = field
        self.t0 = t0
        self.t1 = t1
        self.solver = Dopri5() if solver is None else solver
        self.rtol = rtol
        self.atol = atol
        self.adjoint = BacksolveAdjoint() if adjoint is None else adjoint
        self.dt0 = dt0
        self.max_steps = max_steps
        self.augment = augment
        self.throw = check_throw(throw)

    def _prepare(self, y0):
        if self.augment == 0:
            return y0
        if not eqx.is_array_like(y0) or jnp.ndim(y0) == 0:
            raise ValueError(
                f"`augment={self.augment}` needs the state to be an array with a "
                "last axis to pad; got a pytree or scalar."
            )
        y0 = jnp.asarray(y0)
        size = getattr(self.field, "data_size", None)
        if isinstance(size, int) and size != y0.shape[-1] + self.augment:
            raise ValueError(
                f"With augment={self.augment} the field must act on a last axis of "
                f"size {y0.shape[-1]} + {self.augment} = "
                f"{y0.shape[-1] + self.augment}, but its data_size is {size}."
            )
        pad = jnp.zeros(y0.shape[:-1] + (self.augment,), y0.dtype)
        return jnp.concatenate([y0, pad], axis=-1)

    def _kwargs(self):
        return solver_options(self)

    def __call__(self, y0: PyTree, args: Any = None) -> PyTree:
        """Solve from `t0` to `t1` and return the final state.

        **Arguments:**

        - `y0`: the initial state (a pytree of float arrays; an array with a
          last axis when `augment > 0`).
        - `args`: passed through to `field(t, y, args)`.

        **Returns:**

        $y(t_1)$, with the structure of `y0` (augmented when `augment > 0`).
        """
        y0 = self._prepare(y0)
        ts = jnp.asarray([self.t0, self.t1], _float_dtype(y0))
        ys = solve(self.field, y0, ts, args, throw=self.throw, **self._kwargs()).ys
        return jax.tree.map(lambda y: y[-1], ys)

    def trajectory(
        self, y0: PyTree, ts: Float[ArrayLike, " times"], args: Any = None
    ) -> PyTree:
        """Solve through the times `ts` and return the states at those times.

        **Arguments:**

        - `y0`: the initial state, taken to be the state at time `ts[0]`
          (`t0` and `t1` are not used).
        - `ts`: 1-D strictly monotonic times (increasing or decreasing).
        - `args`: passed through to `field(t, y, args)`.

        **Returns:**

        The states, each leaf with a leading axis of length `len(ts)`;
        `ys[0]` is `y0` (augmented when `augment > 0`).
        """
        y0 = self._prepare(y0)
        ts = jnp.asarray(ts, _float_dtype(y0))
        return solve(self.field, y0, ts, args, throw=self.throw, **self._kwargs()).ys

    def solve(
        self,
        y0: PyTree,
        ts: Float[ArrayLike, " times"] | None = None,
        args: Any = None,
        *,
        throw: bool = True,
    ) -> Solution:
        """Like `trajectory` but return the full `Solution` (with step statistics).

        **Arguments:**

        - `y0`: the initial state.
        - `ts`: the output times, or None for `[t0, t1]`.
        - `args`: passed through to `field(t, y, args)`.
        - `throw`: raise if the solve fails (otherwise see `Solution.result`).

        **Returns:**

        The `Solution(ts, ys, stats, result)` of `neuralode.solve`.
        """
        y0 = self._prepare(y0)
        ts = jnp.asarray([self.t0, self.t1] if ts is None else ts, _float_dtype(y0))
        return solve(self.field, y0, ts, args, throw=throw, **self._kwargs())

    def project(self, y: Float[Array, "... d_aug"]) -> Float[Array, "... d"]:
        """Drop the `augment` zero-initialised channels from the last axis of `y`.

        **Arguments:**

        - `y`: an augmented state (or trajectory) of last-axis size $d + k$.

        **Returns:**

        `y[..., :d]` (`y` unchanged when `augment == 0`).
        """
        if self.augment == 0:
            return y
        if y.shape[-1] <= self.augment:
            raise ValueError(
                f"Cannot drop {self.augment} augmented channels from a last axis "
                f"of size {y.shape[-1]}."
            )
        return y[..., : y.shape[-1] - self.augment]
