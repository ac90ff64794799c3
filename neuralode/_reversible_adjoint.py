"""`ReversibleAdjoint`: the exact gradient of an algebraically reversible
Runge–Kutta solve, at memory that does not grow with the number of steps.

McCallum & Foster (2024) turn any explicit one-step method
Φ_h(t, y) = y + Ψ_h(t, y) into an algebraically reversible one by carrying a
second state z next to y (both start at y0):

    y_{n+1} = λ y_n + (1 - λ) z_n + Ψ_h(t_n, z_n)
    z_{n+1} = z_n - Ψ_{-h}(t_{n+1}, y_{n+1}),

with the coupling parameter 0 < λ <= 1. The step inverts explicitly,

    z_n = z_{n+1} + Ψ_{-h}(t_{n+1}, y_{n+1})
    y_n = z_n + (y_{n+1} - Φ_h(t_n, z_n)) / λ,

so the backward pass rebuilds every (y_n, z_n) from the last one by running
the scheme backwards, and back-propagates through each step as it goes: the
gradient is the derivative of the computed solution (discretise-then-optimise,
like `CheckpointAdjoint`) without storing a state per step. The two base
steps that rebuild (y_n, z_n) are the two base steps of the forward step, so
one `jax.vjp` of each gives both the rebuilt states and the step's VJP: a
backward step costs about two forward steps.

λ < 1 damps the scheme's spurious mode on oscillatory dynamics (λ = 1 is
the leapfrog-like coupling, only neutrally stable); the paper's default
λ = 0.999 keeps the amplification of rounding errors in the reconstruction
that it costs, λ^{-N} over N steps, negligible for any step count a solve
allows. Stability needs λ <= |R(hμ)| <= 1 per mode (`ReversibleAdjoint`).

Reference: S. McCallum and J. Foster, "Efficient, accurate and stable
gradients for neural ODEs", arXiv:2410.11648 (2024).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from ._adjoint import AbstractAdjoint
from ._adjoint_common import (
    custom_vjp_loop,
    direction_and_tau,
    first_step_argument,
    forward_check,
    instantiate,
    time_cotangents,
)
from ._failure import SolveError, solve_error_from, tie
from ._integrate import LoopOptions, SolverConfig, integrate
from ._solution import RESULTS
from ._solvers import AbstractExplicitRungeKutta, AbstractSolver, StepResult
from ._state import FlatField, State, present

_EXPLICIT = "Dopri5, Tsit5, Bosh3, Fehlberg45, Euler, Midpoint or RK4"


def _add(a: State, b: State) -> State:
    return tuple(x + y for x, y in zip(a, b, strict=True))


class ReversibleStep(AbstractSolver):
    """The reversible version of an explicit Runge–Kutta method, as a solver of
    the pair state (y..., z...) (the m leaves of y, then those of z).

    One step is a base step of size h from (t_n, z_n) and one of size -h from
    (t_{n+1}, y_{n+1}) (module doc). The error estimate is the base method's
    for its step from z_n (only y's leaves are in the error norm); the dense
    output of y is y_n + θ(λ - 1)(y_n - z_n) + (P(θ) - z_n), P the base step's
    interpolant from z_n, which runs from y_n to y_{n+1} with the base
    interpolant's order. z's slots hold the same coefficients and are never
    read.
    """

    base: AbstractExplicitRungeKutta
    coupling: float = eqx.field(static=True)
    m: int = eqx.field(static=True)

    @property
    def order(self) -> int:
        return self.base.order

    @property
    def adaptive(self) -> bool:
        return self.base.adaptive

    @property
    def error_exponent(self) -> float:
        return self.base.error_exponent

    @property
    def dense_degree(self) -> int:
        return self.base.dense_degree

    @property
    def fevals_per_step(self) -> int:
        """Two base steps and f(t_{n+1}, z_{n+1}); the backward base step's
        last stage is never used (an FSAL method's saves one evaluation). A
        non-FSAL method's Hermite output costs one more, not counted."""
        per_base = self.base.fevals_per_step
        return 2 * per_base + (1 if self.base.tableau.fsal else 0)

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
        """One reversible step of the pair (y, z) from t; `f0[m:]` = f(t, z)."""
        m, lam = self.m, self.coupling
        y_n, z_n = y[:m], y[m:]
        ahead = self.base.step(f, t, z_n, f0[m:], h, dense=dense)
        y1 = tuple(
            p + lam * (a - b) for p, a, b in zip(ahead.y1, y_n, z_n, strict=True)
        )
        t1 = t + h
        f_y1 = f(t1, y1)
        back = self.base.step(f, t1, y1, f_y1, -h, dense=False)
        z1 = tuple(z + (a - b) for z, a, b in zip(z_n, y1, back.y1, strict=True))
        f_z1 = f(t1, z1)
        zeros = tuple(jnp.zeros_like(leaf) for leaf in z_n)
        coeffs = None
        if dense:
            ahead_dense = present(ahead.dense)  # stepped with dense=True
            coeffs = tuple(
                c.at[0].add((lam - 1) * (a - b))
                for c, a, b in zip(ahead_dense, y_n, z_n, strict=True)
            )
            coeffs = coeffs + coeffs
        return StepResult((*y1, *z1), (*ahead.y_error, *zeros), (*f_y1, *f_z1), coeffs)


def _pair_field(base: FlatField, m: int) -> FlatField:
    """f on y alone (m leaves) or on the pair (y, z) (2m leaves); evaluated
    once where z is y itself (the initial state)."""

    def field(t: Array, state: State) -> State:
        if len(state) == m:
            return base(t, state)
        y, z = state[:m], state[m:]
        fy = base(t, y)
        same = all(a is b for a, b in zip(y, z, strict=True))
        return (*fy, *(fy if same else base(t, z)))

    return field


class _Stepper(eqx.Module):
    """The base steps Φ_{±h} of the problem for the backward sweep, θ its
    inexact parameters. A pytree of the arrays it needs besides θ, so that the
    sweep's custom_vjp takes it as an argument."""

    problem: Any = eqx.field(static=True)
    base: Any = eqx.field(static=True)
    coupling: float = eqx.field(static=True)
    # The units of the gap y - z.
    tolerances: GapScale = eqx.field(static=True)
    # (θ, arrays) -> the problem's parameters.
    params: Callable = eqx.field(static=True)
    arrays: PyTree
    direction: Array
    origin: Array

    def phi(self, theta, t, x: State, h, t_f0, dense: bool):
        """(Φ_h(t, x), interpolation coefficients or None), with f(t, x)
        evaluated at `t_f0` as the forward loop did (see `_f0_time`)."""
        p = self.params(theta, self.arrays)
        f = lambda s, v: self.problem.f_flat(self.origin + s, v, p, self.direction)
        result = self.base.step(f, t, x, f(t_f0, x), h, dense=dense)
        return result.y1, result.dense


class _Sweep(NamedTuple):
    """The carry of the backward sweep before step k: the pair
    (y_{k+1}, z_{k+1}), its adjoints, the parameter cotangents so far and the
    largest gap between y and z seen (`_gap`)."""

    k: Array
    y: State
    z: State
    a_y: State
    a_z: State
    g: PyTree
    gap: Array


def _weighted_rms(x: State, scale: State, rtol: float, atol: float) -> Array:
    """RMS norm of x / (atol + rtol·|scale|) over all leaves."""
    squares = [
        jnp.sum(jnp.abs(a / (atol + rtol * jnp.abs(b))) ** 2)
        for a, b in zip(x, scale, strict=True)
    ]
    return jnp.sqrt(sum(squares) / sum(a.size for a in x))


class GapScale(NamedTuple):
    """The units of the gap ‖y - z‖: the solve's tolerances componentwise
    (adaptive steps), or with `normwise` a relative tolerance on the whole
    state, ‖y - z‖ / (rtol·max(‖y‖, ‖z‖) + atol) (fixed steps)."""

    rtol: float
    atol: float
    normwise: bool = False


def _rms(x: State) -> Array:
    """RMS norm of x over all leaves (`_weighted_rms` in absolute units)."""
    return _weighted_rms(x, x, 0.0, 1.0)


def _last(leaves: State) -> State:
    """The last output of each leaf."""
    return tuple(leaf[-1] for leaf in leaves)


def _gap(y: State, z: State, units: GapScale) -> Array:
    """‖y - z‖ in `units`: the amplitude of the scheme's spurious mode (0 for
    the exact flow; a local error's worth where stable)."""
    difference = tuple(a - b for a, b in zip(y, z, strict=True))
    if units.normwise:
        size = jnp.maximum(_rms(y), _rms(z))
        return _rms(difference) / (units.rtol * size + units.atol)
    scale = tuple(
        jnp.maximum(jnp.abs(a), jnp.abs(b)) for a, b in zip(y, z, strict=True)
    )
    return _weighted_rms(difference, scale, units.rtol, units.atol)


class _Outputs(NamedTuple):
    """The interior outputs' cotangents, steps and fractions θ_i of them."""

    bar: State
    steps: Array
    fractions: Array


def _f0_time(times: Array, k: Array) -> Array:
    """The time at which the forward loop evaluated f(t_k, z_k): the previous
    step's end t_{k-1} + h_{k-1}, which can differ from the stored t_k in its
    last bit; t_0 for the first step."""
    before = jnp.maximum(k - 1, 0)
    carried = times[before] + (times[k] - times[before])
    return jnp.where(k > 0, carried, times[k])


def _sweep_states(stepper: _Stepper, theta, y_end, z_end, seed, outputs, times, count):
    """Rebuild the pair step by step from the last and back-propagate.

    **Returns:** `(a_y0, a_z0, g, y0, z0, gap)`: the adjoints of the initial
    pair, the parameter cotangents, the rebuilt initial pair and the largest
    `_gap` of the rebuilt pairs.
    """
    lam = stepper.coupling
    dense = outputs is not None
    if dense:
        degree = stepper.base.dense_degree
        exponents = jnp.arange(1, degree + 1, dtype=outputs.fractions.dtype)
        powers = (outputs.fractions[:, None] ** exponents).astype(outputs.bar[0].dtype)
        shift = ((lam - 1) * outputs.fractions).astype(outputs.bar[0].dtype)

    def body(carry: _Sweep) -> _Sweep:
        k, y1, z1, a_y, a_z, g, gap = carry
        t = times[k]
        h = times[k + 1] - t
        t1 = t + h  # as the forward step computed it
        back, back_vjp = jax.vjp(
            lambda x, th: stepper.phi(th, t1, x, -h, t1, False)[0], y1, theta
        )
        z = tuple(c - (a - b) for c, a, b in zip(z1, y1, back, strict=True))
        r_y, r_theta = back_vjp(a_z)
        a_bar = tuple(p + q - r for p, q, r in zip(a_y, a_z, r_y, strict=True))
        (ahead, _), ahead_vjp = jax.vjp(
            lambda x, th: stepper.phi(th, t, x, h, _f0_time(times, k), dense),
            z,
            theta,
        )
        y = tuple(c + (a - b) / lam for c, a, b in zip(z, y1, ahead, strict=True))
        coeffs_bar = None
        if dense:
            # Output i in step k: y_k + θ_i(λ-1)(y_k - z_k) + Σ_p θ_i^{p+1} C_p.
            mask = (outputs.steps == k).astype(powers.dtype)
            weights = mask[:, None] * powers
            coeffs_bar = tuple(
                jnp.tensordot(weights, bar, ((0,), (0,))) for bar in outputs.bar
            )
            direct = tuple(
                jnp.tensordot(mask, bar, ((0,), (0,))) for bar in outputs.bar
            )
            coupled = tuple(
                jnp.tensordot(mask * shift, bar, ((0,), (0,))) for bar in outputs.bar
            )
        s_z, s_theta = ahead_vjp((a_bar, coeffs_bar))
        a_y = tuple(lam * x for x in a_bar)
        a_z = tuple(p + q - lam * r for p, q, r in zip(a_z, s_z, a_bar, strict=True))
        if dense:
            a_y = tuple(p + q + r for p, q, r in zip(a_y, direct, coupled, strict=True))
            a_z = tuple(p - r for p, r in zip(a_z, coupled, strict=True))
        g = jax.tree.map(lambda p, q, r: p - q + r, g, r_theta, s_theta)
        gap = jnp.maximum(gap, lax.stop_gradient(_gap(y, z, stepper.tolerances)))
        return _Sweep(k - 1, y, z, a_y, a_z, g, gap)

    zeros = tuple(jnp.zeros_like(x) for x in seed)
    g0 = jax.tree.map(jnp.zeros_like, theta)
    gap = lax.stop_gradient(_gap(y_end, z_end, stepper.tolerances))
    init = _Sweep(count - 1, y_end, z_end, seed, zeros, g0, gap)
    final = lax.while_loop(lambda c: c.k >= 0, body, init)
    return final.a_y, final.a_z, final.g, final.y, final.z, final.gap


_SECOND_ORDER = (
    "neuralode: ReversibleAdjoint gives first derivatives only: its backward "
    "pass (a reverse sweep on lax.while_loop) has no rule of its own to be "
    "differentiated again. For gradients of gradients (jax.grad of a gradient, "
    "jax.jacrev(jax.jacrev(f))) use adjoint=neuralode.CheckpointAdjoint() or "
    "neuralode.BacksolveAdjoint(); for forward mode (jax.jvp, jax.jacfwd) "
    "neuralode.ForwardMode()."
)


@jax.custom_vjp
def _sweep(stepper, theta, y_end, z_end, seed, outputs, times, count):
    return _sweep_states(stepper, theta, y_end, z_end, seed, outputs, times, count)


def _sweep_fwd(*args):
    raise TypeError(_SECOND_ORDER)


def _sweep_bwd(residuals, cotangents):
    raise AssertionError("unreachable: the forward rule raises")


_sweep.defvjp(_sweep_fwd, _sweep_bwd)


class ReversibleRecord(NamedTuple):
    """What the differentiated forward solve keeps for the backward pass: the
    outputs of y, the final pair (y_N, z_N), the accepted steps' times
    (max_steps + 1 scalars, measured from the first output time as the loop
    measured them) and their number."""

    ys: State
    y_end: State
    z_end: State
    times: Array
    count: Array


class ReversibleGradient(NamedTuple):
    """The backward pass's result: cotangents of the parameters (inexact leaves;
    None elsewhere), y0 and τ; the initial pair (y_0, z_0) as the sweep rebuilt
    it (both equal y0 up to rounding); `drift`, the largest distance of either
    from y0, and `gap`, the largest ‖y_k - z_k‖ of the rebuilt pairs, both in
    units of the tolerance (atol + rtol·|y|, RMS over the state)."""

    params_bar: PyTree
    y0_bar: State
    tau_bar: Array
    y0_rebuilt: State
    z0_rebuilt: State
    drift: Array
    gap: Array


#: The largest distance, in units of the tolerance, between y0 and the initial
#: pair that the backward pass rebuilt before the gradient is refused.
MAX_DRIFT = 1000.0

#: The largest gap ‖y - z‖ between the coupled states, in units of the
#: tolerance, before the solve is declared unstable. Where the scheme is
#: stable the gap stays about one local error (≲ 2 in these units on every
#: test problem); where its spurious mode grows it reaches 10³–10⁵ within a
#: few dozen steps, and y has missed its tolerance by orders of magnitude.
MAX_GAP = 100.0

#: Fixed steps have no tolerance to hold the gap to: it is measured
#: normwise in units of this relative tolerance (`GapScale`), so that a solve
#: is refused where y and z differ by more than 10% of their size (a spurious
#: mode that has blown up).
FIXED_STEP_GAP_RTOL = 1e-3


def gap_tolerances(config: SolverConfig) -> GapScale:
    """The units in which the gap of `config`'s solve is measured."""
    if config.adaptive:
        return GapScale(config.rtol, config.atol)
    return GapScale(FIXED_STEP_GAP_RTOL, config.atol, normwise=True)


def flag_unstable(ys: State, stats, m: int, tolerances: GapScale):
    """The outputs of y and the stats of a pair solve whose outputs `ys` hold
    (y..., z...): where the final gap exceeds `MAX_GAP` (and the solve had
    not failed otherwise) the result becomes `RESULTS.reversible_unstable`,
    `stats.drift` the gap, and every output NaN."""
    gap = lax.stop_gradient(_gap(_last(ys[:m]), _last(ys[m:]), tolerances))
    unstable = (stats.result == RESULTS.successful) & ~(gap <= MAX_GAP)
    result = jnp.where(unstable, RESULTS.reversible_unstable, stats.result)
    stats = stats._replace(result=result.astype(stats.result.dtype), drift=gap)
    nan = lambda x: jnp.where(unstable, jnp.nan, x).astype(x.dtype)
    return tuple(nan(leaf) for leaf in ys[:m]), stats


_ADVICE = (
    " Use adjoint=neuralode.CheckpointAdjoint() (the exact gradient of the "
    "plain discrete solve, in bounded memory), or a smaller coupling "
    "(ReversibleAdjoint(coupling=0.5)) for a contracting problem."
)
_DRIFT = (
    "neuralode: ReversibleAdjoint refused the gradient: running the reversible "
    "scheme backwards did not rebuild y0 (the rebuilt initial state is off by "
    f"more than {MAX_DRIFT:g} times the tolerance), so the gradient would be "
    "taken along the wrong trajectory. Rounding errors grow backwards where the "
    "forward flow contracts (by 1/|R(hμ)| per step) or is chaotic." + _ADVICE
)


_GAP = (
    "neuralode: ReversibleAdjoint refused the gradient: the reversible scheme's "
    "two coupled states drifted more than "
    f"{MAX_GAP:g} times the tolerance apart during the solve, so the solution "
    "it differentiates missed its tolerance. Its spurious mode grows by "
    "coupling/|R(hμ)| per step where a step contracts by more than the coupling "
    "(a contracting or stiff flow)." + _ADVICE
)


def _raise_lost(code: np.ndarray) -> np.ndarray:
    if np.any(code == 1):
        raise SolveError(_DRIFT)
    if np.any(code == 2):
        raise SolveError(_GAP)
    return np.zeros(np.shape(code), np.int32)


def _lost_check(code: Array) -> Array:
    """A zero to `tie` into the gradient, from a host check that raises
    `SolveError` when `code` is 1 (drift) or 2 (gap); run only then, as the
    solves' own checks."""
    shape = jax.ShapeDtypeStruct((), jnp.int32)
    call = lambda: jax.pure_callback(
        _raise_lost, shape, code, vmap_method="broadcast_all"
    )
    try:
        return lax.cond(code > 0, call, lambda: jnp.zeros((), jnp.int32))
    except jax.errors.JaxRuntimeError as error:
        # Evaluated eagerly the check runs on the spot: raise it as itself.
        found = solve_error_from(error)
        if found is None:
            raise
        raise found from None


def _refused_if_lost(config: SolverConfig, cotangents, result: ReversibleGradient):
    """The cotangents, or where the rebuilt initial pair drifted from y0 by
    more than `MAX_DRIFT` or the rebuilt pairs' gap exceeded `MAX_GAP`, a
    `SolveError` (with `config.throw`) or NaN."""
    drifted = ~(result.drift <= MAX_DRIFT)
    split = ~(result.gap <= MAX_GAP)
    code = jnp.where(drifted, 1, jnp.where(split, 2, 0)).astype(jnp.int32)
    if config.throw:
        return tie(cotangents, _lost_check(code))
    return jax.tree.map(lambda x: jnp.where(code > 0, jnp.nan, x), cotangents)


class ReversibleAdjoint(AbstractAdjoint):
    """Exact gradients at constant memory: the algebraically reversible version
    of the chosen explicit Runge–Kutta solver (McCallum & Foster 2024).

    The solve runs the reversible scheme of the module doc on the pair (y, z)
    with the chosen method as its base step: same order, adaptive steps with
    the base method's error estimate (of its step from z_n) or fixed steps,
    dense output at `ts` from the base step's interpolant. Each step costs two
    base steps (about twice the evaluations of the plain solve). The backward
    pass rebuilds every (y_n, z_n) from the last pair by the scheme's explicit
    inverse and back-propagates through each step and the outputs it covers:
    the gradient is the derivative of the computed solution, like
    `CheckpointAdjoint`'s (of a different discrete solve), to rounding.

    Memory does not grow with the number of steps: the forward pass keeps the
    outputs, the final pair, and each accepted step's end time (max_steps + 1
    scalars; step sizes are differences of them; the loop's step record also
    holds three start pairs, unused). The backward pass holds one pair and its
    adjoints. Step-size decisions are not differentiated.
    Gradients with respect to `ts` use the continuous formula of the other
    adjoints (∂L/∂t_i = ȳ_i·f(t_i, y_i), -a(t_0)·f(t_0, y_0) for t_0).

    Where it works: the scheme is linearly stable only where
    λ <= |R(hμ)| <= 1 (R the base method's stability function, μ an
    eigenvalue of ∂f/∂y): the pair map has determinant λ per mode, so where a
    step contracts by more than λ its spurious mode y - z grows by λ/|R(hμ)|
    per step, which the base method's error estimate does not see. Dynamics
    that neither contract nor expand much per step (oscillations,
    conservative and chaotic systems, the paper's use) suit it. On a
    contracting flow (h·μ below log λ ≈ -0.001 at the default) pick a smaller
    coupling (0.5 holds down to |R| = 0.5) or another adjoint. Both failure
    modes are caught, never returned as numbers:

    - the forward solve measures the final gap ‖y - z‖ (in units of the
      tolerance; with fixed steps relative to the state's norm, where only a
      gap above 10% is caught) and, above `MAX_GAP`, fails with
      `RESULTS.reversible_unstable` (`SolveError`, or NaN outputs with
      `throw=False`);
    - run backwards a contracting flow expands, so rounding errors in the
      rebuilt states grow by up to 1/|R(hμ)| (and 1/λ) per step; when the
      rebuilt y0 is off by more than `MAX_DRIFT` tolerances, or a rebuilt
      pair's gap exceeds `MAX_GAP`, the gradient is refused the same way.

    First derivatives only: gradients of gradients raise a `TypeError` (use
    `CheckpointAdjoint`), and, a `custom_vjp`, it blocks forward mode (use
    `ForwardMode()`). Implicit solvers are refused: the construction needs an
    explicit step.

    **Arguments:**

    - `coupling`: λ in (0, 1] (default 0.999, the paper's). A smaller λ
      widens the stable band λ <= |R(hμ)| (more contraction per step) and
      amplifies the reconstruction's rounding errors by up to 1/λ per step.

    Reference: S. McCallum and J. Foster, "Efficient, accurate and stable
    gradients for neural ODEs", arXiv:2410.11648 (2024).
    """

    coupling: float = eqx.field(default=0.999, static=True)

    def __check_init__(self):
        value = self.coupling
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"ReversibleAdjoint: coupling must be a float, got {value!r}"
            )
        if not 0 < value <= 1:
            raise ValueError(
                f"ReversibleAdjoint: coupling must be in (0, 1], got {value}"
            )

    def _config(self, config: SolverConfig, m: int) -> SolverConfig:
        """The solve of the pair: y's leaves alone in the error norm."""
        solver = config.solver
        if not isinstance(solver, AbstractExplicitRungeKutta):
            raise TypeError(
                "neuralode: ReversibleAdjoint needs an explicit Runge-Kutta solver "
                f"({_EXPLICIT}), got {type(solver).__name__}: the reversible "
                "scheme inverts each step explicitly, which an implicit method's "
                "nonlinear solves do not allow. For implicit solvers use "
                "adjoint=neuralode.CheckpointAdjoint() or neuralode.BacksolveAdjoint()."
            )
        groups = config.norm_groups or (tuple(range(m)),)
        return SolverConfig(
            ReversibleStep(solver, float(self.coupling), m),
            config.controller,
            config.rtol,
            config.atol,
            config.dt0,
            config.max_steps,
            groups,
            time_dependent=config.time_dependent,
            throw=config.throw,
            first_step_given=config.first_step_given,
        )

    def solve_pair(
        self,
        config: SolverConfig,
        problem: Any,
        params: PyTree,
        direction: Array,
        y0: State,
        tau: Array,
        h0: Array | None = None,
        record: bool = False,
    ):
        """The reversible solve of `problem` at the output times `tau`.

        **Returns:** the `LoopResult` of the pair (y..., z...): outputs of both,
        stats, and with `record` the accepted steps' times (its kept states,
        three pairs, are unused).
        """
        m = len(y0)
        pconfig = self._config(config, m)
        field = _pair_field(lambda t, y: problem.f_flat(t, y, params, direction), m)
        options = LoopOptions(record_steps=record, record_slots=2 if record else None)
        return integrate(pconfig, field, (*y0, *y0), tau, h0, options)

    def forward(self, config, problem, params, direction, y0, tau, h0=None):
        """The differentiated forward solve: `(ReversibleRecord, stats)`."""
        m = len(y0)
        ys, stats, record = self.solve_pair(
            config, problem, params, direction, y0, tau, h0, record=True
        )
        ys_y, stats = flag_unstable(ys, stats, m, gap_tolerances(config))
        assert record is not None  # record=True
        kept = ReversibleRecord(
            ys_y, _last(ys[:m]), _last(ys[m:]), record.times, record.count
        )
        return kept, stats

    def backward(
        self,
        config: SolverConfig,
        problem: Any,
        params: PyTree,
        direction: Array,
        tau: Array,
        y0: State,
        record: ReversibleRecord,
        ys_bar: State,
    ) -> ReversibleGradient:
        """Cotangents of the parameters, y0 and τ from those of the outputs, and
        the rebuilt initial pair with its diagnostics."""
        diff, fixed = eqx.partition(params, eqx.is_inexact_array)
        fixed_arrays, fixed_static = eqx.partition(fixed, eqx.is_array)
        real = jnp.real(ys_bar[0]).dtype
        n_out = tau.shape[0]
        times = lax.stop_gradient(record.times)
        count = lax.stop_gradient(record.count)
        origin = lax.stop_gradient(tau[0])
        stepper = _Stepper(
            problem,
            config.solver,
            float(self.coupling),
            gap_tolerances(config),
            lambda theta, arrays: eqx.combine(theta, arrays, fixed_static),
            fixed_arrays,
            direction,
            origin,
        )
        # Output i lies in step k_i: t_k < τ_i - τ_0 <= t_{k+1} (as the loop
        # placed it); k_i = -1 means τ_i = τ_0.
        valid = jnp.arange(times.shape[0], dtype=count.dtype) <= count
        since = lax.stop_gradient(tau - tau[0])
        k_out = (
            jnp.searchsorted(jnp.where(valid, times, jnp.inf), since).astype(jnp.int32)
            - 1
        )
        index = jnp.arange(n_out)
        before = (k_out < 0) & (index > 0) & (index < n_out - 1)
        y0_direct = tuple(
            jnp.sum(jnp.where(before[:, None], bar, 0), axis=0) for bar in ys_bar
        )
        outputs = None
        if n_out > 2:
            inner = slice(1, n_out - 1)
            steps = k_out[inner]
            k = jnp.maximum(steps, 0)
            start, end = times[k], times[k + 1]
            fractions = ((since[inner] - start) / (end - start)).astype(real)
            outputs = _Outputs(tuple(bar[inner] for bar in ys_bar), steps, fractions)
        seed = tuple(bar[-1] for bar in ys_bar)
        a_y, a_z, g, y0_rebuilt, z0_rebuilt, gap = _sweep(
            stepper, diff, record.y_end, record.z_end, seed, outputs, times, count
        )
        a_before = _add(_add(a_y, a_z), y0_direct)
        tau_bar = time_cotangents(
            problem, params, direction, tau, record.ys, ys_bar, a_before
        )
        y0_bar = tuple(a + bar[0] for a, bar in zip(a_before, ys_bar, strict=True))
        rtol, atol = config.rtol, config.atol
        off = lambda rebuilt: _weighted_rms(
            tuple(a - b for a, b in zip(rebuilt, y0, strict=True)), y0, rtol, atol
        )
        drift = lax.stop_gradient(jnp.maximum(off(y0_rebuilt), off(z0_rebuilt)))
        return ReversibleGradient(
            g, y0_bar, tau_bar, y0_rebuilt, z0_rebuilt, drift, gap
        )

    def loop(self, config, problem, params, y0, ts, h0=None):
        direction, tau = direction_and_tau(ts)
        params_arrays, params_static = eqx.partition(params, eqx.is_array)
        m = len(y0)
        self._config(config, m)  # refuse an implicit solver before tracing

        def primal(params_arrays, y0, tau, direction, h0):
            params = eqx.combine(params_arrays, params_static)
            ys, stats = self.solve_pair(
                config, problem, params, direction, y0, tau, h0
            )[:2]
            return flag_unstable(ys, stats, m, gap_tolerances(config))

        def forward(params_arrays, y0, tau, direction, h0):
            params = eqx.combine(params_arrays, params_static)
            return self.forward(config, problem, params, direction, y0, tau, h0)

        def backward(record, _, params_arrays, y0, tau, direction, cotangent):
            params = eqx.combine(params_arrays, params_static)
            ys_bar = instantiate(cotangent.ys)
            result = self.backward(
                config, problem, params, direction, tau, y0, record, ys_bar
            )
            cotangents = (result.params_bar, result.y0_bar, result.tau_bar)
            return _refused_if_lost(config, cotangents, result)

        def expand(record, tau, ys_bar):
            # A cotangent of the record: None is JAX's zero cotangent of the
            # parts nothing differentiates, which the fields' types do not admit.
            return ReversibleRecord(ys_bar, None, None, None, None)  # pyright: ignore[reportArgumentType]

        solve = custom_vjp_loop(
            forward,
            backward,
            primal,
            select=lambda record, tau: record.ys,
            expand=expand,
            check=forward_check(config),
        )
        h0 = first_step_argument(h0, tau)
        try:
            return solve(params_arrays, y0, tau, direction, h0)
        except TypeError as error:
            if "forward-mode autodiff" not in str(error):
                raise
            raise TypeError(_SECOND_ORDER) from None
