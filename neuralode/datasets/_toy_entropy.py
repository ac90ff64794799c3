"""Entropies of every 2-D toy density, by numerical integration with an error bar.

[`toy_2d_entropy`][] covers the densities with a closed form (8gaussians,
checkerboard, circles, rings). The other three are pushforwards of simple
distributions through smooth maps, and their densities are one-dimensional
integrals, computed here by quadrature:

- `"moons"`: a uniform angle on either half circle, scaled by 2 and blurred by
  N(0, 0.2²I): p(x) = ½ Σ_moon (1/π) ∫₀^π N(x; μ_moon(φ), 0.2²I) dφ.
- `"2spirals"`: the arc point a(s)/3 plus a uniform offset on [0, 1/6)²
  plus N(0, 0.1²I), s = 3π√u: the offset and the noise convolve into a product
  of differences of normal CDFs, integrated over s with density 2s/(3π)²;
  the second spiral is the reflection x ↦ -x.
- `"pinwheel"`: f ~ N((1, 0), diag(0.3², 0.1²)) rotated clockwise by
  θ_k(f₀) = 2πk/5 + ¼ e^{f₀} and scaled by 2. In polar coordinates
  f = ρ(cos α, sin α), x has radius 2ρ and angle β = α - θ_k(ρ cos α), so
  p(x) = (1/5) Σ_k Σ_{α: β(α) = ∠x} p_f(f(α)) / (4 |1 + ¼ e^{f₀} f₁|), the
  roots α found on a fine grid of angles.

The entropy $H = -\\int p \\log p$ is then a midpoint sum over a square grid.
The error bar is the difference from the same computation at half the
resolution (grid spacing and inner quadrature both doubled), which for these
second-order rules is about three times the error of the finer result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfc
from jaxtyping import Array, Float

from ._toy import TOY_2D_NAMES, toy_2d_entropy

_MOONS_STD = 0.2  # 0.1 before the scaling by 2
_SPIRALS_STD = 0.1
_SPIRALS_BOX = 1 / 6  # U[0, 0.5) offsets divided by 3
_PINWHEEL_RADIAL, _PINWHEEL_TANGENTIAL = 0.3, 0.1


class Entropy(NamedTuple):
    """An entropy in nats, with an error bar (0 for a closed form)."""

    value: float
    error: float
    method: str


def _normal_pdf(x, std):
    return jnp.exp(-0.5 * (x / std) ** 2) / (math.sqrt(2 * math.pi) * std)


def _moons_density(x: Float[Array, "n 2"], num: int) -> Float[Array, " n"]:
    phi = (jnp.arange(num, dtype=x.dtype) + 0.5) * (math.pi / num)
    c, s = jnp.cos(phi), jnp.sin(phi)
    shift = jnp.asarray([-1.0, -0.2], x.dtype)
    upper = jnp.stack([c, s], -1)
    lower = jnp.stack([1.0 - c, 0.5 - s], -1)
    centres = 2.0 * jnp.concatenate([upper, lower]) + shift  # (2 num, 2)
    sq = jnp.sum((x[:, None, :] - centres) ** 2, axis=-1)
    var = _MOONS_STD**2
    return jnp.mean(jnp.exp(-0.5 * sq / var), axis=1) / (2 * math.pi * var)


def _box_blur(x, lo, width, std):
    """Density at x of U[lo, lo + width) + N(0, std²): a difference of CDFs."""
    a, b = (x - lo) / std, (x - lo - width) / std
    # Φ(a) - Φ(b) without cancellation on either side.
    upper = 0.5 * (erfc(b / math.sqrt(2)) - erfc(a / math.sqrt(2)))
    lower = 0.5 * (erfc(-a / math.sqrt(2)) - erfc(-b / math.sqrt(2)))
    return jnp.where(b > 0, upper, lower) / width


def _spirals_density(x: Float[Array, "n 2"], num: int) -> Float[Array, " n"]:
    top = 3 * math.pi
    s = (jnp.arange(num, dtype=x.dtype) + 0.5) * (top / num)
    weight = 2 * s / top**2 * (top / num)  # density of s times ds
    arc = jnp.stack([-jnp.cos(s) * s, jnp.sin(s) * s], -1) / 3  # (num, 2)

    def one_spiral(x):
        blur = _box_blur(x[:, None, :], arc, _SPIRALS_BOX, _SPIRALS_STD)
        return jnp.sum(weight * blur[..., 0] * blur[..., 1], axis=1)

    return 0.5 * (one_spiral(x) + one_spiral(-x))


def _pinwheel_density(x: Float[Array, "n 2"], num: int) -> Float[Array, " n"]:
    rho = 0.5 * jnp.sqrt(jnp.sum(x**2, axis=-1))[:, None]  # (n, 1)
    beta = jnp.arctan2(x[:, 1], x[:, 0])[:, None]
    alpha = -math.pi + (2 * math.pi / num) * jnp.arange(num + 1, dtype=x.dtype)
    total = jnp.zeros(x.shape[0], x.dtype)
    for k in range(5):
        shift = 2 * math.pi * k / 5
        h = alpha - 0.25 * jnp.exp(rho * jnp.cos(alpha)) - shift - beta
        h = jnp.mod(h + math.pi, 2 * math.pi) - math.pi  # wrapped into [-π, π)
        h0, h1 = h[:, :-1], h[:, 1:]
        # A root between two angles: a sign change that is not a wrap-around.
        root = (h0 * h1 <= 0) & (jnp.abs(h1 - h0) < math.pi) & (h0 != h1)
        frac = jnp.where(root, h0 / jnp.where(root, h0 - h1, 1.0), 0.0)
        a = alpha[:-1] + frac * (2 * math.pi / num)
        f0, f1 = rho * jnp.cos(a), rho * jnp.sin(a)
        pf = _normal_pdf(f0 - 1.0, _PINWHEEL_RADIAL) * _normal_pdf(
            f1, _PINWHEEL_TANGENTIAL
        )
        jac = 4 * jnp.abs(1 + 0.25 * jnp.exp(f0) * f1)
        total = total + jnp.sum(jnp.where(root, pf / jac, 0.0), axis=1)
    return total / 5


# name: (density(x, inner points), half-width L of the square, grid spacing h,
# inner quadrature points); h is 1/6 of the narrowest blur, L leaves >= 6
# standard deviations of margin.
_NUMERICAL: dict[str, tuple[Callable, float, float, int]] = {
    "moons": (_moons_density, 4.6, _MOONS_STD / 6, 1024),
    "2spirals": (_spirals_density, 4.2, _SPIRALS_STD / 6, 2048),
    "pinwheel": (_pinwheel_density, 6.0, 2 * _PINWHEEL_TANGENTIAL / 6, 1024),
}


def toy_2d_density_numerical(
    name: str, x: Float[Array, "n 2"], *, num: int | None = None
) -> Float[Array, " n"]:
    """The density p(x) of `"moons"`, `"2spirals"` or `"pinwheel"` by quadrature.

    **Arguments:**

    - `name`: one of the three.
    - `x`: points of shape (n, 2).
    - `num`: points of the inner quadrature (default: that of the entropy).

    **Returns:**

    p(x), shape (n,).

    **Raises:**

    `ValueError` for another name.
    """
    if name not in _NUMERICAL:
        raise ValueError(
            f"No numerical density for {name!r}; available: {', '.join(_NUMERICAL)}."
        )
    density, _, _, default = _NUMERICAL[name]
    return _density_jit(density, jnp.asarray(x), num or default)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _density_jit(density, x, num):
    return density(x, num)


def _entropy_on_grid(name: str, refine: int) -> tuple[float, float]:
    """(-∫ p log p, ∫ p) on the grid refined by `refine` (1 or 2)."""
    density, half_width, h, num = _NUMERICAL[name]
    h = h * 2 / refine
    n = int(math.ceil(half_width / h))
    axis = h * (np.arange(-n, n) + 0.5)
    ys, xs = np.meshgrid(axis, axis, indexing="ij")
    points = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)
    inner = num * refine // 2
    total_h = total_p = 0.0
    chunk = max(256, 2**22 // inner)
    for i in range(0, len(points), chunk):
        p = np.asarray(_density_jit(density, jnp.asarray(points[i : i + chunk]), inner))
        p = p.astype(np.float64)
        logp = np.log(np.where(p > 0, p, 1.0))
        total_h -= float(np.sum(p * logp))
        total_p += float(np.sum(p))
    return total_h * h * h, total_p * h * h


@functools.cache
def toy_2d_entropy_with_error(name: str) -> Entropy:
    """The differential entropy of any `toy_2d` density, with its error bar.

    Closed forms ([`toy_2d_entropy`][]) for 8gaussians, checkerboard, circles
    and rings (error bar 0: their quadrature error is below 1e-4 nats);
    quadrature of the densities above for moons, 2spirals and pinwheel. Takes
    up to a minute or so on a CPU for those; cached.

    **Returns:**

    An [`Entropy`][] `(value, error, method)` in nats.

    **Raises:**

    `ValueError` for an unknown name.
    """
    if name not in TOY_2D_NAMES:
        raise ValueError(
            f"Unknown toy dataset {name!r}; valid names are {', '.join(TOY_2D_NAMES)}."
        )
    if name not in _NUMERICAL:
        return Entropy(toy_2d_entropy(name), 0.0, "closed form")
    fine, mass = _entropy_on_grid(name, 2)
    coarse, _ = _entropy_on_grid(name, 1)
    if abs(mass - 1) > 1e-3:
        raise RuntimeError(
            f"the quadrature of the {name} density integrates to {mass}, not 1"
        )
    return Entropy(fine, abs(fine - coarse), "quadrature")
