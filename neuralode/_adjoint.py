"""How reverse-mode derivatives of a solve are computed.

`BacksolveAdjoint` is the continuous adjoint of Chen et al. (2018) as a
`jax.custom_vjp`; `CheckpointAdjoint` differentiates the discrete solver exactly
by replaying its stored steps; `ForwardMode` has no custom rule at all.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from ._adjoint_common import (
    custom_vjp_loop,
    direction_and_tau,
    first_step_argument,
    forward_check,
    instantiate,
    primal_solve,
    time_cotangents,
)
from ._controller import rms_norm
from ._event import event_function
from ._failure import checked
from ._integrate import LoopOptions, LoopStats, SolverConfig, integrate
from ._solution import RESULTS
from ._state import State, present


class AbstractAdjoint(eqx.Module):
    """How `solve` is differentiated in reverse mode."""

    #: Whether `loop` honours a problem's event (`problem.condition`): stops
    #: where `_integrate.integrate` does with `event=` and reports
    #: `stats.event`, with outputs after the stop frozen at the state there.
    supports_events: ClassVar[bool] = False

    @abc.abstractmethod
    def loop(
        self,
        config: SolverConfig,
        problem: Any,
        params: PyTree,
        y0: State,
        ts: Array,
        h0: Array | None = None,
    ) -> tuple[State, LoopStats]:
        """Solve the flat problem from ts[0] to ts[-1]: (ys, stats).

        `y0` is a tuple of flat vectors (see `State`) and `ys` the same tuple
        with a leading axis of len(ts). `problem.f_flat(τ, y, params,
        direction)` is the flat field in the loop's increasing time
        τ = direction·t; `h0 > 0` overrides the first step.
        """


class ForwardMode(AbstractAdjoint):
    """No custom derivative rule: JAX differentiates the solver loop directly.

    Forward mode (`jax.jvp`, `jax.jacfwd`) works through the `lax.while_loop`;
    step-size decisions are under `stop_gradient`. Reverse mode is not available
    (JAX cannot reverse a while loop): use `BacksolveAdjoint` or
    `CheckpointAdjoint` for `jax.grad`.
    """

    supports_events: ClassVar[bool] = True

    def loop(self, config, problem, params, y0, ts, h0=None):
        direction, tau = direction_and_tau(ts)
        f = lambda t, y: problem.f_flat(t, y, params, direction)
        event = event_function(problem, params, direction)
        return integrate(config, f, y0, tau, h0, event=event)[:2]


def _diagnoses(problem) -> bool:
    """Whether a solve of `problem` diagnoses stiffness on failure: not for an
    adjoint system, where it would differentiate a VJP (doubling the gradient's
    compile time) and the forward solve has diagnosed already."""
    return not isinstance(problem, AdjointProblem)


# --------------------------------------------------------------------------
# Backsolve: the continuous adjoint, with forward checkpoints.


#: The largest drift, in units of the backward tolerance, that the state
#: re-integrated backwards may show against the stored forward state at a
#: checkpoint before the gradient is refused (RESULTS.adjoint_drift). Local
#: errors that the reverse-time flow amplifies beyond this make a and the
#: parameter integral wrong by more than the tolerances suggest.
MAX_DRIFT = 1000.0


def stop_time(stats: LoopStats, tau: Array) -> Array | None:
    """Where a forward solve with an event stopped, from τ_0 and not
    differentiated (+inf if it ran to the end); None without an event."""
    if stats.event is None:
        return None
    stop = stats.event
    return lax.stop_gradient(jnp.where(stop.hit, stop.t_rel, jnp.inf).astype(tau.dtype))


def fold_frozen(ys_bar: State, tau: Array, t_stop: Array) -> tuple[State, Array]:
    """The outputs' cotangents of a solve stopped by an event at `t_stop` (from
    τ_0): outputs after it hold the last state, so their cotangents join the
    last output's and are zeroed. Returns them and the mask of those outputs."""
    frozen = lax.stop_gradient(tau - tau[0]) > t_stop
    folded = tuple(
        jnp.where(frozen[:, None], 0, bar)
        .at[-1]
        .set(bar[-1] + jnp.sum(jnp.where(frozen[:-1, None], bar[:-1], 0), axis=0))
        for bar in ys_bar
    )
    return folded, frozen


