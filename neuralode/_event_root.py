"""Where an event happens inside a step: the zero crossing of
g(θ) = cond(t0 + θh, y(t0 + θh)) on the step's dense output, θ ∈ [0, 1].

The root is bracketed (g changes sign between θ = 0 and θ = 1) and found by
a safeguarded iteration: each round takes a regula-falsi point with the
Illinois modification (the retained end's value is halved when the same end
is kept twice, so the bracket's both ends move; Dowell & Jarratt 1971), then
a Newton step from it on the polynomial when that step stays inside the
bracket. Newton converges quadratically near a simple root, Illinois
superlinearly from anywhere in the bracket, and the bracket never grows.

The root is differentiated by the implicit function theorem, not through
the iterations (`lax.custom_root`): with g(θ*; p) = 0,

    dθ*/dp = -(∂g/∂p) / (∂g/∂θ),

so derivatives with respect to anything g closes over (the interpolation
coefficients, the step's start and size, the parameters of `cond`) are those
of the exact root.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

#: Rounds of the bracketing iteration at most; each halves the bracket at
#: least as fast as bisection once Illinois engages, so 64 rounds resolve a
#: float64 θ on [0, 1] to its last bit.
MAX_ROUNDS = 64


class _Bracket(NamedTuple):
    lo: Array
    hi: Array
    g_lo: Array
    g_hi: Array
    # -1: the low end was kept last round, +1: the high end, 0: neither.
    kept: Array
    rounds: Array
    # Set when a Newton step moved less than the tolerance: its point is the
    # root (quadratic convergence puts it far closer than the step).
    converged: Array
    root: Array


def _regula_falsi(b: _Bracket) -> Array:
    """The secant point of the bracket, clipped into its interior."""
    denom = b.g_hi - b.g_lo
    safe = jnp.where(denom != 0, denom, 1)
    point = b.hi - b.g_hi * (b.hi - b.lo) / safe
    inside = (denom != 0) & (point > b.lo) & (point < b.hi)
    return jnp.where(inside, point, 0.5 * (b.lo + b.hi))


def _shrink(b: _Bracket, x: Array, gx: Array) -> _Bracket:
    """Replace the end of the bracket on x's side by x (Illinois-weighted)."""
    to_low = jnp.sign(gx) == jnp.sign(b.g_lo)
    # The end that stays; halve its value if it stayed last round too.
    halve_hi = to_low & (b.kept == 1)
    halve_lo = ~to_low & (b.kept == -1)
    return _Bracket(
        lo=jnp.where(to_low, x, b.lo),
        hi=jnp.where(to_low, b.hi, x),
        g_lo=jnp.where(to_low, gx, jnp.where(halve_lo, 0.5 * b.g_lo, b.g_lo)),
        g_hi=jnp.where(to_low, jnp.where(halve_hi, 0.5 * b.g_hi, b.g_hi), gx),
        kept=jnp.where(to_low, 1, -1).astype(b.kept.dtype),
        rounds=b.rounds,
        converged=b.converged,
        root=b.root,
    )


def bracketed_root(
    g: Callable[[Array], Array], tol: Array, dtype
) -> tuple[Float[Array, ""], Array]:
    """The zero crossing of g on [0, 1] and the rounds it took (not differentiable).

    `g` must change sign between 0 and 1 (or vanish at 1); otherwise the
    result is NaN. Stops when the bracket is narrower than `tol`, g is
    exactly zero, or a Newton correction is below `tol` (its point is then
    the root: a bracket need not close from both sides).
    Returns that point, else the end of the final bracket where |g| is smaller.
    """
    zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
    g0, g1 = g(zero), g(one)
    valid = (jnp.sign(g0) * jnp.sign(g1) <= 0) & jnp.isfinite(g0) & jnp.isfinite(g1)
    none = jnp.zeros((), jnp.int32)
    init = _Bracket(zero, one, g0, g1, none, none, jnp.zeros((), bool), zero)

    def running(b: _Bracket) -> Array:
        return (
            valid
            & (b.hi - b.lo > tol)
            & (b.g_lo != 0)
            & (b.g_hi != 0)
            & (b.rounds < MAX_ROUNDS)
            & ~b.converged
        )

    def round_(b: _Bracket) -> _Bracket:
        x = _regula_falsi(b)
        gx, slope = jax.jvp(g, (x,), (jnp.ones_like(x),))
        b = _shrink(b, x, gx)
        # A Newton step from x, taken only if it lands inside the new bracket.
        newton = x - gx / jnp.where(slope != 0, slope, 1)
        usable = (slope != 0) & (gx != 0) & (newton > b.lo) & (newton < b.hi)
        newton = jnp.where(usable, newton, x)
        g_newton = g(newton)
        stepped = _shrink(b, newton, g_newton)
        b = jax.tree.map(lambda new, old: jnp.where(usable, new, old), stepped, b)
        # Converged where Newton's correction from x is below tol: x is the
        # root to within tol (quadratically less), even where the corrected
        # point falls on or just outside an end of the bracket that x has
        # become. Or where the Newton point's own value, over the bracket's
        # secant slope, is below tol: it sits on the root to rounding while
        # the bracket's far end stays put (a stored end value is at most
        # halved by Illinois, which only makes this test stricter).
        correction = jnp.abs(gx) / jnp.where(slope != 0, jnp.abs(slope), 1)
        width = b.hi - b.lo
        rise = jnp.abs(b.g_hi - b.g_lo)
        at_newton = usable & (jnp.abs(g_newton) * width < tol * rise)
        converged = ((slope != 0) & (correction < tol)) | at_newton
        root = jnp.clip(jnp.where(usable, newton, x), b.lo, b.hi)
        return b._replace(
            rounds=b.rounds + 1,
            converged=converged,
            root=jnp.where(converged, root, b.root),
        )

    final = lax.while_loop(running, round_, init)
    theta = jnp.where(jnp.abs(final.g_lo) <= jnp.abs(final.g_hi), final.lo, final.hi)
    theta = jnp.where(final.converged, final.root, theta)
    return jnp.where(valid, theta, jnp.nan), final.rounds


def crossing_fraction(g: Callable[[Array], Array], tol: Array, dtype) -> Array:
    """θ* ∈ [0, 1] with g(θ*) = 0, differentiable implicitly (see module doc).

    `g` must change sign on [0, 1] (NaN otherwise); `tol` is the width in θ
    at which the bracket counts as converged (a few units in the last place
    of the event time, divided by the step size, for a time to a few ULPs).
    """
    tol = lax.stop_gradient(jnp.asarray(tol, dtype))

    def solve(f, _):
        return bracketed_root(f, tol, dtype)[0]

    def tangent_solve(linear, rhs):
        return rhs / linear(jnp.ones_like(rhs))

    guess = jnp.full((), 0.5, dtype)
    return lax.custom_root(g, guess, solve, tangent_solve)
