"""`CheckpointAdjoint`: the exact gradient of the discrete solution, by replaying
its steps, in bounded memory, with reverse-over-reverse (gradients of gradients)
support.

Write the accepted steps as y_{k+1} = Φ_k(y_k, θ; t_k, t_{k+1}) (one
Runge–Kutta step; the step sizes are not differentiated, but t_0 = τ_0 and
t_N = τ_N are the first and last output times, and output i inside step k sits
at the fraction θ_i = (τ_i - t_k)/(t_{k+1} - t_k) of it). Three pieces, each
with a rule that JAX can differentiate once more:

1. the solve, (y0, θ) ↦ (outputs, Y), Y the start states of every S-th step
   (S doubles whenever the record's slots fill, see `StepRecord`), whose VJP is
2. the reverse sweep S: a_N = ȳ_N, a_k = Φ_kᵀ_y a_{k+1} + Ȳ_k,
   g = Σ_k Φ_kᵀ_θ a_{k+1}, returning (a_0, g), where Ȳ_k holds the cotangents
   of the outputs inside step k (through its interpolant) and, in second-order
   use, of the kept states. First order, it runs segment by segment,
   recomputing each segment's states from its kept one (`_segment_sweep`).
   S is linear in the cotangents, so its own VJP is that of the same sweep
   over all N states, recomputed by D (`_densify`):
3. a forward tangent sweep: with cotangents (c, d) of (a_0, g), b_0 = c,
   b_{k+1} = Φ_k'·(b_k, d) (one JVP per step), the cotangent of Ȳ_k is b_k and
   those of y_k, θ and t_k, t_{k+1} are ∇ ⟨a_{k+1}, Φ_k'(y_k, θ)·(b_k, d)⟩;
   D's own rule hands the y_k cotangents back to the kept states. Through the
   times and the fractions θ_i, a_0 (hence ∂L/∂τ_0 = -a_0·f(τ_0, y_0)) moves
   with the output times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import PyTree

from . import _interpolation as interp
from ._adjoint import AbstractAdjoint, fold_frozen, stop_time
from ._adjoint_common import (
    custom_vjp_loop,
    direction_and_tau,
    first_step_argument,
    forward_check,
    instantiate,
    is_symbolic_zero,
    primal_solve,
    time_cotangents,
    zero_cotangent,
)
from ._event import event_function
from ._integrate import LoopOptions, integrate, tolerances
from ._state import State, present, select
from ._step_record import StepRecord, kept_slots, thinned_stride


class _Step(eqx.Module):
    """Φ(y, θ; t, t_new) -> (y1, interpolation coefficients): one Runge–Kutta
    step of the problem, θ its flat inexact parameters.

    A pytree whose leaves are the arrays it needs besides θ (the direction and
    the parameters' other arrays), so that the sweeps' custom_vjps take it as
    an argument: closed over, such an array would leak as a tracer when a
    jitted gradient is differentiated again.
    """

    problem: Any = eqx.field(static=True)
    solver: Any = eqx.field(static=True)
    # (θ, arrays) -> the problem's parameters.
    params: Callable = eqx.field(static=True)
    arrays: PyTree
    direction: jax.Array
    # Step times are measured from here (see `_step_times`); not differentiated.
    origin: jax.Array
    dense: bool = eqx.field(static=True)
    # (rtol, atol) of the solve, for the nonlinear solves of implicit methods.
    tolerances: tuple[float, float] = eqx.field(static=True)
    # The carry of each step where the replay needs it (`replays_carry`), and
    # the step start times to find a step by (inf past the last); else None.
    carries: jax.Array | None = None
    carry_times: jax.Array | None = None

    def __call__(self, y: State, theta, t, t_new) -> tuple[State, State | None]:
        p = self.params(theta, self.arrays)
        f = lambda s, x: self.problem.f_flat(self.origin + s, x, p, self.direction)
        carried = {}
        if self.carries is not None:
            # t is exactly the start time of the step being replayed.
            times = present(self.carry_times)  # given with the carries
            k = jnp.searchsorted(times, lax.stop_gradient(t))
            last = self.carries.shape[0] - 1
            carried = {"carry": self.carries[jnp.minimum(k, last)]}
        result = self.solver.step(
            f, t, y, f(t, y), t_new - t, dense=self.dense, tolerances=self.tolerances,
            **carried,
        )  # fmt: skip
        return result.y1, result.dense


def _add(a: State, b: State) -> State:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _at(buffers: State, k) -> State:
    return tuple(buffer[k] for buffer in buffers)


def _put(buffers: State, k, values: State) -> State:
    return tuple(
        lax.dynamic_update_index_in_dim(b, v, k, 0)
        for b, v in zip(buffers, values, strict=True)
    )


class _Sweep(NamedTuple):
    """The carry of the reverse sweep S at step k: a = a_{k+1}, the parameter
    integral g so far, and (stored for its rule) the adjoints a_{k+1}."""

    k: jax.Array
    a: State
    g: jax.Array
    adjoints: State | tuple


class _Densify(NamedTuple):
    """The carry of D: step k, its start state y_k, the states so far."""

    k: jax.Array
    y: State
    full: State


class _DensifyRule(NamedTuple):
    """The carry of D's rule at step k: a the cotangent of y_{k+1}, and the
    cotangents of the kept states, θ and the times so far."""

    k: jax.Array
    a: State
    kept_bar: State
    theta_bar: jax.Array
    times_bar: jax.Array


class _Segments(NamedTuple):
    """The carry of the segment sweep: `control` = (segment j, step i in it,
    1 while reversing / 0 while recomputing), the recomputed states `local`,
    the adjoint a and the parameter integral g."""

    control: jax.Array
    local: State
    a: State
    g: jax.Array


class _TangentSweep(NamedTuple):
    """The carry of `_reverse_sweep`'s rule at step k: the tangent b_k and the
    cotangents accumulated so far."""

    k: jax.Array
    b: State
    ys_cot: State
    theta_cot: jax.Array
    times_cot: jax.Array
    ys_bar_cot: State | None


def _span(times: jax.Array, k) -> jax.Array:
    """(t_k, t_{k+1})."""
    return lax.dynamic_slice_in_dim(times, k, 2)


def _add_span(times_bar: jax.Array, k, span_bar: jax.Array) -> jax.Array:
    """`times_bar` with the cotangent of (t_k, t_{k+1}) added."""
    span_bar = _span(times_bar, k) + span_bar
    return lax.dynamic_update_slice_in_dim(times_bar, span_bar, k, 0)


def _reverse_sweep(state_cotangents: bool) -> Callable:
    """S(Φ, Y, θ, Ȳ, ȳ_N, times, count) -> (a_0, g), as a custom_vjp (module
    doc).

    Without `state_cotangents` the argument Ȳ is None (first-order use, where
    nothing differentiates the stored states), and no buffer of zeros is read.
    The times get cotangents like y_k and θ: ∇_{t_k, t_{k+1}} of
    ⟨a_{k+1}, Φ_k'·(b_k, d)⟩.
    """

    def run(step, ys, theta, ys_bar, seed, times, count, store: bool):
        """The sweep; with `store`, also the adjoints a_{k+1} entering each step."""

        def body(carry: _Sweep) -> _Sweep:
            k, a, g, adjoints = carry
            if store:
                adjoints = _put(adjoints, k, a)
            _, vjp = jax.vjp(
                lambda y, th: step(y, th, times[k], times[k + 1])[0], _at(ys, k), theta
            )
            a_y, a_theta = vjp(a)
            if state_cotangents:
                a_y = _add(a_y, _at(ys_bar, k))
            return _Sweep(k - 1, a_y, g + a_theta, adjoints)

        adjoints = tuple(map(jnp.zeros_like, ys)) if store else ()
        init = _Sweep(count - 1, seed, jnp.zeros_like(theta), adjoints)
        _, a0, g, adjoints = lax.while_loop(lambda c: c.k >= 0, body, init)
        return a0, g, adjoints

    @jax.custom_vjp
    def sweep(step, ys, theta, ys_bar, seed, times, count):
        a0, g, _ = run(step, ys, theta, ys_bar, seed, times, count, store=False)
        return a0, g

    def fwd(step, ys, theta, ys_bar, seed, times, count):
        a0, g, adjoints = run(step, ys, theta, ys_bar, seed, times, count, store=True)
        return (a0, g), (step, ys, theta, adjoints, times, count)

    def bwd(residuals, cotangents):
        step, ys, theta, adjoints, times, count = residuals
        c, d = cotangents

        def body(carry: _TangentSweep) -> _TangentSweep:
            k, b = carry.k, carry.b

            def tangent(y, th, span):
                end = lambda y, th: step(y, th, span[0], span[1])[0]
                return jax.jvp(end, (y, th), (b, d))[1]

            b_next, vjp = jax.vjp(tangent, _at(ys, k), theta, _span(times, k))
            y_cot, th_cot, span_cot = vjp(_at(adjoints, k))
            ys_bar_cot = None
            if state_cotangents:  # then the sweep carries Ȳ's cotangent
                ys_bar_cot = _put(present(carry.ys_bar_cot), k, b)
            return _TangentSweep(
                k=k + 1,
                b=b_next,
                ys_cot=_put(carry.ys_cot, k, y_cot),
                theta_cot=carry.theta_cot + th_cot,
                times_cot=_add_span(carry.times_cot, k, span_cot),
                ys_bar_cot=ys_bar_cot,
            )

        zeros = tuple(map(jnp.zeros_like, ys))
        init = _TangentSweep(
            k=jnp.zeros_like(count),
            b=c,
            ys_cot=zeros,
            theta_cot=jnp.zeros_like(theta),
            times_cot=jnp.zeros_like(times),
            ys_bar_cot=zeros if state_cotangents else None,
        )
        final = lax.while_loop(lambda carry: carry.k < count, body, init)
        return (
            jax.tree.map(zero_cotangent, step),
            final.ys_cot,
            final.theta_cot,
            final.ys_bar_cot,
            final.b,
            final.times_cot,
            zero_cotangent(count),
        )

    sweep.defvjp(fwd, bwd)
    return sweep


class _Layout(NamedTuple):
    """Where things are, none of it differentiated: the record's `stride` and
    step `count`, and the steps of the interior outputs (-1: at t0)."""

    stride: jax.Array
    count: jax.Array
    output_steps: jax.Array | None


def _densify(max_steps: int) -> Callable:
    """D(Φ, Y, θ, times, layout): the start state of every step in a `max_steps`
    buffer, recomputed from the kept states; a custom_vjp whose rule walks the
    steps backward and hands each kept state (and the times) its cotangent.
    Only the gradient of a gradient uses it."""

    @jax.custom_vjp
    def densify(step, kept, theta, times, layout):
        def body(carry: _Densify) -> _Densify:
            k, y, full = carry
            kept_here = lax.rem(k, layout.stride) == 0
            y = select(kept_here, _at(kept, lax.div(k, layout.stride)), y)
            y_next = step(y, theta, times[k], times[k + 1])[0]
            return _Densify(k + 1, y_next, _put(full, k, y))

        full = tuple(
            jnp.zeros((max_steps,) + leaf.shape[1:], leaf.dtype) for leaf in kept
        )
        init = _Densify(jnp.zeros_like(layout.count), _at(kept, 0), full)
        return lax.while_loop(lambda c: c.k < layout.count, body, init).full

    def fwd(step, kept, theta, times, layout):
        full = densify(step, kept, theta, times, layout)
        return full, (step, full, kept, theta, times, layout)

    def bwd(residuals, full_bar):
        step, full, kept, theta, times, layout = residuals

        def body(carry: _DensifyRule) -> _DensifyRule:
            k, a, kept_bar, theta_bar, times_bar = carry
            # a is the cotangent of y_{k+1}: step k made it unless it is kept.
            made = (lax.rem(k + 1, layout.stride) != 0) & (k + 1 < layout.count)
            a = tuple(jnp.where(made, x, 0) for x in a)
            _, vjp = jax.vjp(
                lambda y, th, span: step(y, th, span[0], span[1])[0],
                _at(full, k),
                theta,
                _span(times, k),
            )
            a_y, a_theta, a_span = vjp(a)
            times_bar = _add_span(times_bar, k, a_span)
            a = _add(a_y, _at(full_bar, k))
            kept_here = lax.rem(k, layout.stride) == 0
            kept_bar = select(
                kept_here, _put(kept_bar, lax.div(k, layout.stride), a), kept_bar
            )
            return _DensifyRule(k - 1, a, kept_bar, theta_bar + a_theta, times_bar)

        zeros = tuple(map(jnp.zeros_like, kept))
        init = _DensifyRule(
            layout.count - 1, _at(zeros, 0), zeros, jnp.zeros_like(theta),
            jnp.zeros_like(times),
        )  # fmt: skip
        _, _, kept_bar, theta_bar, times_bar = lax.while_loop(
            lambda c: c.k >= 0, body, init
        )
        zero = lambda tree: jax.tree.map(zero_cotangent, tree)
        return zero(step), kept_bar, theta_bar, times_bar, zero(layout)

    densify.defvjp(fwd, bwd)
    return densify


def _segment_sweep(longest: int, degree: int) -> Callable:
    """S(Φ, Y, θ, Ȳ_kept, ȳ_outputs, ȳ_N, times, θ_out, layout) -> (a_0, g) of
    the module doc (θ_out: the interior outputs' fractions of their steps),
    first order, in memory for `longest` states besides the record.

    Segment j is steps [j·S, (j+1)·S) for the stride S. Walking the segments
    from the last, the sweep recomputes a segment's start states from its kept
    state into a local buffer, then back-propagates through its steps in
    reverse. One loop does both, one step per iteration, so that the step is
    compiled once; a recomputed step costs a VJP, whose result is dropped. An
    interior output y(θ_i) = y_k + Σ_p θ_i^(p+1) C_p enters the VJP of its step
    k through the interpolation coefficients C_p.
    """
    may_recompute = longest > 1

    def injected(k, outputs_bar, powers, layout):
        """Cotangents of (C_p) and of y_k directly from the outputs in step k,
        `powers[i, p]` = θ_i^(p+1)."""
        mask = (layout.output_steps == k).astype(powers.dtype)
        weights = mask[:, None] * powers
        coefficients = tuple(
            jnp.tensordot(weights, bar, ((0,), (0,))) for bar in outputs_bar
        )
        direct = tuple(jnp.tensordot(mask, bar, ((0,), (0,))) for bar in outputs_bar)
        return coefficients, direct

    def sweep(step, kept, theta, kept_bar, outputs_bar, seed, times, fractions, layout):
        stride, count = layout.stride, layout.count
        length = lambda j: jnp.minimum(stride, count - j * stride)
        powers = None
        if outputs_bar is not None:  # loop-invariant, computed once
            exponents = jnp.arange(1, degree + 1, dtype=fractions.dtype)
            powers = fractions[:, None] ** exponents
            powers = powers.astype(outputs_bar[0].dtype)

        def body(carry: _Segments) -> _Segments:
            control, local, a, g = carry
            j, i, reverse = control[0], control[1], control[2] == 1
            k = j * stride + i
            t, t_new = times[k], times[k + 1]
            # Step j·S starts from the kept state, later ones from local[i].
            y = _at(kept, j)
            if may_recompute:
                y = select(i == 0, y, _at(local, i))
            (y1, _), vjp = jax.vjp(lambda y, th: step(y, th, t, t_new), y, theta)
            coefficients = None
            if outputs_bar is not None:
                coefficients, direct = injected(k, outputs_bar, powers, layout)
            a_y, g_step = vjp((a, coefficients))
            if outputs_bar is not None:
                a_y = _add(a_y, direct)
            if kept_bar is not None:
                kept_here = _add(a_y, _at(kept_bar, j))
                a_y = select(i == 0, kept_here, a_y)
            if may_recompute:
                # Recomputing, keep y_{k+1} in local[i + 1] and leave a and g
                # alone: the VJP is computed anyway (a branch around it would
                # keep XLA from fusing its two halves, slowing every step more
                # than the recomputed ones cost). Slot 0 takes the rest.
                local = _put(local, jnp.where(reverse, 0, i + 1), y1)
                a_y = select(reverse, a_y, a)
                g_step = jnp.where(reverse, g_step, 0)
            # Reversing: down a step, or after step j·S to the top of the
            # segment below, recomputing it first if it has more than a step.
            bottom = reverse & (i == 0)
            recompute_next = jnp.where(
                reverse, bottom & (stride > 1), i + 2 < length(j)
            )
            i_next = jnp.where(reverse, jnp.where(bottom, 0, i - 1), i + 1)
            control = jnp.stack(
                [j - bottom.astype(j.dtype), i_next, (~recompute_next).astype(j.dtype)]
            )
            return _Segments(control, local, a_y, g + g_step)

        segments = (count + stride - 1) // stride
        last = jnp.maximum(segments - 1, 0)
        local = tuple(
            jnp.zeros((longest,) + leaf.shape[1:], leaf.dtype) for leaf in kept
        )
        reverse = (length(last) <= 1).astype(count.dtype)
        control = jnp.stack([segments - 1, jnp.zeros_like(count), reverse])
        init = _Segments(control, local, seed, jnp.zeros_like(theta))
        _, _, a0, g = lax.while_loop(lambda c: c.control[0] >= 0, body, init)
        return a0, g

    return sweep


def _checkpoint_sweep(max_steps: int, longest: int, degree: int) -> Callable:
    """The reverse sweep S (module doc) as a custom_vjp: `_segment_sweep` when
    evaluated; differentiated, the same sums over all N recomputed states (D),
    with the interior outputs' VJPs batched and `_reverse_sweep`'s rule. The
    step times and the outputs' fractions of their steps are differentiated
    too: through them a_0 moves with the output times."""
    segment_sweep = _segment_sweep(longest, degree)
    densify = _densify(max_steps)

    def over_all_states(
        step, kept, theta, kept_bar, outputs_bar, seed, times, fractions, layout
    ):
        full = densify(step, kept, theta, times, layout)
        starts_bar = None
        if kept_bar is not None:
            # Slot j holds step j·stride; slots past the count are dropped.
            index = jnp.arange(kept_bar[0].shape[0]) * layout.stride
            index = jnp.where(index < layout.count, index, max_steps)
            starts_bar = tuple(
                jnp.zeros_like(leaf).at[index].add(bar, mode="drop")
                for leaf, bar in zip(full, kept_bar, strict=True)
            )
        theta_bar = jnp.zeros_like(theta)
        if outputs_bar is not None:
            k = jnp.maximum(layout.output_steps, 0)
            t, t_new = times[k], times[k + 1]

            def interpolate(y, theta, t, t_new, fraction):
                _, dense = step(y, theta, t, t_new)
                return tuple(map(interp.evaluate, y, dense, (fraction,) * len(y)))

            batched = jax.vmap(interpolate, in_axes=(0, None, 0, 0, 0))
            _, vjp = jax.vjp(
                lambda y, th: batched(y, th, t, t_new, fractions), _at(full, k), theta
            )
            mask = (layout.output_steps >= 0)[:, None]
            y_bar, theta_bar = vjp(
                tuple(jnp.where(mask, bar, 0) for bar in outputs_bar)
            )
            if starts_bar is None:
                starts_bar = tuple(map(jnp.zeros_like, full))
            starts_bar = tuple(
                s.at[k].add(jnp.where(mask, b, 0))
                for s, b in zip(starts_bar, y_bar, strict=True)
            )
        sweep = _reverse_sweep(state_cotangents=starts_bar is not None)
        a0, g = sweep(step, full, theta, starts_bar, seed, times, layout.count)
        return a0, g + theta_bar

    @jax.custom_vjp
    def sweep(step, kept, theta, kept_bar, outputs_bar, seed, times, fractions, layout):
        return segment_sweep(
            step, kept, theta, kept_bar, outputs_bar, seed, times, fractions, layout
        )

    def fwd(step, kept, theta, kept_bar, outputs_bar, seed, times, fractions, layout):
        def of_arrays(kept, theta, kept_bar, outputs_bar, seed, times, fractions):
            return over_all_states(
                step, kept, theta, kept_bar, outputs_bar, seed, times, fractions, layout
            )

        out, vjp = jax.vjp(
            of_arrays, kept, theta, kept_bar, outputs_bar, seed, times, fractions
        )
        return out, (vjp, step, layout)

    def bwd(residuals, cotangents):
        vjp, step, layout = residuals
        zero = lambda tree: jax.tree.map(zero_cotangent, tree)
        return (zero(step), *vjp(cotangents), zero(layout))

    sweep.defvjp(fwd, bwd)
    return sweep


def _step_times(record: StepRecord, tau: jax.Array, t_stop=None) -> jax.Array:
    """The record's step times s_k, measured from τ_0 as the loop measured them
    (so that each replayed step has the forward step's size exactly), with
    s_0 moving with τ_0 and s_N with τ_N, the steps in between fixed in
    absolute time (their sizes are not differentiated), as the kept states
    are for the continuous ∂L/∂τ_0 (see `time_cotangents`). The values are
    the record's. A solve stopped by an event (`t_stop` finite) ends where it
    stopped, which τ_N does not move."""
    moving = lambda x: x - lax.stop_gradient(x)
    times = lax.stop_gradient(record.times)
    end = moving(tau[-1])
    if t_stop is not None:
        end = jnp.where(jnp.isfinite(t_stop), 0, end)
    return times.at[0].add(moving(tau[0])).at[record.count].add(end)


class CheckpointAdjoint(AbstractAdjoint):
    """Differentiate the discrete solution exactly (discretise-then-optimise).

    The forward pass stores every accepted step's times and the start states of
    up to `checkpoints` of them; the backward pass walks the steps in reverse
    and back-propagates through each single Runge–Kutta step and the
    interpolation of the outputs it covers. The gradient equals that of the
    computed solution to rounding. Step-size decisions are not differentiated.

    Memory is bounded: when a solve takes more steps than `checkpoints`, the
    kept states thin out to every 2nd, 4th, … step (the stride doubles each
    time the slots fill), and the backward pass recomputes each dropped state
    once, from the kept state before it, at the cost of one more VJP of a step
    per dropped state. It holds `checkpoints` + 1 states and at most
    2·max_steps/`checkpoints` more for the stretch being recomputed (16 for
    the default 256 and `max_steps=4096`). `checkpoints=None` keeps every step
    (`max_steps` states, no recomputation).

    Gradients of gradients work: the backward pass has its own VJP, a forward
    tangent sweep (one JVP-then-VJP of a step per step). It recomputes all
    start states and holds them, with two more `max_steps` buffers. Third
    derivatives in reverse mode are not available.

    Gradients with respect to `ts` use the continuous-time formula
    ∂L/∂t_i = ȳ_i·f(t_i, y_i) (and -a(t_0)·f(t_0, y_0) for t_0). Differentiated
    again, a(t_0) moves with `ts` through the first step's start, the last
    step's end and the interior outputs' places in their steps; the step times
    in between stay put.

    A `custom_vjp` blocks forward-mode differentiation: use `ForwardMode()` for
    `jax.jvp`/`jax.jacfwd`.

    **Arguments:**

    - `checkpoints`: how many step start states the forward pass keeps, at
      least 2 (default 256); None keeps all of them.
    """

    checkpoints: int | None = eqx.field(default=256, static=True)
    supports_events: ClassVar[bool] = True

    def __check_init__(self):
        value = self.checkpoints
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | np.integer)
        ):
            raise TypeError(
                f"CheckpointAdjoint: checkpoints must be an int or None, got {value!r}"
            )
        if value is not None and value < 2:
            raise ValueError(
                "CheckpointAdjoint: checkpoints must be at least 2 (or None), "
                f"got {self.checkpoints}"
            )

    def loop(self, config, problem, params, y0, ts, h0=None):
        direction, tau = direction_and_tau(ts)
        params_arrays, params_static = eqx.partition(params, eqx.is_array)

        def forward(params_arrays, y0, tau, direction, h0):
            params = eqx.combine(params_arrays, params_static)
            f = lambda t, y: problem.f_flat(t, y, params, direction)
            options = LoopOptions(record_steps=True, record_slots=self.checkpoints)
            event = event_function(problem, params, direction)
            ys, stats, record = integrate(config, f, y0, tau, h0, options, event)
            return (ys, record), stats

        def backward(residual, stats, params_arrays, y0, tau, direction, cotangent):
            (ys, record), (ys_bar, record_bar) = residual, cotangent
            params = eqx.combine(params_arrays, params_static)
            # The kept states have cotangents only in second-order use.
            kept_bar = None if record_bar is None else record_bar.y_starts
            if kept_bar is not None and all(map(is_symbolic_zero, kept_bar)):
                kept_bar = None
            return self.backward(
                config, problem, params, direction, tau, ys, record,
                instantiate(ys_bar), instantiate(kept_bar), self.checkpoints,
                stop_time(stats, tau),
            )  # fmt: skip

        # Not differentiated, the solve records no steps.
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

    @staticmethod
    def backward(
        config, problem, params, direction, tau, ys, record: StepRecord, ys_bar,
        kept_bar, checkpoints: int | None = None, t_stop=None,
    ):  # fmt: skip
        """Cotangents (params, y0, τ) from those of the outputs and kept states.

        A solve stopped by an event at `t_stop` (from τ_0, see `stop_time`)
        ends its last recorded step there, and its outputs after it are that
        state: their cotangents join the last output's, and the last step's
        end does not move with τ_N.
        """
        diff, fixed = eqx.partition(params, eqx.is_inexact_array)
        theta, unravel_theta = ravel_pytree(diff)
        real = jnp.real(ys[0]).dtype
        n_out = tau.shape[0]
        if t_stop is not None:
            ys_bar, frozen = fold_frozen(ys_bar, tau, t_stop)
        times = _step_times(record, tau, t_stop)
        origin = lax.stop_gradient(tau[0])
        solver = config.solver
        # Interior outputs are read from their steps' interpolants.
        dense = n_out > 2

        fixed_arrays, fixed_static = eqx.partition(fixed, eqx.is_array)
        step = _Step(
            problem,
            solver,
            lambda theta, arrays: eqx.combine(
                unravel_theta(theta), arrays, fixed_static
            ),
            fixed_arrays,
            direction,
            origin,
            dense,
            tolerances(config),
        )
        valid = jnp.arange(times.shape[0], dtype=record.count.dtype) <= record.count
        if record.carries is not None:
            step = eqx.tree_at(
                lambda s: (s.carries, s.carry_times),
                step,
                (
                    record.carries,
                    jnp.where(valid, lax.stop_gradient(record.times), jnp.inf),
                ),
                is_leaf=lambda x: x is None,
            )
        # Output i lies in step k_i: s_k < τ_i - τ_0 <= s_{k+1}; k_i = -1 means
        # τ_i = τ_0.
        since = lax.stop_gradient(tau - tau[0])
        k_out = (
            jnp.searchsorted(jnp.where(valid, record.times, jnp.inf), since).astype(
                jnp.int32
            )
            - 1
        )
        if t_stop is not None:
            k_out = jnp.where(frozen, 0, k_out)
        index = jnp.arange(n_out)
        before = (k_out < 0) & (index > 0) & (index < n_out - 1)
        y0_direct = tuple(
            jnp.sum(jnp.where(before[:, None], bar, 0), axis=0) for bar in ys_bar
        )
        outputs_bar, output_steps, fractions = None, None, None
        if dense:
            inner = slice(1, n_out - 1)
            output_steps = k_out[inner]
            k = jnp.maximum(output_steps, 0)
            t, t_new = times[k], times[k + 1]
            fractions = ((tau[inner] - origin - t) / (t_new - t)).astype(real)
            if t_stop is not None:
                # Outputs after an event's stop have no cotangent of their own.
                fractions = jnp.where(frozen[inner], 0, fractions)
            outputs_bar = tuple(bar[inner] for bar in ys_bar)
        layout = _Layout(record.stride, record.count, output_steps)
        slots = kept_slots(checkpoints, config.max_steps)
        longest = thinned_stride(slots, config.max_steps)
        sweep = _checkpoint_sweep(config.max_steps, longest, solver.dense_degree)
        seed = tuple(bar[-1] for bar in ys_bar)
        y0_bar = tuple(bar[0] for bar in ys_bar)
        if kept_bar is not None:
            # The first kept state is y0: like ys[0], it stays put when τ_0
            # moves, so its cotangent joins y0's after ∂L/∂τ_0.
            y0_bar = _add(y0_bar, _at(kept_bar, 0))
            kept_bar = tuple(bar.at[0].set(0) for bar in kept_bar)
        a0, g = sweep(
            step, record.y_starts, theta, kept_bar, outputs_bar, seed, times,
            fractions, layout,
        )  # fmt: skip
        a_before = _add(a0, y0_direct)
        tau_bar = time_cotangents(problem, params, direction, tau, ys, ys_bar, a_before)
        return unravel_theta(g), _add(a_before, y0_bar), tau_bar
