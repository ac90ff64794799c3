"""Stiffness diagnosis of a failed solve: h·ρ(∂f/∂y) at the point of failure."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from ._controller import rms_norm

_POWER_ITERATIONS = 16


def spectral_radius(f: Callable[[Array, Array], Array], t: Array, y: Array) -> Array:
    """Estimate the largest |eigenvalue| of ∂f/∂y at (t, y) by power iteration.

    Uses Jacobian–vector products only; a complex pair or a near-defective
    Jacobian makes the estimate oscillate within a small factor, enough to tell
    a stiff problem (h·ρ at the stability boundary, ~1.5–3.5 for explicit RK)
    from an accuracy-limited one (h·ρ ≪ 1).
    """
    jvp = lambda v: jax.jvp(lambda x: f(t, x), (y,), (v,))[1]
    n = y.shape[0]
    # A deterministic start with components in every direction.
    v = (1.0 + jnp.cos(1.7 * jnp.arange(n, dtype=jnp.real(y).dtype))).astype(y.dtype)

    def body(_, v):
        w = jvp(v / jnp.maximum(rms_norm(v), jnp.finfo(jnp.real(v).dtype).tiny))
        return jnp.where(jnp.all(jnp.isfinite(w)), w, v)

    v = lax.fori_loop(0, _POWER_ITERATIONS, body, v)
    v = v / jnp.maximum(rms_norm(v), jnp.finfo(jnp.real(v).dtype).tiny)
    return rms_norm(jvp(v))


def stiffness_at_failure(
    f: Callable[[Array, Array], Array], t: Array, y: Array, h: Array, failed: Array
) -> Array:
    """h·ρ(∂f/∂y) where the solve failed, computed only when it did."""
    real = jnp.real(y).dtype
    return lax.cond(
        failed,
        lambda: (jnp.abs(h).astype(real) * spectral_radius(f, t, y)).astype(real),
        lambda: jnp.zeros((), real),
    )