def state_drift(
    z: State, z_stored: State, a: State, a_max: Array, rtol: float, atol: float
) -> Array:
    """How far the reconstructed z is from the stored one where it matters:
    ‖a ⊙ (z - z_stored)‖ / (a_max · (atol + rtol·‖z_stored‖)), RMS norms over
    the whole state, with a_max the largest ‖a‖ seen so far. The adjoint
    weighs each component's error by the gradient's sensitivity to it: where
    a flow contracts, a shrinks backwards as fast as z's errors grow, and a
    sample of a batch whose adjoint is small cannot spoil the gradient. inf
    when z or a is not finite."""
    weighted = tuple(
        jnp.abs(w) * (x - y) for w, x, y in zip(a, z, z_stored, strict=True)
    )
    scale = a_max * (atol + rtol * rms_norm(z_stored))
    drift = rms_norm(weighted) / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
    return jnp.where(jnp.isnan(drift), jnp.inf, drift)


class BackwardState(NamedTuple):
    """The carry of BacksolveAdjoint's backward pass over the grid intervals."""

    z: State  # the state at grid[pos] (the stored forward one)
    a: State  # the adjoint there, output cotangents included
    g: State  # the parameter integral so far, one vector per parameter leaf
    pos: Array  # the grid index reached
    h: Array  # the last step size, for the next interval's first step
    stats: LoopStats  # the backward solves' counts, failure and largest drift
    a_max: Array  # the largest RMS norm of a so far (weighs the drift)


