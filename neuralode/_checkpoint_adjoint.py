"""`CheckpointAdjoint`: the exact gradient of the discrete solution, by replaying
its stored steps, with reverse-over-reverse (gradients of gradients) support.

Write the accepted steps as y_{k+1} = Φ_k(y_k, θ) (Φ_k one Runge–Kutta step
from t_k to t_{k+1}; the step sizes are not differentiated). Three pieces, each
with a rule that JAX can differentiate once more:

1. the solve, (y0, θ) ↦ (outputs, Y = (y_0, …, y_{N-1})), whose VJP is
2. the reverse sweep S: a_N = ȳ_N, a_k = Φ_kᵀ_y a_{k+1} + Ȳ_k,
   g = Σ_k Φ_kᵀ_θ a_{k+1}, returning (a_0, g); S is linear in the cotangents,
   so its own VJP is
3. a forward tangent sweep: with cotangents (c, d) of (a_0, g), b_0 = c,
   b_{k+1} = Φ_k'·(b_k, d) (one JVP per step), the cotangent of Ȳ_k is b_k and
   those of y_k and θ are ∇_{y,θ} ⟨a_{k+1}, Φ_k'(y_k, θ)·(b_k, d)⟩.

Output times inside a step are interpolated from the step's dense output; their
cotangents reach y_k and θ through one batched VJP outside the sweeps.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _interpolation as interp
from ._adjoint import (
    AbstractAdjoint,
    _custom_vjp_loop,
    _direction_and_tau,
    _first_step_argument,
    _forward_check,
    _instantiate,
    _is_symbolic_zero,
    _primal_solve,
    _time_cotangents,
)
from ._controller import State
from ._integrate import integrate

StepFn = Callable[[State, jax.Array, jax.Array, jax.Array], tuple[State, State]]


def _add(a: State, b: State) -> State:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _at(buffers: State, k) -> State:
    return tuple(buffer[k] for buffer in buffers)


def _put(buffers: State, k, values: State) -> State:
    return tuple(
        lax.dynamic_update_index_in_dim(b, v, k, 0)
        for b, v in zip(buffers, values, strict=True)
    )


def _float0_like(x):
    return np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)


def _reverse_sweep(step: StepFn, state_cotangents: bool) -> Callable:
    """S(Y, θ, Ȳ, ȳ_N, times, count) -> (a_0, g), as a custom_vjp (module doc).

    Without `state_cotangents` the argument Ȳ is None (first-order use, where
    nothing differentiates the stored states), and no buffer of zeros is read.
    """

    def end_state(y, theta, k, times):
        return step(y, theta, times[k], times[k + 1])[0]

    def run(ys, theta, ys_bar, seed, times, count, store: bool):
        """The sweep; with `store`, also the adjoints a_{k+1} entering each step."""

        def body(carry):
            k, a, g, adjoints = carry
            if store:
                adjoints = _put(adjoints, k, a)
            _, vjp = jax.vjp(
                lambda y, th: end_state(y, th, k, times), _at(ys, k), theta
            )
            a_y, a_theta = vjp(a)
            if state_cotangents:
                a_y = _add(a_y, _at(ys_bar, k))
            return k - 1, a_y, g + a_theta, adjoints

        adjoints = tuple(map(jnp.zeros_like, ys)) if store else ()
        init = (count - 1, seed, jnp.zeros_like(theta), adjoints)
        _, a0, g, adjoints = lax.while_loop(lambda c: c[0] >= 0, body, init)
        return a0, g, adjoints

    @jax.custom_vjp
    def sweep(ys, theta, ys_bar, seed, times, count):
        a0, g, _ = run(ys, theta, ys_bar, seed, times, count, store=False)
        return a0, g

    def fwd(ys, theta, ys_bar, seed, times, count):
        a0, g, adjoints = run(ys, theta, ys_bar, seed, times, count, store=True)
        return (a0, g), (ys, theta, adjoints, times, count)

    def bwd(residuals, cotangents):
        ys, theta, adjoints, times, count = residuals
        c, d = cotangents

        def body(carry):
            k, b, ys_cot, theta_cot, ys_bar_cot = carry

            def tangent(y, th):
                return jax.jvp(
                    lambda y, th: end_state(y, th, k, times), (y, th), (b, d)
                )[1]

            b_next, vjp = jax.vjp(tangent, _at(ys, k), theta)
            y_cot, th_cot = vjp(_at(adjoints, k))
            ys_cot = _put(ys_cot, k, y_cot)
            if state_cotangents:
                ys_bar_cot = _put(ys_bar_cot, k, b)
            return k + 1, b_next, ys_cot, theta_cot + th_cot, ys_bar_cot

        zeros = tuple(map(jnp.zeros_like, ys))
        ys_bar_cot = zeros if state_cotangents else None
        init = (jnp.zeros_like(count), c, zeros, jnp.zeros_like(theta), ys_bar_cot)
        _, b, ys_cot, theta_cot, ys_bar_cot = lax.while_loop(
            lambda carry: carry[0] < count, body, init
        )
        return (
            ys_cot,
            theta_cot,
            ys_bar_cot,
            b,
            jnp.zeros_like(times),
            _float0_like(count),
        )

    sweep.defvjp(fwd, bwd)
    return sweep


class CheckpointAdjoint(AbstractAdjoint):
    """Differentiate the discrete solution exactly (discretise-then-optimise).

    The forward pass stores every accepted step (its start time, end time and
    start state) in buffers of length `max_steps`; the backward pass walks the
    steps in reverse and back-propagates through each single Runge–Kutta step
    and the interpolation of the outputs it covers. The gradient equals that of
    the computed solution to rounding. Memory grows linearly with `max_steps`
    (`max_steps × state size` floats), so keep `max_steps` near what the solve
    needs. Step-size decisions are not differentiated.

    Gradients of gradients work: the reverse sweep has its own VJP, a forward
    tangent sweep (one JVP-then-VJP of a step per step, two more `max_steps`
    buffers). Third derivatives in reverse mode are not available.

    Gradients with respect to `ts` use the continuous-time formula
    ∂L/∂t_i = ȳ_i·f(t_i, y_i) (and -a(t_0)·f(t_0, y_0) for t_0).

    A `custom_vjp` blocks forward-mode differentiation: use `ForwardMode()` for
    `jax.jvp`/`jax.jacfwd`.
    """

    def loop(self, config, problem, params, y0, ts, h0=None):
        direction, tau = _direction_and_tau(ts)
        params_arrays, params_static = eqx.partition(params, eqx.is_array)

        def forward(params_arrays, y0, tau, direction, h0):
            params = eqx.combine(params_arrays, params_static)
            f = lambda t, y: problem.f_flat(t, y, params, direction)
            ys, stats, record = integrate(config, f, y0, tau, h0, record_steps=True)
            return (ys, record), stats

        def backward(residual, _, params_arrays, y0, tau, direction, cotangent):
            (ys, record), (ys_bar, record_bar) = residual, cotangent
            params = eqx.combine(params_arrays, params_static)
            # The stored states have cotangents only in second-order use.
            starts_bar = None if record_bar is None else record_bar.y_starts
            if starts_bar is not None and all(map(_is_symbolic_zero, starts_bar)):
                starts_bar = None
            return self.backward(
                config, problem, params, direction, tau, ys, record,
                _instantiate(ys_bar), _instantiate(starts_bar),
            )  # fmt: skip

        # Not differentiated, the solve records no steps.
        solve = _custom_vjp_loop(
            forward,
            backward,
            _primal_solve(config, problem, params_static),
            select=lambda out, tau: out[0],
            expand=lambda out, tau, ys_bar: (ys_bar, None),
            check=_forward_check(config),
        )
        h0 = _first_step_argument(h0, tau)
        return solve(params_arrays, y0, tau, direction, h0)

    @staticmethod
    def backward(
        config, problem, params, direction, tau, ys, record, ys_bar, starts_bar
    ):
        """Cotangents (params, y0, τ) from those of the outputs and stored states."""
        diff, fixed = eqx.partition(params, eqx.is_inexact_array)
        theta, unravel_theta = ravel_pytree(diff)
        real = jnp.real(ys[0]).dtype
        n_out = tau.shape[0]
        times = lax.stop_gradient(record.times)

        solver = config.solver

        def step(y, theta, t, t_new):
            p = eqx.combine(unravel_theta(theta), fixed)
            f = lambda s, x: problem.f_flat(s, x, p, direction)
            result = solver.step(f, t, y, f(t, y), t_new - t)
            return result.y1, result.dense

        valid = jnp.arange(times.shape[0], dtype=record.count.dtype) <= record.count
        # Output i lies in step k_i: t_k < τ_i <= t_{k+1}; k_i = -1 means τ_i = t_0.
        k_out = (
            jnp.searchsorted(jnp.where(valid, times, jnp.inf), tau).astype(jnp.int32)
            - 1
        )
        index = jnp.arange(n_out)
        before = (k_out < 0) & (index > 0) & (index < n_out - 1)
        y0_direct = tuple(
            jnp.sum(jnp.where(before[:, None], bar, 0), axis=0) for bar in ys_bar
        )
        theta_bar = jnp.zeros_like(theta)
        if n_out > 2:  # interior outputs, interpolated inside their steps
            inner = slice(1, n_out - 1)
            k = jnp.maximum(k_out[inner], 0)
            t, t_new = times[k], times[k + 1]
            weight = lax.stop_gradient((tau[inner] - t) / (t_new - t)).astype(real)

            def interpolate(y, theta, t, t_new, weight):
                _, dense = step(y, theta, t, t_new)
                return tuple(map(interp.evaluate, y, dense, (weight,) * len(y)))

            batched = jax.vmap(interpolate, in_axes=(0, None, 0, 0, 0))
            _, vjp = jax.vjp(
                lambda y, th: batched(y, th, t, t_new, weight),
                _at(record.y_starts, k),
                theta,
            )
            mask = (k_out[inner] >= 0)[:, None]
            y_bar, theta_bar = vjp(
                tuple(jnp.where(mask, bar[inner], 0) for bar in ys_bar)
            )
            if starts_bar is None:
                starts_bar = tuple(map(jnp.zeros_like, record.y_starts))
            starts_bar = tuple(
                s.at[k].add(jnp.where(mask, b, 0))
                for s, b in zip(starts_bar, y_bar, strict=True)
            )
        sweep = _reverse_sweep(step, state_cotangents=starts_bar is not None)
        seed = tuple(bar[-1] for bar in ys_bar)
        a0, g = sweep(record.y_starts, theta, starts_bar, seed, times, record.count)
        a_before = _add(a0, y0_direct)
        tau_bar = _time_cotangents(
            problem, params, direction, tau, ys, ys_bar, a_before
        )
        y0_bar = _add(a_before, tuple(bar[0] for bar in ys_bar))
        return unravel_theta(g + theta_bar), y0_bar, tau_bar
