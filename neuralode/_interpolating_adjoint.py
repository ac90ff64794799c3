"""`InterpolatingAdjoint`: the continuous adjoint with the state read from the
forward solve's dense output instead of being integrated backwards.

With τ the loop's increasing time, f(τ, z, θ) the field and outputs z(τ_i)
with cotangents ȳ_i, the adjoint a(τ) = ∂L/∂z(τ) solves, backwards from τ_N,

    da/dτ = -aᵀ ∂f/∂z(τ, z(τ), θ),   a(τ_N) = ȳ_N,  a jumps by ȳ_i at τ_i,

and ∂L/∂θ = ∫_{τ_0}^{τ_N} aᵀ ∂f/∂θ(τ, z(τ), θ) dτ, ∂L/∂z_0 = a(τ_0).

`BacksolveAdjoint` integrates z backwards alongside a, which is unstable where
the forward flow contracts (a decay becomes growth) and fails on stiff
problems. Here z(τ) is the forward solve's own dense output: the forward pass
keeps the start states of its accepted steps (a `StepRecord`, thinned to a
bounded number of slots as in `CheckpointAdjoint`), and the backward pass
recomputes them window by window (at most `window` steps at a time), keeping
each recomputed step's start state and interpolation coefficients. The
backward solve runs from one stop to the next (window boundaries and output
times) on the state (a, g), g the parameter integral, with the error norm
over a alone (a seminorm: g never feeds back, Kidger, Chen & Lyons 2021).
For a stable forward problem a is stable backwards, so a stiff forward
problem gives a stiff but stable adjoint problem, solved with the same
(implicit) method.

The parameter integral rides in the backward state rather than coming from a
separate quadrature (the "Gauss adjoint" of SciMLSensitivity integrates it by
Gauss–Legendre rules on the backward steps). Measured on the benchmark's
contracting flow, a composite Gauss–Legendre rule on the forward steps (a at
the nodes from the backward dense output, one batched VJP per window) was
both slower and less accurate than carrying g: where the forward solve takes
long steps (at an equilibrium) a still varies on its own time scale, which
only the backward steps resolve.

References: Pontryagin et al. (1962), "The mathematical theory of optimal
processes"; Chen, Rubanova, Bettencourt & Duvenaud (2018), "Neural ordinary
differential equations"; Kim, Ji, Deng, Ma & Rackauckas (2021), "Stiff neural
ordinary differential equations" (the interpolating adjoint on stiff
problems); Kidger, Chen & Lyons (2021), "'Hey, that's not an ODE': faster ODE
adjoints via seminorms"; SciMLSensitivity.jl's `InterpolatingAdjoint` and
`GaussAdjoint` (PR #861).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from . import _interpolation as interp
from ._adjoint import AbstractAdjoint, fold_frozen, stop_time
from ._adjoint_common import (
    custom_vjp_loop,
    direction_and_tau,
    first_step_argument,
    forward_check,
    instantiate,
    primal_solve,
    time_cotangents,
)
from ._event import event_function
from ._failure import checked
from ._integrate import (
    LoopOptions,
    LoopStats,
    SolverConfig,
    integrate,
    tolerances,
)
from ._solution import RESULTS
from ._state import State, present
from ._step_record import StepRecord, kept_slots, thinned_stride

#: The phase named in the message of a failed adjoint solve.
_PHASE = "reverse-time adjoint solve of InterpolatingAdjoint"


class _Window(NamedTuple):
    """Steps [k0, k0 + count) of the forward solve, recomputed: step i starts
    at `times[i]` (measured from τ_0; inf past the window's last step end)
    from `ys[·][i]`, with interpolation coefficients `coeffs[·][i]`."""

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
    """The carry of the backward pass: one iteration per stop (a window
    boundary or an output time)."""

    top: Array  # where the adjoint is, measured from τ_0
    step: Array  # the forward steps below `top` are steps 0 … step - 1
    output: Array  # the next output to reach (-1: all reached)
    a: State  # the adjoint at `top`, the cotangents of outputs reached added
    g: State  # the parameter integral so far, one vector per parameter leaf
    h: Array  # the last backward step size, the next solve's first
    window: _Window
    loaded: Array  # the first step of the window in `window` (-1: none yet)
    stats: LoopStats  # the adjoint solves' counts, and their first failure
    recomputed: Array  # f evaluations spent recomputing forward steps


class InterpolatingAdjoint(AbstractAdjoint):
    """The continuous adjoint with z(t) from the forward solve's dense output.

    The backward pass solves, from the last output time to the first,

        da/dt = -aᵀ∂f/∂z(t, z(t)),   dg/dt = -aᵀ∂f/∂θ(t, z(t)),

    (g → ∂L/∂θ) with z(t) read off the interpolants of the forward steps,
    which it recomputes window by window from stored start states, and adds
    each output's cotangent to a as it passes it. Only a counts in the
    backward error norm. Unlike `BacksolveAdjoint` it never integrates z
    backwards, so it works where the forward flow contracts, and on stiff
    problems: with an implicit solver (`Kvaerno5`, `Rodas5P`, `AutoSwitch`)
    the adjoint solve uses that method too. Unlike `CheckpointAdjoint` its
    gradient is that of the continuous problem to the backward tolerances,
    not the exact derivative of the discrete solve. Gradients flow to `y0`,
    `args`, the parameters of `f` and `ts`.

    Memory does not grow with the number of steps: `checkpoints` step start
    states (thinned to every 2nd, 4th, … step when the solve is longer, as in
    `CheckpointAdjoint`), plus one window of recomputed steps (their start
    states and interpolation coefficients). Every forward step is recomputed
    once: the backward pass costs the forward solve's evaluations again
    (`no.backward_stats` reports them apart as `num_recomputed_fevals`) plus
    the adjoint solve's, each a VJP of f.

    A `custom_vjp` blocks forward-mode differentiation: use `ForwardMode()` for
    `jax.jvp`/`jax.jacfwd`. Gradients of gradients are not available (the
    backward pass is not differentiable; asking raises `NotImplementedError`):
    use `CheckpointAdjoint` or `BacksolveAdjoint` for those.

    **Arguments:**

    - `rtol`, `atol`: tolerances of the adjoint solve (default: the forward ones).
      They bound a's error; the parameter integral rides along unmeasured, so
      where a is smooth and the solve takes a few long steps (a short CNF at
      loose tolerances) tighter ones make the parameter gradient more
      accurate, and where a is the hard part looser ones cost little accuracy
      (z does not drift, whatever they are).
    - `checkpoints`: how many forward step start states are kept, at least 2
      (default 128); None keeps all of them.
    - `window`: how many forward steps are recomputed and held at a time
      (default 32; raised to the largest stride the thinned record can
      reach, a power of two up to max_steps/C with C checkpoints). The
      adjoint solve stops at every window boundary, which costs an evaluation
      and a shortened step.

    The backward pass holds C start states and W·(d + 1) recomputed vectors
    (W the window, d the method's number of interpolation coefficients: 4
    for Dopri5), besides the adjoint solve's stages. Every step is
    recomputed once whatever C is, so fewer checkpoints cost no evaluations,
    only a longer window once the stride outgrows it: the defaults (128, 32)
    fit `max_steps=4096`, and hold about as many states as
    `CheckpointAdjoint`'s.

    References: Chen, Rubanova, Bettencourt & Duvenaud (2018); Kim, Ji, Deng,
    Ma & Rackauckas (2021), "Stiff neural ordinary differential equations";
    Kidger, Chen & Lyons (2021); SciMLSensitivity.jl's `InterpolatingAdjoint`.
    """

    rtol: float | None = None
    atol: float | None = None
    checkpoints: int | None = eqx.field(default=128, static=True)
    supports_events: ClassVar[bool] = True
    window: int = eqx.field(default=32, static=True)

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
        for key, least in (("checkpoints", 2), ("window", 1)):
            value = getattr(self, key)
            if key == "checkpoints" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{name}: {key} must be an int, got {value!r}")
            if value < least:
                raise ValueError(f"{name}: {key} must be at least {least}, got {value}")

    def _backward_config(self, config: SolverConfig, m: int) -> SolverConfig:
        """The adjoint solve's configuration: the forward method and controller,
        this adjoint's tolerances, the norm over the m leaves of a only."""
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
                instantiate(ys_bar), stats.h_last, stop_time(stats, tau),
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
        event = event_function(problem, params, direction)
        ys, stats, record = integrate(config, f, y0, tau, h0, options, event)
        return (ys, present(record)), stats  # recorded: record_steps=True

    def backward_pass_stats(
        self, config, problem, params, direction, tau, y0, cotangent
    ) -> tuple[LoopStats, Array]:
        """The forward solve and exactly the backward pass `jax.grad` runs,
        with the outputs' cotangents `cotangent(ys[0])`, for their counts
        (see `no.backward_stats`): `(stats, recomputed)` as `backward`'s."""
        (ys, record), forward = self.forward(
            config, problem, params, direction, y0, tau
        )
        ys_bar = (cotangent(ys[0]),)
        _, stats, recomputed = self.backward(
            config, problem, params, direction, tau, ys, record, ys_bar,
            forward.h_last, stop_time(forward, tau),
        )  # fmt: skip
        return stats, recomputed

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
        t_stop: Array | None = None,
    ) -> tuple[tuple[PyTree, State, Array], LoopStats, Array]:
        """Solve the adjoint system from τ_N back to τ_0 (class doc).

        `ys` are the forward outputs at `tau`, `record` the forward steps,
        `ys_bar` the outputs' cotangents and `h_forward` the forward solve's
        last step size (the adjoint solve's first, capped by Hairer's bound).
        A forward solve stopped by an event at `t_stop` (from τ_0, see
        `stop_time`) has its outputs after it frozen at the state there:
        their cotangents join the last output's, and the adjoint solve starts
        at `t_stop`.

        **Returns:** `((params_bar, y0_bar, tau_bar), stats, recomputed)`:
        `params_bar` for the inexact array leaves of `params` (None
        elsewhere), `stats` of the adjoint solves (summed), and `recomputed`
        the f evaluations spent recomputing forward steps.
        """
        diff, fixed = eqx.partition(params, eqx.is_inexact_array)
        theta, theta_def = jax.tree.flatten(diff)
        m = len(ys)
        solver = config.solver
        width = self._window_steps(config)
        bconfig = self._backward_config(config, m)
        origin = lax.stop_gradient(tau[0])
        since = lax.stop_gradient(tau - tau[0])  # output times from τ_0
        last_output = jnp.asarray(tau.shape[0] - 2, jnp.int32)
        top = since[-1]
        if t_stop is not None:
            ys_bar, frozen = fold_frozen(ys_bar, tau, t_stop)
            stopped = jnp.isfinite(t_stop)
            # The outputs up to the stop are passed on the way down.
            last_output = jnp.where(
                stopped, jnp.sum(~frozen, dtype=jnp.int32) - 1, last_output
            ).astype(jnp.int32)
            top = jnp.where(stopped, t_stop, top)
        count, stride = record.count, record.stride
        # Windows start at kept states: `span` steps, a multiple of the stride.
        span = jnp.maximum(width // stride, 1) * stride
        valid = jnp.arange(record.times.shape[0], dtype=count.dtype) <= count
        times = jnp.concatenate(
            [
                jnp.where(valid, lax.stop_gradient(record.times), jnp.inf),
                jnp.full(width + 1, jnp.inf, record.times.dtype),
            ]
        )
        real = jnp.real(ys[0]).dtype
        g_zero = tuple(jnp.zeros(leaf.size, leaf.dtype) for leaf in theta)

        def field(s, z, theta):
            p = eqx.combine(jax.tree.unflatten(theta_def, theta), fixed)
            return problem.f_flat(origin + s, z, p, direction)

        def recompute(k0: Array) -> tuple[_Window, Array]:
            """Steps k0, k0 + 1, … of the forward solve, from the kept state."""
            length = jnp.minimum(span, count - k0)
            local_times = lax.dynamic_slice_in_dim(times, k0, width + 1)
            local_times = jnp.where(
                jnp.arange(width + 1, dtype=length.dtype) <= length,
                local_times,
                jnp.inf,
            )
            f = lambda s, z: field(s, z, theta)
            y = tuple(leaf[k0 // stride] for leaf in record.y_starts)

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
                # A step reports its cost where it varies, else it is fixed.
                cost = (
                    present(solver.fevals_per_step)
                    if step.cost is None
                    else step.cost[0]
                )
                return _Recompute(
                    i + 1,
                    step.y1,
                    step.f1,
                    tuple(map(put, ys_w, y)),
                    tuple(map(put, coeffs_w, present(step.dense))),  # dense=True
                    (fevals + cost).astype(jnp.int32),
                )

            init = _Recompute(
                jnp.zeros((), jnp.int32),
                y,
                f(local_times[0], y),
                tuple(jnp.zeros((width,) + leaf.shape, leaf.dtype) for leaf in y),
                tuple(
                    jnp.zeros((width, solver.dense_degree) + leaf.shape, leaf.dtype)
                    for leaf in y
                ),
                jnp.ones((), jnp.int32),  # f0
            )
            done = lax.while_loop(lambda c: c.i < length, body, init)
            return _Window(done.ys, done.coeffs, local_times, length), done.fevals

        def adjoint_field(window: _Window):
            """d(a, g)/dσ = (aᵀ∂f/∂z, aᵀ∂f/∂θ) at τ = -σ, σ the adjoint
            solve's time (from -τ_N up to -τ_0)."""

            def f(sigma, state):
                s = -sigma
                a = state[:m]
                i = jnp.searchsorted(
                    window.times, s, side="right", method="compare_all"
                )
                i = jnp.clip(i - 1, 0, window.count - 1)
                t = window.times[i]
                h = window.times[i + 1] - t
                x = jnp.clip((s - t) / jnp.where(h > 0, h, 1), 0, 1).astype(real)
                z = tuple(
                    interp.evaluate(y[i], c[i], x)
                    for y, c in zip(window.ys, window.coeffs, strict=True)
                )
                _, vjp = jax.vjp(lambda z, theta: field(s, z, theta), z, theta)
                a_dz, a_dtheta = vjp(a)
                # One vector per parameter leaf (see `AdjointProblem`).
                flat = zip(a_dtheta, g_zero, strict=True)
                return (*a_dz, *(x.reshape(-1).astype(g.dtype) for x, g in flat))

            return f

        def piece(carry: _Backward) -> _Backward:
            """From `top` down to the next stop: the window's first step or
            the next output time, whichever is later."""
            k0 = ((carry.step - 1) // span) * span
            window, fevals = lax.cond(
                k0 == carry.loaded,
                lambda: (carry.window, jnp.zeros((), jnp.int32)),
                lambda: recompute(k0),
            )
            bottom = window.times[0]
            output_time = since[jnp.maximum(carry.output, 0)]
            target = jnp.maximum(bottom, output_time)
            out, st = integrate(
                bconfig,
                adjoint_field(window),
                (*carry.a, *g_zero),
                jnp.stack([-carry.top, -target]),
                carry.h,
                LoopOptions(diagnose_stiffness=False),
            )[:2]
            end = tuple(leaf[-1] for leaf in out)
            reached = (target == output_time) & (carry.output >= 0)
            bar = tuple(b[jnp.maximum(carry.output, 0)] for b in ys_bar)
            a = tuple(
                jnp.where(reached, x + b, x) for x, b in zip(end[:m], bar, strict=True)
            )
            h = jnp.where(st.num_accepted > 0, jnp.abs(st.h_last), carry.h)
            return _Backward(
                top=target,
                step=jnp.where(target == bottom, k0, carry.step).astype(jnp.int32),
                output=carry.output - reached.astype(jnp.int32),
                a=a,
                g=tuple(map(jnp.add, carry.g, end[m:])),
                h=lax.stop_gradient(h),
                window=window,
                loaded=k0,
                stats=_add_stats(carry.stats, st, origin),
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
            top=top,
            step=count.astype(jnp.int32),
            output=last_output,
            a=tuple(b[-1] for b in ys_bar),
            g=g_zero,
            h=lax.stop_gradient(jnp.abs(h_first)).astype(tau.dtype),
            window=empty,
            loaded=zero - 1,
            stats=stats0,
            recomputed=zero,
        )
        final = lax.while_loop(running, piece, init)
        # The last stop is τ_0, the first output's time, where ȳ_0 was added:
        # ∂L/∂τ_0 needs the adjoint before it.
        a_before = tuple(x - b[0] for x, b in zip(final.a, ys_bar, strict=True))
        tau_bar = time_cotangents(problem, params, direction, tau, ys, ys_bar, a_before)
        params_bar = jax.tree.unflatten(
            theta_def,
            [
                x.reshape(leaf.shape).astype(leaf.dtype)
                for x, leaf in zip(final.g, theta, strict=True)
            ],
        )
        return (params_bar, final.a, tau_bar), final.stats, final.recomputed


def _add_stats(total: LoopStats, new: LoopStats, origin: Array) -> LoopStats:
    """Counts summed over the adjoint solves; the first failure kept, with
    the time reached made absolute (the solves measure σ = -(τ - `origin`))."""
    failed_before = total.result != RESULTS.successful
    keep = lambda old, value: jnp.where(failed_before, old, value)
    return LoopStats(
        num_steps=total.num_steps + new.num_steps,
        num_accepted=total.num_accepted + new.num_accepted,
        num_fevals=total.num_fevals + new.num_fevals,
        # Every loop counts them (`integrate`, and the zero stats to start from).
        num_jacobians=present(total.num_jacobians) + present(new.num_jacobians),
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
