"""`InterpolatingAdjoint`: the continuous adjoint with the state read from the
forward solve's dense output, the parameter gradient by Gauss–Legendre
quadrature.

With τ the loop's increasing time, f(τ, z, θ) the field and outputs z(τ_i)
with cotangents ȳ_i, the adjoint a(τ) = ∂L/∂z(τ) solves, backwards from τ_N,

    da/dτ = -aᵀ ∂f/∂z(τ, z(τ), θ),   a(τ_N) = ȳ_N,  a jumps by ȳ_i at τ_i,

and ∂L/∂θ = ∫_{τ_0}^{τ_N} aᵀ ∂f/∂θ(τ, z(τ), θ) dτ, ∂L/∂z_0 = a(τ_0).

`BacksolveAdjoint` integrates z backwards alongside a, which is unstable where
the forward flow contracts (a decay becomes growth) and impossible on stiff
problems. Here z(τ) is the forward solve's own dense output: the forward pass
keeps the start states of its accepted steps (`StepRecord`, thinned to a
bounded number of slots as in `CheckpointAdjoint`), and the backward pass
recomputes them window by window (at most `window` steps at a time), keeping
each recomputed step's start state and interpolation coefficients. Between
window boundaries and output times the backward solve carries a alone: its
error control sees a and nothing else, and an implicit method's linear algebra
has only a's unknowns. For a stable forward problem a is stable backwards, so
a stiff forward problem gives a stiff but stable adjoint problem, solved with
the same (implicit) method.

The parameter integral is a composite Gauss–Legendre rule on the forward
steps: on each forward step the interpolated z is a polynomial, so the
integrand is smooth there (its derivatives jump only at step boundaries); n
nodes per step are exact for degree 2n-1. The values of a at the nodes are the
backward solve's dense output (outputs cost no extra steps), and the integrand
of all the nodes of a window is one batched VJP of f. This is the "Gauss
adjoint" of SciMLSensitivity (Rackauckas et al.; `GaussAdjoint`, which
integrates the quadrature per backward step through a callback); here the
nodes sit on the forward steps so that the whole window's quadrature is one
batched evaluation.

References: Pontryagin et al. (1962); Chen, Rubanova, Bettencourt & Duvenaud
(2018), "Neural ordinary differential equations"; Kim, Ji, Deng, Ma &
Rackauckas (2021), "Stiff neural ordinary differential equations" (the
interpolating adjoint, and why the backsolve fails on stiff problems);
SciMLSensitivity.jl, `InterpolatingAdjoint` and `GaussAdjoint` (PR #861).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from . import _interpolation as interp
from ._adjoint import AbstractAdjoint
from ._adjoint_common import (
    custom_vjp_loop,
    direction_and_tau,
    first_step_argument,
    forward_check,
    instantiate,
    primal_solve,
    time_cotangents,
)
from ._failure import checked
from ._integrate import (
    LoopOptions,
    LoopStats,
    SolverConfig,
    integrate,
    tolerances,
)
from ._solution import RESULTS
from ._state import State
from ._step_record import StepRecord, kept_slots, thinned_stride

#: The phase named in the message of a failed adjoint solve.
_PHASE = "reverse-time adjoint solve of InterpolatingAdjoint"


class _Window(NamedTuple):
    """Steps [k0, k0 + count) of the forward solve, recomputed: step i starts
    at `times[i]` (measured from τ_0; inf past the last valid end) from
    `ys[·][i]` with interpolation coefficients `coeffs[·][i]`."""

    ys: State
    coeffs: State
    times: Array
    count: Array


class _Recompute(NamedTuple):
    """The carry of the loop that recomputes a window's steps."""

    i: Array
    y: State
    f0: State
    ys: State
    coeffs: State
    fevals: Array


class _Backward(NamedTuple):
    """The carry of the backward pass, one iteration per stop (a window
    boundary, an output time or `window` forward steps)."""

    top: Array  # where a is, measured from τ_0
    step: Array  # the first forward step not below `top`'s window
    output: Array  # the next output below `top` (or at it, if not yet added)
    a: State
    g: PyTree  # the parameter integral so far
    h: Array  # the last backward step size
    window: _Window
    loaded: Array  # the first step of the recomputed window (-1: none)
    stats: LoopStats
    recomputed: Array  # f evaluations spent recomputing forward steps


