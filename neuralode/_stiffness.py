"""Stiffness diagnosis of a failed solve: h·ρ(∂f/∂y) at the point of failure."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from ._controller import rms_norm

_POWER_ITERATIONS = 16


def spectral_radius(f: Callable, t: Array, y: tuple[Array, ...]) -> Array:
    """Estimate the largest |eigenvalue| of ∂f/∂y at (t, y) by power iteration.

    Uses Jacobian–vector products only; a complex pair or a near-defective
    Jacobian makes the estimate oscillate within a small factor, enough to tell
    a stiff problem (h·ρ at the stability boundary, ~1.5–3.5 for explicit RK)
    from an accuracy-limited one (h·ρ ≪ 1).
    """
    jvp = lambda v: jax.jvp(lambda x: f(t, x), (y,), (v,))[1]
    real = jnp.real(y[0]).dtype
    tiny = jnp.finfo(real).tiny

    def normalise(v):
        scale = jnp.maximum(rms_norm(v), tiny)
        return tuple(leaf / scale.astype(leaf.dtype) for leaf in v)

    # A deterministic start with components in every direction.
    v = tuple(
        (1.0 + jnp.cos(1.7 * jnp.arange(leaf.size, dtype=real) + i)).astype(leaf.dtype)
        for i, leaf in enumerate(y)
    )

    def body(_, carry):
        v, _ = carry
        w = jvp(normalise(v))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in w]))
        v = tuple(jnp.where(finite, a, b) for a, b in zip(w, v, strict=True))
        return v, rms_norm(w)

    # One JVP call site (the last iteration's norm is the estimate): half the code.
    _, radius = lax.fori_loop(0, _POWER_ITERATIONS + 1, body, (v, jnp.zeros((), real)))
    return radius


def stiffness_at_failure(
    f: Callable, t: Array, y: tuple[Array, ...], h: Array, failed: Array
) -> Array:
    """h·ρ(∂f/∂y) where the solve failed, computed only when it did."""
    real = jnp.real(y[0]).dtype
    return lax.cond(
        failed,
        lambda: (jnp.abs(h).astype(real) * spectral_radius(f, t, y)).astype(real),
        lambda: jnp.zeros((), real),
    )
