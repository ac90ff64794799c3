"""How reverse-mode derivatives of a solve are computed.

`BacksolveAdjoint` is the continuous adjoint of Chen et al. (2018) as a
`jax.custom_vjp`; `CheckpointAdjoint` differentiates the discrete solver exactly
by replaying its stored steps; `ForwardMode` has no custom rule at all.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from ._controller import grouped_rms_norm, rms_norm
from ._failure import raise_if_failed
from ._integrate import LoopStats, SolverConfig, first_step, integrate
from ._problem import ODEProblem
from ._solution import RESULTS


def _direction_and_tau(ts: Array) -> tuple[Array, Array]:
    direction = lax.stop_gradient(jnp.sign(ts[-1] - ts[0]))
    return direction, direction * ts


class AbstractAdjoint(eqx.Module):
    """How `solve` is differentiated in reverse mode."""

    @abc.abstractmethod
    def loop(
        self,
        config: SolverConfig,
        problem: ODEProblem,
        params: PyTree,
        y0: Array,
        ts: Array,
    ) -> tuple[Array, LoopStats]:
        """Solve the flat problem, returning (ys_flat, stats)."""


class ForwardMode(AbstractAdjoint):
    """No custom derivative rule: JAX differentiates the solver loop directly.

    Forward mode (`jax.jvp`, `jax.jacfwd`) works through the `lax.while_loop`;
    step-size decisions are under `stop_gradient`. Reverse mode is not available
    (JAX cannot reverse a while loop): use `BacksolveAdjoint` or
    `CheckpointAdjoint` for `jax.grad`.
    """

    def loop(self, config, problem, params, y0, ts):
        direction, tau = _direction_and_tau(ts)
        f = lambda t, y: problem.f_flat(t, y, params, direction)
        return integrate(config, f, rms_norm, y0, tau)


# --------------------------------------------------------------------------
# Parameters: the inexact array leaves get gradients, everything else is fixed.


class _Params(NamedTuple):
    """Split of the problem's parameters into differentiable and fixed parts."""

    diff: PyTree
    fixed: PyTree


def _split_params(params: PyTree) -> _Params:
    diff, fixed = eqx.partition(params, eqx.is_inexact_array)
    return _Params(diff, fixed)


def _parameter_cotangents(params_bar: PyTree, params_arrays: PyTree) -> PyTree:
    """Cotangents for every array leaf: computed for inexact ones (cast to the
    leaf's dtype), zeros (float0 for integer and boolean leaves) elsewhere."""
    filled = eqx.combine(params_bar, jax.tree.map(_zero_cotangent, params_arrays))
    return jax.tree.map(
        lambda bar, x: (
            lax.convert_element_type(bar, x.dtype)
            if eqx.is_inexact_array(x)
            else _zero_cotangent(x)
        ),
        filled,
        params_arrays,
    )


def _zero_cotangent(x):
    if eqx.is_inexact_array(x):
        return jnp.zeros_like(x)
    if eqx.is_array(x):
        return np.zeros(x.shape, dtype=jax.dtypes.float0)
    return None


def _output_time_cotangents(
    f: Callable[[Array, Array], Array], tau: Array, ys: Array, ys_bar: Array, a0: Array
) -> Array:
    """∂L/∂τ_i = ȳ_i · f(τ_i, y_i) for i ≥ 1 and ∂L/∂τ_0 = -a(τ_0) · f(τ_0, y_0).

    `a0` is the adjoint at τ_0 from the later outputs (the output ys[0] = y0 does
    not move with τ_0). Chen et al. (2018), appendix B.2.
    """
    fs = jax.vmap(f)(tau, ys)
    dots = jnp.sum(jnp.real(jnp.conj(ys_bar) * fs), axis=-1)
    first = -jnp.sum(jnp.real(jnp.conj(a0) * fs[0]))
    return dots.at[0].set(first).astype(tau.dtype)


# --------------------------------------------------------------------------
# Backsolve: the continuous adjoint, with forward checkpoints.


def _augmented_field(
    problem: ODEProblem, split: _Params, direction: Array, n: int
) -> Callable[[Array, Array], Array]:
    """The backward system in σ = -τ, for the flat state [z, a, g].

    dz/dσ = -f(τ, z),  da/dσ = aᵀ∂f/∂z,  dg/dσ = aᵀ∂f/∂θ,
    with both products from one `jax.vjp` of f per evaluation.
    """
    theta, unravel_theta = ravel_pytree(split.diff)

    def field(sigma: Array, state: Array) -> Array:
        z, a = state[:n], state[n : 2 * n]

        def f(z, theta):
            params = eqx.combine(unravel_theta(theta), split.fixed)
            return problem.f_flat(-sigma, z, params, direction)

        fz, vjp = jax.vjp(f, z, theta)
        a_dz, a_dtheta = vjp(a)
        return jnp.concatenate([-fz, a_dz, a_dtheta.astype(state.dtype)])

    return field