def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (descending) and weights of the n-point Gauss–Legendre rule on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(n)
    return ((1 + x) / 2)[::-1], (w / 2)[::-1]


class InterpolatingAdjoint(AbstractAdjoint):
    """The continuous adjoint with z(t) from the forward dense output and the
    parameter gradient by Gauss–Legendre quadrature (module doc).

    The backward pass solves only for the adjoint, da/dt = -aᵀ∂f/∂z(t, z(t)),
    with z(t) read off the recomputed forward steps' interpolants, from the
    last output time to the first, adding each output's cotangent to a as it
    passes it; dL/dθ = ∫ aᵀ∂f/∂θ dt comes from n Gauss–Legendre nodes on every
    forward step. Unlike `BacksolveAdjoint` nothing is integrated backwards
    that the forward flow contracts, so it works on contracting, chaotic and
    stiff problems: with an implicit solver (`Kvaerno5`, `Rodas5P`,
    `AutoSwitch`) the adjoint solve uses that method too. Unlike
    `CheckpointAdjoint` the gradient is that of the continuous problem, exact
    to the backward tolerances, not the discrete solve's derivative.

    Memory is bounded: `checkpoints` step start states (thinned as in
    `CheckpointAdjoint` when the solve is longer), plus one window of
    `window` recomputed steps (its states and interpolation coefficients, and
    the adjoint's values at `window`·`nodes` points). Every forward step is
    recomputed once (about the forward solve's evaluations again, in
    `backward_stats`' `num_recomputed_fevals`).

    A `custom_vjp` blocks forward-mode differentiation: use `ForwardMode()` for
    `jax.jvp`/`jax.jacfwd`. Gradients of gradients are not available (the
    backward pass is not itself differentiable; it says so when asked): use
    `CheckpointAdjoint` or `BacksolveAdjoint` for those.

    **Arguments:**

    - `rtol`, `atol`: tolerances of the adjoint solve (default: the forward ones).
    - `checkpoints`: how many forward step start states are kept, at least 2
      (default 256); None keeps all of them.
    - `window`: how many forward steps are recomputed and held at a time
      (default 32, raised to the largest stride the thinned record reaches).
      The adjoint solve stops at every window boundary (one extra evaluation
      and a shortened step each).
    - `nodes`: Gauss–Legendre nodes per forward step (default 3: exact for
      polynomials of degree 5, the order of the default solver).

    References: Chen et al. (2018); Kim et al. (2021), "Stiff neural ordinary
    differential equations"; SciMLSensitivity.jl's `InterpolatingAdjoint` and
    `GaussAdjoint` (PR #861).
    """

    rtol: float | None = None
    atol: float | None = None
    checkpoints: int | None = eqx.field(default=256, static=True)
    window: int = eqx.field(default=32, static=True)
    nodes: int = eqx.field(default=3, static=True)

    def __check_init__(self):
        name = "InterpolatingAdjoint"
        for key in ("rtol", "atol"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name}: {key} must be a number, got {value!r}")
            if not value >= 0:
                raise ValueError(f"{name}: {key} must be >= 0, got {value}")
        if self.rtol == 0 and self.atol == 0:
            raise ValueError(f"{name}: rtol and atol cannot both be zero")
        for key, least in (("checkpoints", 2), ("window", 1), ("nodes", 1)):
            value = getattr(self, key)
            if key == "checkpoints" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{name}: {key} must be an int, got {value!r}")
            if value < least:
                raise ValueError(f"{name}: {key} must be at least {least}, got {value}")

    def _backward_config(self, config: SolverConfig, m: int) -> SolverConfig:
        rtol = config.rtol if self.rtol is None else float(self.rtol)
        atol = config.atol if self.atol is None else float(self.atol)
        if rtol == 0 and atol == 0:
            raise ValueError("InterpolatingAdjoint: rtol and atol cannot both be zero")
        return SolverConfig(
            config.solver,
            config.controller,
            rtol,
            atol,
            None,
            config.max_steps,
            tuple((i,) for i in range(m)),
            time_dependent=True,  # z(t) is read at t
            throw=config.throw,
            first_step_given=True,
        )

    def _window_steps(self, config: SolverConfig) -> int:
        """The window's buffer length: at least the record's largest stride, so
        that every window starts at a kept state."""
        slots = kept_slots(self.checkpoints, config.max_steps)
        return max(self.window, thinned_stride(slots, config.max_steps))

    def loop(self, config, problem, params, y0, ts, h0=None):
        direction, tau = direction_and_tau(ts)
        params_arrays, params_static = eqx.partition(params, eqx.is_array)

        def forward(params_arrays, y0, tau, direction, h0):
            params = eqx.combine(params_arrays, params_static)
            return self.forward(config, problem, params, direction, y0, tau, h0)

        def backward(residual, stats, params_arrays, y0, tau, direction, cotangent):
            (ys, record), (ys_bar, _) = residual, cotangent
            params = eqx.combine(params_arrays, params_static)
            cotangents, bstats, _ = _first_order_only(self.backward)(
                config, problem, params, direction, tau, ys, record,
                instantiate(ys_bar), stats.h_last,
            )  # fmt: skip
            return checked(
                config, cotangents, bstats, -direction, direction * tau[-1],
                direction * tau[0], _PHASE,
            )  # fmt: skip

        solve = custom_vjp_loop(
            forward,
            backward,
            primal_solve(config, problem, params_static),
            select=lambda out, tau: out[0],
            expand=lambda out, tau, ys_bar: (ys_bar, None),
            check=forward_check(config),
        )
        h0 = first_step_argument(h0, tau)
        return solve(params_arrays, y0, tau, direction, h0)

    def forward(self, config, problem, params, direction, y0, tau, h0=None):
        """The forward solve at the output times, recording its steps.

        **Returns:** `((ys, record), stats)`.
        """
        f = lambda t, y: problem.f_flat(t, y, params, direction)
        options = LoopOptions(record_steps=True, record_slots=self.checkpoints)
        ys, stats, record = integrate(config, f, y0, tau, h0, options)
        return (ys, record), stats

    def backward(
        self,
        config: SolverConfig,
        problem: Any,
        params: PyTree,
        direction: Array,
        tau: Array,
        ys: State,
        record: StepRecord,
        ys_bar: State,
        h_forward: Array | None = None,
    ) -> tuple[tuple[PyTree, State, Array], LoopStats, Array]:
        """Solve the adjoint backwards from τ_N to τ_0 (class doc).

        `ys` are the forward outputs at `tau`, `record` the forward steps,
        `ys_bar` the outputs' cotangents and `h_forward` the forward solve's
        last step size (the adjoint solve's first, capped by Hairer's bound).

        **Returns:** `((params_bar, y0_bar, tau_bar), stats, recomputed)`, with
        `stats` the adjoint solves' (summed) and `recomputed` the f evaluations
        spent recomputing forward steps.
        """
        diff, fixed = eqx.partition(params, eqx.is_inexact_array)
        m = len(ys)
        solver = config.solver
        width = self._window_steps(config)
        bconfig = self._backward_config(config, m)
        origin = lax.stop_gradient(tau[0])
        since = lax.stop_gradient(tau - tau[0])  # output times from τ_0
        n_out = tau.shape[0]
        count, stride = record.count, record.stride
        # Windows start at kept states: `span` steps, a multiple of the stride.
        span = jnp.maximum(width // stride, 1) * stride
        times = jnp.concatenate(
            [
                jnp.where(
                    jnp.arange(record.times.shape[0]) <= count,
                    lax.stop_gradient(record.times),
                    jnp.inf,
                ),
                jnp.full(width + 1, jnp.inf, record.times.dtype),
            ]
        )
        x_nodes, w_nodes = _gauss_legendre(self.nodes)
        real = jnp.real(ys[0]).dtype

        def field(s, z, p):
            return problem.f_flat(origin + s, z, eqx.combine(p, fixed), direction)

        def recompute(k0: Array) -> tuple[_Window, Array]:
            """Steps k0, k0 + 1, … of the forward solve, from the kept state."""
            length = jnp.minimum(span, count - k0)
            local_times = lax.dynamic_slice_in_dim(times, k0, width + 1)
            local_times = jnp.where(
                jnp.arange(width + 1) <= length, local_times, jnp.inf
            )
            f = lambda s, z: field(s, z, diff)
            y = tuple(leaf[k0 // stride] for leaf in record.y_starts)
            f0 = f(local_times[0], y)

            def body(carry: _Recompute) -> _Recompute:
                i, y, f0, ys_w, coeffs_w, fevals = carry
                t, t_new = local_times[i], local_times[i + 1]
                carried = {}
                if record.carries is not None:
                    carried = {"carry": record.carries[k0 + i]}
                step = solver.step(
                    f, t, y, f0, t_new - t, dense=True,
                    tolerances=tolerances(config), **carried,
                )  # fmt: skip
                put = lambda b, v: lax.dynamic_update_index_in_dim(b, v, i, 0)
                if step.cost is None:
                    fevals = fevals + solver.fevals_per_step
                else:
                    fevals = fevals + step.cost[0]
                return _Recompute(
                    i + 1,
                    step.y1,
                    step.f1,
                    tuple(map(put, ys_w, y)),
                    tuple(map(put, coeffs_w, step.dense)),
                    fevals.astype(jnp.int32),
                )

            init = _Recompute(
                jnp.zeros((), jnp.int32),
                y,
                f0,
                tuple(jnp.zeros((width,) + leaf.shape, leaf.dtype) for leaf in y),
                tuple(
                    jnp.zeros((width, solver.dense_degree) + leaf.shape, leaf.dtype)
                    for leaf in y
                ),
                jnp.ones((), jnp.int32),  # f0
            )
            done = lax.while_loop(lambda c: c.i < length, body, init)
            return _Window(done.ys, done.coeffs, local_times, length), done.fevals

        def state_at(window: _Window, s: Array, i: Array) -> State:
            """z at time s in step i of the window (θ clipped to [0, 1])."""
            t = window.times[i]
            h = window.times[i + 1] - t
            theta = jnp.clip((s - t) / jnp.where(h > 0, h, 1), 0, 1).astype(real)
            return tuple(
                interp.evaluate(y[i], c[i], theta)
                for y, c in zip(window.ys, window.coeffs, strict=True)
            )

        def adjoint_field(window: _Window):
            """da/dσ = aᵀ∂f/∂z at τ = -σ (σ: the backward solve's time)."""

            def f(sigma, a):
                s = -sigma
                i = jnp.searchsorted(window.times, s, side="right") - 1
                i = jnp.clip(i, 0, window.count - 1)
                z = state_at(window, s, i)
                _, vjp = jax.vjp(lambda z: field(s, z, diff), z)
                return vjp(a)[0]

            return f

        def quadrature(window: _Window, top, target, a_nodes, s_nodes, weights):
            """∫ aᵀ∂f/∂θ over [target, top]: one VJP over all the nodes."""
            i = jnp.repeat(jnp.arange(width)[::-1], self.nodes)
            i = jnp.minimum(i, window.count - 1)
            z = jax.vmap(lambda s, i: state_at(window, s, i))(s_nodes, i)
            batched = jax.vmap(field, in_axes=(0, 0, None))
            _, vjp = jax.vjp(lambda p: batched(s_nodes, z, p), diff)
            cot = tuple(
                jnp.where(weights[:, None] > 0, a * weights[:, None].astype(a.dtype), 0)
                for a in a_nodes
            )
            return vjp(cot)[0]

        def piece(carry: _Backward) -> _Backward:
            # The window holding the steps just below `top`.
            k_top = carry.step
            k0 = ((k_top - 1) // span) * span
            window, fevals = lax.cond(
                k0 == carry.loaded,
                lambda: (carry.window, jnp.zeros((), jnp.int32)),
                lambda: recompute(k0),
            )
            bottom = window.times[0]
            output_time = since[jnp.maximum(carry.output, 0)]
            target = jnp.maximum(bottom, output_time)
            top = carry.top
            # Gauss–Legendre nodes on each step's part in [target, top], with
            # τ decreasing (the adjoint solve's time σ = -τ increasing).
            lo = jnp.clip(window.times[:-1], target, top)[::-1]
            hi = jnp.clip(window.times[1:], target, top)[::-1]
            length = (hi - lo)[:, None]
            s_nodes = (lo[:, None] + jnp.asarray(x_nodes, lo.dtype) * length).ravel()
            weights = (jnp.asarray(w_nodes, real) * length.astype(real)).ravel()
            sigma = jnp.concatenate([-top[None], -s_nodes, -target[None]])
            out, st = integrate(
                bconfig,
                adjoint_field(window),
                carry.a,
                sigma,
                carry.h,
                LoopOptions(diagnose_stiffness=False, dense_output=True),
            )[:2]
            a_nodes = tuple(leaf[1:-1] for leaf in out)
            a = tuple(leaf[-1] for leaf in out)
            g_piece = quadrature(window, top, target, a_nodes, s_nodes, weights)
            g = jax.tree.map(jnp.add, carry.g, g_piece)
            reached = (target == output_time) & (carry.output >= 0)
            bar = tuple(b[jnp.maximum(carry.output, 0)] for b in ys_bar)
            a = tuple(jnp.where(reached, x + b, x) for x, b in zip(a, bar, strict=True))
            step = jnp.where(target == bottom, k0, k_top)
            stats = _add_stats(carry.stats, st, origin)
            h = jnp.where(st.num_accepted > 0, jnp.abs(st.h_last), carry.h)
            return _Backward(
                top=target,
                step=step.astype(jnp.int32),
                output=(carry.output - reached).astype(jnp.int32),
                a=a,
                g=g,
                h=lax.stop_gradient(h),
                window=window,
                loaded=k0,
                stats=stats,
                recomputed=carry.recomputed + fevals,
            )

        def running(carry: _Backward) -> Array:
            return (carry.step > 0) & (carry.stats.result == RESULTS.successful)

        zero = jnp.zeros((), jnp.int32)
        nan = jnp.full((), jnp.nan, real)
        stats0 = LoopStats(
            zero, zero, zero, zero, -tau[-1], nan, nan, num_jacobians=zero
        )
        empty = _Window(
            tuple(jnp.zeros((width,) + leaf.shape[1:], leaf.dtype) for leaf in ys),
            tuple(
                jnp.zeros((width, solver.dense_degree) + leaf.shape[1:], leaf.dtype)
                for leaf in ys
            ),
            jnp.full(width + 1, jnp.inf, times.dtype),
            zero,
        )
        h_first = jnp.zeros((), tau.dtype) if h_forward is None else h_forward
        init = _Backward(
            top=since[-1],
            step=count.astype(jnp.int32),
            output=jnp.asarray(n_out - 2, jnp.int32),
            a=tuple(b[-1] for b in ys_bar),
            g=jax.tree.map(jnp.zeros_like, diff),
            h=lax.stop_gradient(jnp.abs(h_first)).astype(tau.dtype),
            window=empty,
            loaded=zero - 1,
            stats=stats0,
            recomputed=zero,
        )
        final = lax.while_loop(running, piece, init)
        # The last piece ends at τ_0, the first output's time, and added ȳ_0:
        # ∂L/∂τ_0 needs the adjoint before it.
        a_before = tuple(x - b[0] for x, b in zip(final.a, ys_bar, strict=True))
        tau_bar = time_cotangents(problem, params, direction, tau, ys, ys_bar, a_before)
        return (final.g, final.a, tau_bar), final.stats, final.recomputed


def _add_stats(total: LoopStats, new: LoopStats, origin: Array) -> LoopStats:
    """Counts summed over the adjoint solves; the first failure kept, with
    the time reached made absolute (the solves measure σ = -(τ - `origin`))."""
    failed_before = total.result != RESULTS.successful
    keep = lambda old, value: jnp.where(failed_before, old, value)
    return LoopStats(
        num_steps=total.num_steps + new.num_steps,
        num_accepted=total.num_accepted + new.num_accepted,
        num_fevals=total.num_fevals + new.num_fevals,
        num_jacobians=total.num_jacobians + new.num_jacobians,
        result=keep(total.result, new.result),
        t_reached=keep(total.t_reached, new.t_reached - origin),
        h_last=keep(total.h_last, new.h_last),
        stiffness=keep(total.stiffness, new.stiffness),
    )


def _first_order_only(backward):
    """`backward` with a derivative rule that refuses, by name, to be
    differentiated (its loops would otherwise fail deep inside JAX)."""

    @jax.custom_vjp
    def run(*args):
        return backward(*args)

    def fwd(*args):
        return run(*args), None

    def bwd(_, __):
        raise NotImplementedError(
            "neuralode: InterpolatingAdjoint gives first derivatives only; its "
            "backward pass cannot be differentiated again. For gradients of "
            "gradients use adjoint=neuralode.CheckpointAdjoint() or "
            "neuralode.BacksolveAdjoint()."
        )

    run.defvjp(fwd, bwd)
    return run
