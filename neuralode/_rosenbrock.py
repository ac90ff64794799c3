"""Rosenbrock–Wanner methods: linearly implicit, one Jacobian and one LU per step."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from . import _implicit_tableaus as tableaus
from ._implicit_tableaus import RosenbrockTableau
from ._linear_solve import (
    LinearSolver,
    common_dtype,
    concat,
    shifted_system,
    split,
    split_rows,
    time_derivative,
)
from ._solvers import AbstractImplicitSolver, StepResult
from ._state import FlatField, State


class Rodas5P(AbstractImplicitSolver):
    """Rodas5P: an L-stable, stiffly accurate Rosenbrock 5(4) method.

    Each step linearises once: W = I/(hγ) − J with J = ∂f/∂y(t, y), one LU of W,
    then 8 stages W k_i = f(t + c_i h, y + Σ a_ij k_j) + Σ (C_ij/h) k_j +
    h d_i ∂f/∂t — linear solves only, no Newton iterations, so a step never
    fails to converge. The error estimate is the last stage k_8; the dense
    output is Steinebach's stiffly accurate 4th-degree interpolant. The
    default stiff solver of DifferentialEquations.jl.

    **Arguments:**

    - `linear_solver`: `"dense"` (jacfwd + LU), `"matrix_free"` (JVPs +
      GMRES), or `"auto"`: dense up to `DENSE_LIMIT` unknowns.

    Reference: Steinebach (2023), BIT Numer. Math. 63, 27.
    """

    linear_solver: LinearSolver = eqx.field(default="auto", static=True)

    tableau: ClassVar[RosenbrockTableau] = tableaus.RODAS5P

    @property
    def dense_degree(self) -> int:
        return self.tableau.H.shape[0] + 1

    @property
    def fevals_per_step(self) -> int:
        # Stages 2..s, f(t + h, y1) for the next step, one JVP for ∂f/∂t.
        return self.tableau.num_stages + 1

    def step(
        self,
        f: FlatField,
        t: Array,
        y: State,
        f0: State,
        h: Array,
        dense: bool = True,
        tolerances: tuple[float, float] = (1e-6, 1e-8),
    ) -> StepResult:
        tab = self.tableau
        real = jnp.real(y[0]).dtype
        h_y = h.astype(real)
        h_gamma = h_y * tab.gamma
        system, _ = shifted_system(f, t, y, h_gamma, self.linear_solver)
        dtype = common_dtype(y)
        x = concat(y, dtype)
        f_t = concat(time_derivative(f, t, y), dtype)
        s = tab.num_stages
        a, C, c, d = (jnp.asarray(v, real) for v in (tab.a, tab.C, tab.c, tab.d))

        # One stage body in a loop (not unrolled s times): the compiled step is
        # s times smaller, and a stage's O(s·n) weighted sums are negligible
        # next to f and the solve. W k_i = r_i  ⟺  (I − hγJ) k_i = hγ r_i.
        def solve(i, f_i, stages):
            rhs = f_i + (C[i] @ stages) / h_y + (h_y * d[i]) * f_t
            k_i = concat(system.solve(split(h_gamma * rhs, y)), dtype)
            return stages.at[i].set(k_i)

        def stage(i, stages):
            f_i = concat(f(t + c[i] * h, split(x + a[i] @ stages, y)), dtype)
            return solve(i, f_i, stages)

        stages = solve(0, concat(f0, dtype), jnp.zeros((s, x.size), dtype))
        stages = lax.fori_loop(1, s, stage, stages)
        y1 = split(x + jnp.asarray(tab.m, real) @ stages, y)
        y_error = split(jnp.asarray(tab.m_error, real) @ stages, y)
        f1 = f(t + h, y1)
        coeffs = None
        if dense:
            weights = jnp.asarray(tab.dense_coefficients.T, real)
            coeffs = split_rows(weights @ stages, y)
        return StepResult(y1, y_error, f1, coeffs)