class BacksolveAdjoint(AbstractAdjoint):
    """The continuous adjoint method (Chen et al. 2018), as a `jax.custom_vjp`.

    The forward pass keeps only the outputs at `ts` and `checkpoints` extra
    states at evenly spaced times. The backward pass integrates, from the last
    output time to the first,

        dz/dt = f(z, t, θ),  da/dt = -aᵀ∂f/∂z,  dg/dt = -aᵀ∂f/∂θ,

    adding each output's cotangent to a as it passes it. At every output and
    checkpoint time z is reset to the stored forward state, so the reverse-time
    reconstruction of z cannot drift away on long horizons where the forward
    flow contracts. Memory is O(len(ts) + checkpoints), independent of the
    number of steps.

    A `custom_vjp` blocks forward-mode differentiation (`jax.jvp`,
    `jax.jacfwd`): use `ForwardMode()` for those.

    **Arguments:**

    - `rtol`, `atol`: tolerances of the backward solve (default: the forward ones).
    - `seminorm`: leave the parameter integral g out of the backward error norm
      (Kidger, Chen & Lyons 2021). The norm is the maximum of the per-group RMS
      norms of z, a (and g), so the seminorm never takes more steps.
    - `checkpoints`: extra evenly spaced forward states kept for resetting z
      (default 8; 0 keeps only the outputs).

    References: Chen, Rubanova, Bettencourt & Duvenaud (2018), "Neural ordinary
    differential equations"; Kidger, Chen & Lyons (2021), "'Hey, that's not an
    ODE': faster ODE adjoints via seminorms"; Rackauckas et al. (2020),
    "Universal differential equations" (checkpointed backsolve).
    """

    rtol: float | None = None
    atol: float | None = None
    seminorm: bool = eqx.field(default=True, static=True)
    checkpoints: int = eqx.field(default=8, static=True)

    def __check_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"BacksolveAdjoint: {name} must be >= 0, got {value}")
        if self.checkpoints < 0:
            raise ValueError(
                f"BacksolveAdjoint: checkpoints must be >= 0, got {self.checkpoints}"
            )

    def backward_config(self, config: SolverConfig) -> SolverConfig:
        rtol = config.rtol if self.rtol is None else float(self.rtol)
        atol = config.atol if self.atol is None else float(self.atol)
        if rtol == 0 and atol == 0:
            raise ValueError("BacksolveAdjoint: rtol and atol cannot both be zero")
        return SolverConfig(
            config.solver, config.controller, rtol, atol, None, config.max_steps
        )

    def _grid(self, tau: Array) -> tuple[Array, Array]:
        """Output times merged with the checkpoint times, and the outputs' places."""
        n_out = tau.shape[0]
        if self.checkpoints == 0:
            return tau, jnp.arange(n_out)
        extra = jnp.linspace(tau[0], tau[-1], self.checkpoints + 2)[1:-1]
        merged = jnp.concatenate([tau, extra.astype(tau.dtype)])
        order = jnp.argsort(merged, stable=True)
        rank = jnp.argsort(order, stable=True)
        return merged[order], rank[:n_out]

    def loop(self, config, problem, params, y0, ts):
        direction, tau = _direction_and_tau(ts)
        params_arrays, params_static = eqx.partition(params, eqx.is_array)

        @jax.custom_vjp
        def solve(params_arrays, y0, tau):
            return self._forward(
                config, problem, params_arrays, params_static, direction, y0, tau
            )[:2]

        def fwd(params_arrays, y0, tau):
            ys, stats, ys_grid = self._forward(
                config, problem, params_arrays, params_static, direction, y0, tau
            )
            return (ys, stats), (params_arrays, tau, ys_grid)

        def bwd(residuals, cotangents):
            params_arrays, tau, ys_grid = residuals
            ys_bar = cotangents[0]
            params = eqx.combine(params_arrays, params_static)
            (params_bar, y0_bar, tau_bar), stats = self.backward(
                config, problem, params, direction, tau, ys_grid, ys_bar
            )
            raise_if_failed(
                stats,
                -direction,
                tau[-1] * direction,
                tau[0] * direction,
                config.max_steps,
                type(config.solver).__name__,
                "backward (adjoint) solve",
            )
            return _parameter_cotangents(params_bar, params_arrays), y0_bar, tau_bar

        solve.defvjp(fwd, bwd)
        return solve(params_arrays, y0, tau)

    def _forward(
        self, config, problem, params_arrays, params_static, direction, y0, tau
    ):
        params = eqx.combine(params_arrays, params_static)
        f = lambda t, y: problem.f_flat(t, y, params, direction)
        grid, out_index = self._grid(tau)
        ys_grid, stats = integrate(config, f, rms_norm, y0, grid)
        return ys_grid[out_index], stats, ys_grid

    def backward(
        self,
        config: SolverConfig,
        problem: ODEProblem,
        params: PyTree,
        direction: Array,
        tau: Array,
        ys_grid: Array,
        ys_bar: Array,
    ) -> tuple[tuple[PyTree, Array, Array], LoopStats]:
        """Integrate the adjoint system from tau[-1] back to tau[0].

        **Returns:** `((params_bar, y0_bar, tau_bar), stats)`, `params_bar` holding
        cotangents for the inexact array leaves of `params` (None elsewhere).
        """
        split = _split_params(params)
        theta, unravel_theta = ravel_pytree(split.diff)
        n = ys_grid.shape[1]
        p = theta.shape[0]
        dtype = ys_grid.dtype
        grid, out_index = self._grid(tau)
        ys_bar_grid = jnp.zeros_like(ys_grid).at[out_index].add(ys_bar)
        field = _augmented_field(problem, split, direction, n)
        bconfig = self.backward_config(config)
        norm = grouped_rms_norm((n, n) if self.seminorm else (n, n, p))
        last = grid.shape[0] - 1

        def start(k, a):
            """The backward state at grid[k]: z reset to the forward checkpoint."""
            return jnp.concatenate(
                [ys_grid[k], a + ys_bar_grid[k], jnp.zeros(p, dtype)]
            )

        def interval(i, carry):
            a, g, h, stats = carry
            k = last - i
            sigma = -jnp.stack([grid[k], grid[k - 1]])
            out, st = integrate(
                bconfig, field, norm, start(k, a), sigma, h0=h, diagnose_stiffness=False
            )
            end = out[-1]
            failed_before = stats.result != RESULTS.successful
            stats = LoopStats(
                num_steps=stats.num_steps + st.num_steps,
                num_accepted=stats.num_accepted + st.num_accepted,
                num_fevals=stats.num_fevals + st.num_fevals,
                result=jnp.where(failed_before, stats.result, st.result),
                t_reached=jnp.where(failed_before, stats.t_reached, st.t_reached),
                h_last=jnp.where(failed_before, stats.h_last, st.h_last),
                stiffness=jnp.where(failed_before, stats.stiffness, st.stiffness),
            )
            h_next = jnp.where(st.num_accepted > 0, jnp.abs(st.h_last), h)
            return end[n : 2 * n], g + end[2 * n :], h_next, stats

        state0 = start(last, jnp.zeros(n, dtype))
        sigma0 = -grid[last]
        h0, init_fevals = first_step(
            bconfig,
            field,
            norm,
            sigma0,
            state0,
            field(sigma0, state0),
            jnp.abs(grid[last] - grid[0]),
        )
        zero = jnp.zeros((), jnp.int32)
        real = jnp.real(jnp.zeros((), dtype)).dtype
        stats0 = LoopStats(
            zero, zero, zero + 1 + init_fevals, zero, sigma0, h0, jnp.zeros((), real)
        )
        init = (jnp.zeros(n, dtype), jnp.zeros(p, dtype), h0, stats0)
        a, g, _, stats = lax.fori_loop(0, last, interval, init)
        f = lambda t, y: problem.f_flat(t, y, params, direction)
        tau_bar = _output_time_cotangents(f, tau, ys_grid[out_index], ys_bar, a)
        y0_bar = a + ys_bar_grid[0]
        return (unravel_theta(g), y0_bar, tau_bar), stats