class AdjointProblem(eqx.Module):
    """The adjoint system of `base`, forwards in the base's time τ.

    For the state (z..., a..., g...) (z and a with the m leaves of the base
    state, g one flat vector per inexact array leaf of the parameters θ):

        dz/dτ = f(τ, z),  da/dτ = -aᵀ∂f/∂z,  dg/dτ = -aᵀ∂f/∂θ,

    with both products from one `jax.vjp` of f. Its parameters are
    `(base_params, base_direction)`, so it is a problem like any other and its
    own solve can be differentiated again (gradients of gradients).
    """

    base: Any
    m: int = eqx.field(static=True)

    def f_flat(self, tau: Array, state: State, params: PyTree, direction: Array):
        base_params, base_direction = params
        m = self.m
        z, a = state[:m], state[m : 2 * m]
        diff, fixed = eqx.partition(base_params, eqx.is_inexact_array)
        t = direction * tau

        def f(z, diff):
            return self.base.f_flat(t, z, eqx.combine(diff, fixed), base_direction)

        fz, vjp = jax.vjp(f, z, diff)
        a_dz, a_ddiff = vjp(a)
        # One vector per parameter leaf, not one raveled vector: fused into the
        # step's combination of stages, a concatenation of the leaves makes
        # XLA:CPU recompute the bias gradients' batch sums for every element
        # (benchmarks/BOUNDS.md has the measurement).
        g = state[2 * m :]
        a_dtheta = tuple(
            x.reshape(-1).astype(leaf.dtype)
            for x, leaf in zip(jax.tree.leaves(a_ddiff), g, strict=True)
        )
        out = (*fz, *(-x for x in a_dz), *(-x for x in a_dtheta))
        return tuple(direction * x for x in out)


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
    number of steps. Each backward solve is itself differentiable, so gradients
    of gradients work.

    A `custom_vjp` blocks forward-mode differentiation (`jax.jvp`,
    `jax.jacfwd`): use `ForwardMode()` for those.

    **Arguments:**

    - `rtol`, `atol`: tolerances of the backward solve (default: the forward ones).
    - `seminorm`: leave the parameter integral g out of the backward error norm
      (Kidger, Chen & Lyons 2021). The norm is the maximum of the per-group RMS
      norms of z, a (and g), so the seminorm never takes more steps.
    - `checkpoints`: extra evenly spaced forward states kept for resetting z
      (default 8; 0 keeps only the outputs). Each costs one stored state.
    - `checkpoint_min_steps`: the backward solve stops to reset z at a
      checkpoint only if the forward solve took at least this many steps from
      there to the next grid time (default 4), so that solves of a few steps
      pay nothing for checkpoints; output times are always stops.

    The backward solve cannot be trusted everywhere: where the forward flow
    contracts strongly or is chaotic, the reverse-time reconstruction of z
    amplifies its local errors. At every stop the reconstructed z is compared
    with the stored forward state; when their difference, weighed by the size
    of the adjoint there (the gradient's sensitivity to it), exceeds
    `MAX_DRIFT` times the backward tolerance, the gradient is refused
    (`SolveError` naming `CheckpointAdjoint`, or NaN with `throw=False`)
    instead of being returned wrong. z always counts in the backward error
    norm: leaving it out made the reconstruction unstable on stiff problems.

    References: Chen, Rubanova, Bettencourt & Duvenaud (2018), "Neural ordinary
    differential equations"; Kidger, Chen & Lyons (2021), "'Hey, that's not an
    ODE': faster ODE adjoints via seminorms"; Rackauckas et al. (2020),
    "Universal differential equations" (checkpointed backsolve).
    """

    rtol: float | None = None
    atol: float | None = None
    seminorm: bool = eqx.field(default=True, static=True)
    checkpoints: int = eqx.field(default=8, static=True)
    checkpoint_min_steps: int = eqx.field(default=4, static=True)
    supports_events: ClassVar[bool] = True

    def __check_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"BacksolveAdjoint: {name} must be >= 0, got {value}")
        for name in ("checkpoints", "checkpoint_min_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(
                    f"BacksolveAdjoint: {name} must be an int, got {value!r}"
                )
        if self.checkpoints < 0:
            raise ValueError(
                f"BacksolveAdjoint: checkpoints must be >= 0, got {self.checkpoints}"
            )

    def _backward_config(self, config: SolverConfig, m: int, q: int) -> SolverConfig:
        rtol = config.rtol if self.rtol is None else float(self.rtol)
        atol = config.atol if self.atol is None else float(self.atol)
        if rtol == 0 and atol == 0:
            raise ValueError("BacksolveAdjoint: rtol and atol cannot both be zero")
        # Each leaf of z and a counts on its own, and the q leaves of g (without
        # the seminorm) together.
        groups = tuple((i,) for i in range(2 * m))
        if not self.seminorm and q:
            groups += (tuple(range(2 * m, 2 * m + q)),)
        return SolverConfig(
            config.solver,
            config.controller,
            rtol,
            atol,
            None,
            config.max_steps,
            groups,
            time_dependent=config.time_dependent,
            throw=config.throw,
            first_step_given=True,
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

    def loop(self, config, problem, params, y0, ts, h0=None):
        direction, tau = direction_and_tau(ts)
        params_arrays, params_static = eqx.partition(params, eqx.is_array)

        def forward(params_arrays, y0, tau, direction, h0):
            params = eqx.combine(params_arrays, params_static)
            return self.forward(config, problem, params, direction, y0, tau, h0)

        def backward(
            ys_grid, fwd_stats, params_arrays, y0, tau, direction, ys_grid_bar
        ):
            params = eqx.combine(params_arrays, params_static)
            cotangents, stats = self.backward(
                config,
                problem,
                params,
                direction,
                tau,
                ys_grid,
                instantiate(ys_grid_bar),
                fwd_stats.output_steps,
                fwd_stats.h_last,
                stop_time(fwd_stats, tau),
            )
            return checked(
                config,
                cotangents,
                stats,
                -direction,
                direction * tau[-1],
                direction * tau[0],
                "backward (adjoint) solve",
            )

        def select(ys_grid, tau):
            return tuple(leaf[self._grid(tau)[1]] for leaf in ys_grid)

        def expand(ys_grid, tau, ys_bar):
            index = self._grid(tau)[1]
            return tuple(
                jnp.zeros_like(leaf).at[index].add(bar)
                for leaf, bar in zip(ys_grid, ys_bar, strict=True)
            )

        # Not differentiated, the solve keeps no checkpoints.
        primal = primal_solve(config, problem, params_static, _diagnoses(problem))
        solve = custom_vjp_loop(
            forward, backward, primal, select, expand, forward_check(config)
        )
        h0 = first_step_argument(h0, tau)
        return solve(params_arrays, y0, tau, direction, h0)

    def forward(self, config, problem, params, direction, y0, tau, h0=None):
        """The forward solve on the output-and-checkpoint grid `self._grid(tau)`.

        **Returns:** `(ys_grid, stats)`, with the forward step count at every
        grid time in `stats.output_steps` when there are checkpoints.
        """
        f = lambda t, y: problem.f_flat(t, y, params, direction)
        grid = self._grid(tau)[0]
        record = self.checkpoints > 0
        options = LoopOptions(
            diagnose_stiffness=_diagnoses(problem), record_output_steps=record
        )
        event = event_function(problem, params, direction)
        return integrate(config, f, y0, grid, h0, options, event)[:2]

    def backward(
        self,
        config: SolverConfig,
        problem: Any,
        params: PyTree,
        direction: Array,
        tau: Array,
        ys_grid: State,
        ys_grid_bar: State,
        output_steps: Array | None = None,
        h_forward: Array | None = None,
        t_stop: Array | None = None,
    ) -> tuple[tuple[PyTree, Array, Array], LoopStats]:
        """Integrate the adjoint system from the last grid time back to the first.

        `ys_grid` are the forward states on `self._grid(tau)` (outputs and
        checkpoints), `ys_grid_bar` their cotangents, `output_steps` the
        forward step count at each grid time and `h_forward` the forward
        solve's last step size, the backward solve's first (each later
        interval starts with the step size the previous one ended with; every
        first step is capped by Hairer's bound from the adjoint field at the
        interval's start, which alone sets it without `h_forward`). A forward
        solve stopped by an event at `t_stop` (τ, from `stop_time`) has its
        states after it frozen there: the grid is clipped to `t_stop`, so the
        backward solve starts there and its intervals after it are empty. The solve
        stops at every output time and at every checkpoint after which the
        forward solve took at least `checkpoint_min_steps` steps; elsewhere a
        reset would cost more than the drift it corrects.

        **Returns:** `((params_bar, y0_bar, tau_bar), stats)`, `params_bar` holding
        cotangents for the inexact array leaves of `params` (None elsewhere).
        """
        diff = eqx.filter(params, eqx.is_inexact_array)
        theta, theta_def = jax.tree.flatten(diff)
        m, q = len(ys_grid), len(theta)
        dtype = ys_grid[0].dtype
        g_zero = tuple(jnp.zeros(leaf.size, dtype) for leaf in theta)

        def clipped_grid(tau):
            grid = self._grid(tau)[0]
            return grid if t_stop is None else jnp.minimum(grid, tau[0] + t_stop)

        grid, grid_vjp = jax.vjp(clipped_grid, tau)
        last = grid.shape[0] - 1
        is_output = jnp.zeros(last + 1, bool).at[self._grid(tau)[1]].set(True)
        if output_steps is None:
            stops = is_output
        else:
            steps_after = jnp.diff(output_steps, append=output_steps[-1:])
            stops = is_output | (steps_after >= self.checkpoint_min_steps)
        adjoint_problem = AdjointProblem(problem, m)
        adjoint_params = (params, direction)
        bconfig = self._backward_config(config, m, q)
        # The backward solves use a plain backsolve (no checkpoints of their
        # own); being custom_vjp solves themselves, they can be differentiated.
        inner = BacksolveAdjoint(self.rtol, self.atol, self.seminorm, 0)
        at = lambda leaves, k: tuple(leaf[k] for leaf in leaves)

        def solve_to(k, carry: BackwardState) -> BackwardState:
            """From the current grid point back to grid[k], then reset z there."""
            z, a, g, pos, h, stats, a_max = carry
            state = (*z, *a, *g_zero)
            span = jnp.stack([grid[pos], grid[k]])
            out, st = inner.loop(
                bconfig, adjoint_problem, adjoint_params, state, span, h
            )
            end = at(out, -1)
            z_stored = at(ys_grid, k)
            drift = lax.stop_gradient(
                state_drift(
                    end[:m], z_stored, end[m : 2 * m], a_max, bconfig.rtol,
                    bconfig.atol,
                )
            )  # fmt: skip
            failed_before = stats.result != RESULTS.successful
            keep = lambda old, new: jnp.where(failed_before, old, new)
            drift_max = present(stats.drift)  # the backward stats carry it (stats0)
            worse = ~failed_before & (drift > drift_max)
            stats = LoopStats(
                num_steps=stats.num_steps + st.num_steps,
                num_accepted=stats.num_accepted + st.num_accepted,
                num_fevals=stats.num_fevals + st.num_fevals,
                num_jacobians=stats.num_jacobians + st.num_jacobians,
                result=keep(stats.result, st.result),
                t_reached=jnp.where(
                    failed_before,
                    stats.t_reached,
                    jnp.where(
                        st.result != RESULTS.successful,
                        st.t_reached,
                        jnp.where(worse, -grid[k], stats.t_reached),
                    ),
                ),
                h_last=keep(stats.h_last, st.h_last),
                stiffness=keep(stats.stiffness, st.stiffness),
                drift=jnp.where(worse, drift, drift_max),
            )
            h = lax.stop_gradient(jnp.where(st.num_accepted > 0, jnp.abs(st.h_last), h))
            a = tuple(
                x + bar
                for x, bar in zip(end[m : 2 * m], at(ys_grid_bar, k), strict=True)
            )
            g = tuple(x + y for x, y in zip(g, end[2 * m :], strict=True))
            a_max = jnp.maximum(a_max, lax.stop_gradient(rms_norm(a)))
            return BackwardState(z_stored, a, g, k.astype(jnp.int32), h, stats, a_max)

        def interval(i, carry):
            k = (last - 1 - i).astype(jnp.int32)
            return lax.cond(stops[k], solve_to, lambda k, carry: carry, k, carry)

        zero = jnp.zeros((), jnp.int32)
        real = jnp.real(jnp.zeros((), dtype)).dtype
        nan = jnp.full((), jnp.nan, real)
        stats0 = LoopStats(
            zero, zero, zero, zero, -grid[last], nan, nan, drift=jnp.zeros((), real),
            num_jacobians=zero,
        )  # fmt: skip
        seed = at(ys_grid_bar, last)
        h_first = jnp.zeros((), tau.dtype) if h_forward is None else h_forward
        h_first = lax.stop_gradient(jnp.abs(h_first)).astype(tau.dtype)
        init = BackwardState(
            at(ys_grid, last), seed, g_zero, last + zero, h_first,
            stats0, lax.stop_gradient(rms_norm(seed)).astype(real),
        )  # fmt: skip
        final = lax.fori_loop(0, last, interval, init)
        a, g, stats = final.a, final.g, final.stats
        lost = (stats.result == RESULTS.successful) & (stats.drift > MAX_DRIFT)
        stats = stats._replace(
            result=jnp.where(lost, RESULTS.adjoint_drift, stats.result).astype(
                stats.result.dtype
            )
        )
        # The adjoint at grid[0] before ȳ_0 was added, for ∂L/∂τ_0.
        a_before = tuple(x - bar[0] for x, bar in zip(a, ys_grid_bar, strict=True))
        grid_bar = time_cotangents(
            problem, params, direction, grid, ys_grid, ys_grid_bar, a_before
        )
        (tau_bar,) = grid_vjp(grid_bar)
        params_bar = [
            x.reshape(leaf.shape).astype(leaf.dtype)
            for x, leaf in zip(g, theta, strict=True)
        ]
        return (jax.tree.unflatten(theta_def, params_bar), a, tau_bar), stats
