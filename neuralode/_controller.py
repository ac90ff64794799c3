"""Adaptive step-size control: error norms, the PI controller, the first step."""

import abc
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax.numpy as jnp
from equinox import AbstractClassVar
from jaxtyping import Array, Bool, Float

from ._state import State


def _real_dtype(x: State):
    return jnp.real(x[0]).dtype


def squares(leaf: Array) -> Array:
    """|x|² elementwise, real."""
    return jnp.real(leaf * jnp.conj(leaf))


def rms_norm(x: State) -> Array:
    """Root-mean-square sqrt(mean(|x|²)) over every component of the state."""
    return norm_of_sums([jnp.sum(squares(leaf)) for leaf in x], [v.size for v in x])


def norm_of_sums(sums: list, sizes: list[int], groups=None) -> Array:
    """The RMS norm from each leaf's sum of squares `sums[i]` over its
    `sizes[i]` components; with `groups` (tuples of leaf indices), the maximum
    over the groups of their own RMS norms (leaves in no group may be None),
    so that one large group cannot dilute a small one. Empty groups are skipped.
    """
    if groups is None:
        groups = (tuple(range(len(sums))),)
    norms = []
    for group in groups:
        size = sum(sizes[i] for i in group)
        if size:
            total = sum(sums[i] for i in group if sizes[i])
            norms.append(jnp.sqrt(total / size))
    if not norms:
        return jnp.zeros((), jnp.result_type(*[x for x in sums if x is not None]))
    return norms[0] if len(norms) == 1 else jnp.max(jnp.stack(norms))


def error_scale(y0: State, y1: State, rtol, atol) -> State:
    """atol + rtol·max(|y0|, |y1|), the per-component weight of the error."""
    return tuple(
        atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))
        for a, b in zip(y0, y1, strict=True)
    )


def weighted(error: Array, scale: Array) -> Array:
    """error / scale, where a zero scale (atol = 0 on a zero component) weighs
    a zero error as 0 and any other as inf (no tolerance can be met there)."""
    zero = scale == 0
    ratio = error / jnp.where(zero, 1, scale)
    return jnp.where(zero, jnp.where(error == 0, 0, jnp.inf), ratio)


class StepOutcome(NamedTuple):
    """What a controller sees of a trial step from t to t + h.

    - `t`: the step's start; `h`: its size; `h_proposed`: the size asked for
      (h is shorter when the step was clipped to end at the last output time,
      `clipped`).
    - `err`: the weighted RMS error norm (NaN when there is no estimate).
    - `valid`: whether the step produced a usable result at all: finite values
      and stage times the time dtype resolves (an implicit method adds a
      converged iteration). An invalid step is never accepted.
    - `err_prev`: the error of the last accepted step; `rejected_last`: whether
      the previous attempt was rejected.
    - `exponent`: 1/q, q the order of the error estimate plus one.
    """

    t: Array
    h: Array
    h_proposed: Array
    clipped: Bool[Array, ""]
    err: Array
    valid: Bool[Array, ""]
    err_prev: Array
    rejected_last: Bool[Array, ""]
    exponent: float


class Decision(NamedTuple):
    """A controller's verdict: keep the step or not, and the next step size."""

    accept: Bool[Array, ""]
    h_next: Array


class AbstractController(eqx.Module):
    """Decides whether a trial step is kept and how large the next one is.

    The solver loop calls `adapt` after every trial step and never asks which
    controller it has; any reason to reject a step (error, non-finite values,
    unresolved stage times, and for implicit methods a diverging iteration)
    reaches the controller through `StepOutcome`.
    """

    adaptive: AbstractClassVar[bool]

    @abc.abstractmethod
    def adapt(self, outcome: StepOutcome) -> Decision:
        """The decision on one trial step."""


def below(t: Array, t_new: Array) -> Array:
    """The largest step from t that ends strictly before t_new (0 if t_new is
    the next representable time after t)."""
    return jnp.nextafter(t_new, t) - t


class PIController(AbstractController):
    """Proportional–integral step-size controller (Hairer & Wanner's DOPRI5).

    After a step with weighted error ``err`` (accept when ``err <= 1``) the next
    step is ``h · clip(safety · err^(-α) · err_prev^β, min_factor, max_factor)``
    with ``α = 1/q - 0.75 β`` and q the order of the error estimate plus one.
    ``β = 0`` is the classical I controller. After a rejection the step never
    grows, and the step accepted right after a rejection does not grow either.

    **Arguments:**

    - `safety`: safety factor (0.9).
    - `beta`: the integral gain β (0.04, Hairer's default for DOPRI5).
    - `min_factor`, `max_factor`: bounds on the step-size ratio (0.2, 10).

    References: Hairer, Nørsett & Wanner, "Solving ODEs I", II.4; Gustafsson
    (1991), "Control theoretic techniques for stepsize selection".
    """

    safety: float = 0.9
    beta: float = 0.04
    min_factor: float = 0.2
    max_factor: float = 10.0
    adaptive: ClassVar[bool] = True

    def __check_init__(self):
        if not 0 < self.safety <= 1:
            raise ValueError(
                f"PIController: safety must be in (0, 1], got {self.safety}"
            )
        if not 0 < self.min_factor < 1 < self.max_factor:
            raise ValueError(
                "PIController: need 0 < min_factor < 1 < max_factor, got "
                f"min_factor={self.min_factor}, max_factor={self.max_factor}"
            )
        if self.beta < 0:
            raise ValueError(f"PIController: beta must be >= 0, got {self.beta}")

    def factor(
        self,
        err: Float[Array, ""],
        err_prev: Float[Array, ""],
        accept: Array,
        exponent: float,
    ) -> Float[Array, ""]:
        """The ratio new/old step size; `exponent` is 1/q."""
        alpha = exponent - 0.75 * self.beta
        safe_err = jnp.maximum(err, 1e-10)
        proportional = self.safety * safe_err ** (-alpha)
        on_accept = proportional * err_prev**self.beta
        on_accept = jnp.clip(on_accept, self.min_factor, self.max_factor)
        on_reject = jnp.clip(proportional, self.min_factor, 1.0)
        factor = jnp.where(accept, on_accept, on_reject)
        # A non-finite error (NaN/inf in the trial step) shrinks the step hard.
        return jnp.where(jnp.isfinite(err), factor, self.min_factor)

    def adapt(self, outcome: StepOutcome) -> Decision:
        """Accept when valid and err <= 1; scale h by `factor`.

        A step clipped to end at the last output time keeps the earlier
        proposal unless its error grew; after a rejection the next step is
        strictly shorter in the time dtype (a shrink that rounding would undo
        becomes one representable time less), so retries always progress.
        """
        o = outcome
        accept = o.valid & (o.err <= 1.0)
        err = jnp.where(o.valid, o.err, jnp.nan)
        factor = self.factor(err, o.err_prev, accept, o.exponent).astype(o.h.dtype)
        h_next = o.h * factor
        h_next = jnp.where(
            accept & o.clipped,
            jnp.maximum(h_next, o.h_proposed * jnp.minimum(factor, 1)),
            h_next,
        )
        h_next = jnp.where(accept & o.rejected_last, jnp.minimum(h_next, o.h), h_next)
        shorter = jnp.minimum(h_next, below(o.t, o.t + o.h))
        return Decision(accept, jnp.where(accept, h_next, shorter))