# --------------------------------------------------------------------------
# Checkpoint: store the accepted steps, replay them backwards exactly.


class CheckpointAdjoint(AbstractAdjoint):
    """Differentiate the discrete solution exactly (discretise-then-optimise).

    The forward pass stores every accepted step (its start time, end time and
    start state) in buffers of length `max_steps`; the backward pass walks the
    steps in reverse and back-propagates through each single Runge–Kutta step
    and the interpolation of the outputs it covers. The gradient equals that of
    the computed solution to rounding. Memory grows linearly with `max_steps`
    (`max_steps × state size` floats), so keep `max_steps` near what the solve
    needs. Step-size decisions are not differentiated.

    Gradients with respect to `ts` use the continuous-time formula
    ∂L/∂t_i = ȳ_i·f(t_i, y_i) (and -a(t_0)·f(t_0, y_0) for t_0).

    A `custom_vjp` blocks forward-mode differentiation: use `ForwardMode()` for
    `jax.jvp`/`jax.jacfwd`.
    """

    def loop(self, config, problem, params, y0, ts):
        direction, tau = _direction_and_tau(ts)
        params_arrays, params_static = eqx.partition(params, eqx.is_array)

        def forward(params_arrays, y0, tau):
            params = eqx.combine(params_arrays, params_static)
            f = lambda t, y: problem.f_flat(t, y, params, direction)
            return integrate(config, f, rms_norm, y0, tau, record_steps=True)

        @jax.custom_vjp
        def solve(params_arrays, y0, tau):
            return forward(params_arrays, y0, tau)[:2]

        def fwd(params_arrays, y0, tau):
            ys, stats, record = forward(params_arrays, y0, tau)
            return (ys, stats), (params_arrays, y0, tau, ys, record)

        def bwd(residuals, cotangents):
            params_arrays, y0, tau, ys, record = residuals
            params = eqx.combine(params_arrays, params_static)
            params_bar, y0_bar, tau_bar = self.backward(
                config, problem, params, direction, tau, ys, record, cotangents[0]
            )
            return _parameter_cotangents(params_bar, params_arrays), y0_bar, tau_bar

        solve.defvjp(fwd, bwd)
        return solve(params_arrays, y0, tau)

    @staticmethod
    def backward(config, problem, params, direction, tau, ys, record, ys_bar):
        """Reverse sweep over the recorded steps; returns the three cotangents."""
        split = _split_params(params)
        theta, unravel_theta = ravel_pytree(split.diff)
        n_out = tau.shape[0]
        solver = config.solver
        real = jnp.real(ys).dtype

        def step(y, theta, t, t_new):
            p = eqx.combine(unravel_theta(theta), split.fixed)
            f = lambda s, x: problem.f_flat(s, x, p, direction)
            result = solver.step(f, t, y, f(t, y), t_new - t)
            return result.y1, result.dense

        def body(carry):
            k, a, g = carry
            t, t_new = record.times[k], record.times[k + 1]
            y = record.y_starts[k]
            h = (t_new - t).astype(real)
            first = jnp.searchsorted(tau, t, side="right")
            y1_bar = a
            y_bar = jnp.zeros_like(a)
            (y1, dense), vjp = jax.vjp(lambda y, th: step(y, th, t, t_new), y, theta)
            dense_bar = jnp.zeros_like(dense)

            # Cotangents of the outputs this step wrote: ys[i] = y1 at the step's
            # end, else y + Σ_p θ^(p+1) dense[p].
            def out_cond(c):
                i = c[0]
                return (i < n_out) & (tau[jnp.minimum(i, n_out - 1)] <= t_new)

            def out_body(c):
                i, y1_bar, y_bar, dense_bar = c
                bar = ys_bar[i]
                at_end = tau[i] == t_new
                theta_i = ((tau[i] - t) / h).astype(real)
                powers = theta_i ** jnp.arange(1, dense.shape[0] + 1, dtype=real)
                y1_bar = y1_bar + jnp.where(at_end, bar, 0)
                y_bar = y_bar + jnp.where(at_end, 0, bar)
                dense_bar = dense_bar + jnp.where(at_end, 0, powers[:, None] * bar)
                return i + 1, y1_bar, y_bar, dense_bar

            _, y1_bar, y_bar, dense_bar = lax.while_loop(
                out_cond, out_body, (first, y1_bar, y_bar, dense_bar)
            )
            y_bar_step, theta_bar = vjp((y1_bar, dense_bar))
            return k - 1, y_bar + y_bar_step, g + theta_bar

        dtype = ys.dtype
        init = (record.count - 1, jnp.zeros(ys.shape[1], dtype), jnp.zeros_like(theta))
        _, a, g = lax.while_loop(lambda c: c[0] >= 0, body, init)
        f = lambda t, y: problem.f_flat(t, y, params, direction)
        tau_bar = _output_time_cotangents(f, tau, ys, ys_bar, a)
        return unravel_theta(g), a + ys_bar[0], tau_bar
