"""Dense output: the polynomial that a Runge–Kutta step leaves behind.

Every interpolant here is y(t0 + θh) = y0 + Σ_p θ^(p+1) C_p, with coefficient
vectors C_p computed once per step from the stages. Evaluating it at an output
time is then a Horner loop over a handful of vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def polynomial_coefficients(
    dense: np.ndarray, stages: Sequence[Array], h: Array
) -> Float[Array, "degree n"]:
    """C_p = h Σ_i dense[i, p] k_i for a tableau's continuous extension."""
    coeffs = []
    for p in range(dense.shape[1]):
        terms = [float(w) * k for w, k in zip(dense[:, p], stages, strict=True) if w]
        coeffs.append(h * sum(terms[1:], terms[0]))
    return jnp.stack(coeffs)


def hermite_coefficients(
    y0: Array, y1: Array, f0: Array, f1: Array, h: Array
) -> Float[Array, "3 n"]:
    """Cubic Hermite interpolation through (y0, f0) and (y1, f1).

    y(θ) = y0 + θ h f0 + θ²(3Δ - 2h f0 - h f1) + θ³(h f0 + h f1 - 2Δ), Δ = y1 - y0.
    """
    delta = y1 - y0
    hf0 = h * f0
    hf1 = h * f1
    return jnp.stack([hf0, 3 * delta - 2 * hf0 - hf1, hf0 + hf1 - 2 * delta])


def linear_coefficients(y0: Array, y1: Array) -> Float[Array, "1 n"]:
    """Linear interpolation, y(θ) = y0 + θ(y1 - y0)."""
    return (y1 - y0)[None]


def evaluate(y0: Array, coeffs: Array, theta: Array) -> Array:
    """y0 + Σ_p θ^(p+1) coeffs[p], by Horner's rule."""
    acc = coeffs[-1]
    for p in range(coeffs.shape[0] - 2, -1, -1):
        acc = coeffs[p] + theta * acc
    return y0 + theta * acc