class ConstantStepSize(AbstractController):
    """Take every step with the size `dt0`, as a fixed-step method would.

    With an embedded pair the error estimate is ignored; a step with NaN/inf is
    still a failure (`RESULTS.nonfinite`). Use it for convergence studies or to
    match a fixed time grid. Requires `dt0`.
    """

    adaptive: ClassVar[bool] = False

    def adapt(self, outcome: StepOutcome) -> Decision:
        """Accept every valid step; the next is the proposed size again."""
        return Decision(outcome.valid, outcome.h_proposed)


def _first_guess(y0: State, f0: State, rtol, atol, norm_groups) -> tuple[Array, Array]:
    """Hairer's first guess h0 = 0.01 d0/d1 (1e-6 when d0 or d1 is below 1e-5),
    with d0 = ‖y0‖ and d1 = ‖f0‖ in the error norm (one reduction per leaf).

    **Returns:** `(h0, d1)`.
    """
    scale = tuple(atol + rtol * jnp.abs(leaf) for leaf in y0)
    sizes = [leaf.size for leaf in y0]
    real = _real_dtype(y0)
    sums = [
        jnp.sum(jnp.stack([squares(y / s), squares(k / s)]).astype(real), axis=-1)
        for y, k, s in zip(y0, f0, scale, strict=True)
    ]
    d0 = norm_of_sums([x[0] for x in sums], sizes, norm_groups)
    d1 = norm_of_sums([x[1] for x in sums], sizes, norm_groups)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    return jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1.0, d1)), d1


def step_bound(
    t0: Array,
    y0: State,
    f0: State,
    t_span: Array,
    rtol,
    atol,
    exponent: float,
    norm_groups: tuple[tuple[int, ...], ...] | None = None,
) -> Array:
    """Hairer's first-step bound without its extra evaluation: min(100 h0,
    (0.01/d1)^(1/q), t_span) with h0 = 0.01 d0/d1 (see `initial_step`), i.e.
    with d2 ≤ d1 assumed. Caps a first step taken from elsewhere (a backward
    solve starts from the forward's last step) at what the field allows."""
    h0, d1 = _first_guess(y0, f0, rtol, atol, norm_groups)
    h1 = (0.01 / jnp.maximum(d1, 1e-15)) ** exponent
    return jnp.minimum(jnp.minimum(100 * h0, h1), t_span).astype(t0.dtype)


def initial_step(
    f: Callable[[Array, State], State],
    t0: Array,
    y0: State,
    f0: State,
    t_span: Array,
    rtol,
    atol,
    exponent: float,
    norm_groups: tuple[tuple[int, ...], ...] | None = None,
) -> Array:
    """Hairer's automatic first step (Solving ODEs I, II.4), one extra f call.

    d0 = ‖y0‖, d1 = ‖f0‖ (weighted norms), h0 = 0.01 d0/d1, then an Euler step
    of size h0 estimates the second derivative d2 = ‖f(t0+h0, y0+h0 f0) - f0‖/h0
    and h1 = (0.01 / max(d1, d2))^(1/q). The first step is min(100 h0, h1, t_span).
    The norms are RMS norms, or grouped by `norm_groups` (see `norm_of_sums`).
    """
    scale = tuple(atol + rtol * jnp.abs(leaf) for leaf in y0)
    sizes = [leaf.size for leaf in y0]
    real = _real_dtype(y0)
    h0, d1 = _first_guess(y0, f0, rtol, atol, norm_groups)
    h0 = jnp.minimum(h0, t_span)
    h0_y = h0.astype(real)
    f1 = f(t0 + h0, tuple(y + h0_y * k for y, k in zip(y0, f0, strict=True)))
    diff_sums = [
        jnp.sum(squares((a - b) / s).astype(real))
        for a, b, s in zip(f1, f0, scale, strict=True)
    ]
    d2 = norm_of_sums(diff_sums, sizes, norm_groups) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(
        dmax <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.where(dmax <= 1e-15, 1.0, dmax)) ** exponent,
    )
    return jnp.minimum(jnp.minimum(100 * h0, h1), t_span).astype(t0.dtype)
