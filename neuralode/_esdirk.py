"""ESDIRK methods: implicit stages solved by simplified Newton iterations."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from . import _implicit_tableaus as tableaus
from ._controller import rms_norm
from ._implicit_tableaus import ESDIRKTableau
from ._linear_solve import (
    LinearSolver,
    common_dtype,
    concat,
    is_dense,
    shifted_system,
    split,
    split_rows,
)
from ._solvers import AbstractImplicitSolver, StepResult
from ._state import FlatField, State

#: The stages whose values the dense output interpolates (with y and y_1):
#: Kvaerno5's at c = 0.436 and 0.896, the two nodes inside (0, 1) that are
#: not close together.
DENSE_STAGES = (4, 3)

#: With more unknowns than this, Kvaerno5 reuses its Jacobian by default.
REUSE_SIZE = 16


class _Newton(NamedTuple):
    """The carry of a stage's Newton iteration."""

    iteration: Array
    z: State
    # ‖Δz‖ of the last iteration (in units of the tolerance) and the
    # contraction rate θ = ‖Δz_k‖/‖Δz_{k-1}‖ estimated from it.
    norm: Array
    rate: Array
    converged: Array
    diverged: Array


class Kvaerno5(AbstractImplicitSolver):
    """Kvaerno5: an L-stable, stiffly accurate ESDIRK 5(4) method.

    Stage i solves z_i = h f(t + c_i h, y + Σ_{j<i} a_ij z_j + γ z_i) for
    z_i = h k_i by simplified Newton iterations with the one matrix
    M = I − hγ J of the step (factorised once, reused by all six implicit
    stages). With dense linear solves J is also reused across steps while the
    iterations contract well (rate θ ≤ `reuse_rate` in every stage): a step
    then costs one LU and no Jacobian; after slow or failed iterations the
    next attempt evaluates J = ∂f/∂y(t, y) afresh. An iteration stops when its
    predicted remaining error θ/(1 − θ)‖Δz‖ is below `newton_kappa` times the
    error tolerance (Hairer & Wanner II, §IV.8); a stage whose iteration
    diverges (θ ≥ 1) or has not converged in `max_newton_iterations` makes
    the step invalid, and the controller retries it smaller. The converged
    stages are differentiated by the implicit function theorem
    (`lax.custom_root`), never by unrolling the iterations. Dense output: the
    cubic through y, two stage values and y_1 (no derivatives, so a stiff
    step's long interpolant stays as damped as its stages).

    **Arguments:**

    - `linear_solver`: `"dense"`, `"matrix_free"` or `"auto"` (see `Rodas5P`).
    - `newton_kappa`: the Newton tolerance as a fraction of the step's.
    - `max_newton_iterations`: per stage.
    - `reuse_rate`: the contraction rate up to which J is kept for the next
      step (0 evaluates it every step). A higher rate saves Jacobians and
      costs Newton iterations (evaluations of f). None: 0.01 for states of
      more than `REUSE_SIZE` unknowns, else 0 (a small system's Jacobian, a
      batch of JVPs, costs less than the iterations it would save).

    Reference: Kværnø (2004), BIT Numer. Math. 44, 489–502.
    """

    linear_solver: LinearSolver = eqx.field(default="auto", static=True)
    newton_kappa: float = eqx.field(default=0.01, static=True)
    max_newton_iterations: int = eqx.field(default=10, static=True)
    reuse_rate: float | None = eqx.field(default=None, static=True)

    tableau: ClassVar[ESDIRKTableau] = tableaus.KVAERNO5

    def __check_init__(self):
        if not 0 < self.newton_kappa < 1:
            raise ValueError(
                f"Kvaerno5: newton_kappa must lie in (0, 1), got {self.newton_kappa}"
            )
        if self.reuse_rate is not None and not 0 <= self.reuse_rate < 1:
            raise ValueError(
                f"Kvaerno5: reuse_rate must lie in [0, 1) or be None, got "
                f"{self.reuse_rate}"
            )
        if self.max_newton_iterations < 1:
            raise ValueError(
                "Kvaerno5: max_newton_iterations must be at least 1, got "
                f"{self.max_newton_iterations}"
            )

    @property
    def dense_degree(self) -> int:
        return 3

    @property
    def fevals_per_step(self) -> None:
        # The Newton iterations make it vary: counted step by step.
        return None

    def rate_for(self, y: State) -> float:
        """The reuse rate in force for a state like y."""
        if self.reuse_rate is not None:
            return self.reuse_rate
        return 0.01 if sum(leaf.size for leaf in y) > REUSE_SIZE else 0.0

    def init_carry(self, y0: State) -> tuple[Array, Array] | None:
        """(J to reuse, whether it may be reused) with dense solves, else None."""
        if self.rate_for(y0) <= 0 or not is_dense(self.linear_solver, y0):
            return None
        n = sum(leaf.size for leaf in y0)
        dtype = common_dtype(y0)
        return jnp.zeros((n, n), dtype), jnp.zeros((), bool)

    def step(
        self,
        f: FlatField,
        t: Array,
        y: State,
        f0: State,
        h: Array,
        dense: bool = True,
        tolerances: tuple[float, float] = (1e-6, 1e-8),
        carry: tuple[Array, Array] | None = None,
    ) -> StepResult:
        tab = self.tableau
        real = jnp.real(y[0]).dtype
        h_y = h.astype(real)
        gamma = tab.gamma
        if carry is None:
            system, jacobian = shifted_system(f, t, y, h_y * gamma, self.linear_solver)
            jacobians = jnp.ones((), jnp.int32)
        else:
            old, reusable = carry
            fresh = lambda: shifted_system(f, t, y, h_y * gamma, "dense")[1]
            jacobian = lax.cond(reusable, lambda: old, fresh)
            system, _ = shifted_system(f, t, y, h_y * gamma, "dense", jacobian=jacobian)
            jacobians = (~reusable).astype(jnp.int32)
        rtol, atol = tolerances
        scale = tuple(atol + rtol * jnp.abs(leaf).astype(real) for leaf in y)
        dtype = common_dtype(y)
        x = concat(y, dtype)
        s = tab.num_stages
        lower, predictor, c, b, b_error = (
            jnp.asarray(v, real)
            for v in (np.tril(tab.a, -1), tab.predictor, tab.c, tab.b, tab.b_error)
        )

        # One stage body in a loop (not unrolled): a smaller program to
        # compile. Row i of `stages` is z_i = h k_i (zero until solved).
        def stage(i, loop):
            stages, converged, fevals, worst = loop
            base = split(x + lower[i] @ stages, y)
            guess = split(predictor[i] @ stages, y)
            z_i, (ok, iterations, rate) = self._stage(
                f, t + c[i] * h, base, guess, h_y, system, scale
            )
            return (
                stages.at[i].set(concat(z_i, dtype)),
                converged & (ok > 0),
                fevals + iterations.astype(jnp.int32),
                jnp.maximum(worst, rate),
            )

        first = jnp.zeros((s, x.size), dtype).at[0].set(h_y * concat(f0, dtype))
        zero = jnp.zeros((), jnp.int32)
        init = (first, jnp.ones((), bool), zero, jnp.zeros((), real))
        stages, converged, fevals, worst = lax.fori_loop(1, s, stage, init)
        # Stiffly accurate: y1 is the last stage's value. f(t + h, y1) is
        # evaluated rather than taken as z_s/h (equal up to the Newton
        # tolerance), so that the next step starts from f(t, y) exactly and a
        # replayed step (CheckpointAdjoint) is the step that was taken.
        y1 = split(x + b @ stages, y)
        f1 = f(t + h, y1)
        fevals = fevals + 1
        y_error = split(b_error @ stages, y)
        coeffs = None
        if dense:
            weights = jnp.asarray(tab.stage_interpolant(DENSE_STAGES), real)
            coeffs = split_rows(weights @ stages, y)
        return StepResult(
            y1,
            y_error,
            f1,
            coeffs,
            converged=converged,
            cost=(fevals, jacobians),
            carry=(
                None
                if carry is None
                else (jacobian, converged & (worst <= self.rate_for(y)))
            ),
        )

    def _stage(self, f, t_i, base, guess, h_y, system, scale):
        """z with z = h f(t_i, base + γ z), and (converged, iterations, the
        last contraction rate)."""
        gamma = self.tableau.gamma
        kappa, max_iterations = self.newton_kappa, self.max_newton_iterations
        real = jnp.real(base[0]).dtype

        def residual(z: State) -> State:
            f_z = f(t_i, tuple(b + gamma * x for b, x in zip(base, z, strict=True)))
            return tuple(x - h_y * fx for x, fx in zip(z, f_z, strict=True))

        def newton(residual, z0):
            def body(c: _Newton) -> _Newton:
                dz = system.solve(tuple(-r for r in residual(c.z)))
                z = tuple(a + b for a, b in zip(c.z, dz, strict=True))
                norm = rms_norm(tuple(d / s for d, s in zip(dz, scale, strict=True)))
                norm = norm.astype(real)
                first = c.iteration == 0
                rate = jnp.where(first, 1.0, norm / jnp.maximum(c.norm, 1e-30))
                # First iteration: no rate yet, so ask ‖Δz‖ itself to be small.
                remaining = jnp.where(
                    first, norm, rate / jnp.maximum(1 - rate, 1e-30) * norm
                )
                finite = jnp.isfinite(norm)
                converged = finite & ((remaining <= kappa) | (norm == 0))
                diverged = ~finite | (~first & (rate >= 1) & ~converged)
                return _Newton(c.iteration + 1, z, norm, rate, converged, diverged)

            def running(c: _Newton):
                return ~c.converged & ~c.diverged & (c.iteration < max_iterations)

            init = _Newton(
                jnp.zeros((), jnp.int32),
                z0,
                jnp.ones((), real),
                jnp.ones((), real),
                jnp.zeros((), bool),
                jnp.zeros((), bool),
            )
            final = lax.while_loop(running, body, init)
            ok = (final.converged & ~final.diverged).astype(real)
            # The rate of the last iteration (0 after a single one).
            rate = jnp.where(final.iteration > 1, final.rate, 0).astype(real)
            return final.z, (ok, final.iteration.astype(real), rate)

        def tangent_solve(linear, rhs: State) -> State:
            # The exact derivative at the root: ∂R/∂z = I − hγ J(t_i, Y_i).
            dtype = common_dtype(rhs)
            flat = lambda v: concat(linear(split(v, rhs)), dtype)
            x0 = concat(rhs, dtype)
            if system.lu is not None:
                matrix = jax.jacfwd(flat)(jnp.zeros_like(x0))
                return split(jnp.linalg.solve(matrix, x0), rhs)
            x, _ = jax.scipy.sparse.linalg.gmres(flat, x0, tol=system.tol, atol=0.0)
            return split(x, rhs)

        return lax.custom_root(residual, guess, newton, tangent_solve, has_aux=True)
