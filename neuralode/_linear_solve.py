"""The linear algebra of the implicit methods: Jacobians and the solves with
I − hγJ, dense or matrix-free.

The loop's state is a tuple of flat vectors; here they are concatenated into
one vector of n entries (in their common dtype) for the Jacobian. Two ways to
solve (I − hγ J) x = r:

- dense: J by `jax.jacfwd` (n Jacobian–vector products, batched), one LU
  factorisation (`jax.scipy.linalg.lu_factor`) reused for every solve of the
  step. O(n³) per step, which is cheap up to a few hundred unknowns;
- matrix-free: `jax.linearize` once per step, then GMRES
  (`jax.scipy.sparse.linalg.gmres`) on v ↦ v − hγ J v. O(n) memory, and the
  cost of a solve is a few JVPs: the choice for large states (a batch of many
  independent samples solved as one ODE, whose J is block diagonal).

Both are differentiable: JAX's LU and triangular solves have their own
derivative rules, and GMRES is differentiated implicitly (its
`custom_linear_solve`), so a `CheckpointAdjoint` gradient flows through the
solves without unrolling anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.scipy.sparse.linalg as jssl
import numpy as np
from jaxtyping import Array

from ._state import FlatField, State

LinearSolver = Literal["auto", "dense", "matrix_free"]

#: Above this many unknowns, "auto" solves matrix-free (see `_linear_solve`).
DENSE_LIMIT = 256


def concat(state: State, dtype) -> Array:
    """The state's leaves as one vector of `dtype`."""
    return jnp.concatenate([leaf.astype(dtype) for leaf in state])


def split(vector: Array, like: State) -> State:
    """Undo `concat`: leaves shaped and typed like `like`."""
    sizes = np.cumsum([leaf.size for leaf in like])[:-1]
    parts = jnp.split(vector, sizes)
    return tuple(p.astype(leaf.dtype) for p, leaf in zip(parts, like, strict=True))


def split_rows(matrix: Array, like: State) -> State:
    """`split` for each row of a (q, n) matrix: leaves of shape (q, size)."""
    sizes = np.cumsum([leaf.size for leaf in like])[:-1]
    parts = jnp.split(matrix, sizes, axis=1)
    return tuple(p.astype(leaf.dtype) for p, leaf in zip(parts, like, strict=True))


def common_dtype(state: State):
    return jnp.result_type(*state)


def is_dense(method: LinearSolver, y: State) -> bool:
    """Whether `method` solves densely for a state like y ("auto": up to
    `DENSE_LIMIT` unknowns)."""
    n = sum(leaf.size for leaf in y)
    return method == "dense" or (method == "auto" and n <= DENSE_LIMIT)


def time_derivative(f: FlatField, t: Array, y: State) -> State:
    """∂f/∂t at (t, y), by one JVP in t."""
    return jax.jvp(lambda s: f(s, y), (t,), (jnp.ones_like(t),))[1]


@dataclasses.dataclass(frozen=True)
class ShiftedSystem:
    """The operator M = I − hγ J(t, y), ready to solve M x = r.

    Built once per step (`shifted_system`) and used inside it; `solve` takes
    and returns a state. `lu` is the dense factorisation, else `matvec` the
    matrix-free product, solved by GMRES to relative tolerance `tol`.
    """

    like: State
    dtype: object
    lu: tuple[Array, Array] | None
    matvec: Callable | None
    tol: float

    def solve(self, rhs: State) -> State:
        r = concat(rhs, self.dtype)
        if self.lu is not None:
            x = jsl.lu_solve(self.lu, r)
        else:
            x, _ = jssl.gmres(
                self.matvec, r, x0=r, tol=self.tol, atol=0.0, restart=30, maxiter=4
            )
        return split(x, self.like)


def shifted_system(
    f: FlatField,
    t: Array,
    y: State,
    h_gamma: Array,
    method: LinearSolver = "auto",
    tol: float = 1e-10,
    jacobian: Array | None = None,
) -> tuple[ShiftedSystem, Array | None]:
    """M = I − hγ ∂f/∂y(t, y), factorised (dense) or as a matvec (matrix-free).

    A dense `jacobian` given is used instead of evaluating ∂f/∂y (a method
    reusing an earlier step's).

    **Returns:** `(system, jacobian)`, the dense Jacobian (None matrix-free).
    """
    dtype = common_dtype(y)
    x0 = concat(y, dtype)
    flat = lambda x: concat(f(t, split(x, y)), dtype)
    h_gamma = h_gamma.astype(dtype)
    n = x0.size
    if is_dense(method, y):
        dense: Array = jax.jacfwd(flat)(x0) if jacobian is None else jacobian
        matrix = jnp.eye(n, dtype=dtype) - h_gamma * dense
        return ShiftedSystem(y, dtype, jsl.lu_factor(matrix), None, tol), dense
    _, jvp = jax.linearize(flat, x0)
    matvec = lambda v: v - h_gamma * jvp(v)
    return ShiftedSystem(y, dtype, None, matvec, tol), None
