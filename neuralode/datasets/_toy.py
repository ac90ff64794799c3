"""Two-dimensional toy distributions for density estimation.

These are the 2-D benchmarks of FFJORD (Grathwohl et al., 2019), generated here
with `jax.random` only. Every sample is drawn i.i.d. from a stated density: where
the FFJORD generator splits a batch deterministically between mixture components
(e.g. exactly half the points on each circle), each point here picks its
component at random, so that the closed-form densities below are exact for the
samples.

**References:**

- Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. "FFJORD: Free-form
  Continuous Dynamics for Scalable Reversible Generative Models." ICLR 2019.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import i0e, logsumexp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

TOY_2D_NAMES: tuple[str, ...] = (
    "8gaussians",
    "pinwheel",
    "2spirals",
    "checkerboard",
    "moons",
    "circles",
    "rings",
)
"""Names accepted by [`toy_2d`][]."""

_SQRT2 = math.sqrt(2.0)

# 8gaussians: centres R (cos kπ/4, sin kπ/4), std σ. FFJORD draws 4·u + 0.5·ε
# and divides by 1.414; we divide by exactly √2.
_G8_RADIUS = 4.0 / _SQRT2
_G8_STD = 0.5 / _SQRT2
_G8_CENTRES = _G8_RADIUS * np.stack(
    [np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=-1
)

# circles: radii 3 and 1.5, noise std 0.08 · 3 (sklearn's make_circles with
# factor 0.5 and noise 0.08, scaled by 3).
_CIRCLES_RADII = (3.0, 1.5)
_CIRCLES_STD = 0.24

# rings: radii 3, 2.25, 1.5, 0.75, noise std 0.08 added after scaling.
_RINGS_RADII = (3.0, 2.25, 1.5, 0.75)
_RINGS_STD = 0.08

# checkerboard: uniform on 8 of the 16 squares of side 2 tiling [-4, 4)².
_CHECKERBOARD_LOG_DENSITY = -math.log(32.0)


# --------------------------------------------------------------------- samplers


# Each sampler makes a single call to `jax.random.uniform` for all its randomness
# (Gaussians by Box–Muller): every threefry call site costs ~0.3 s of XLA compile
# time on CPU, and a sampler is compiled for each (name, num, dtype).


def _uniforms(key, rows, num, dtype):
    """A (rows, num) array of i.i.d. U[0, 1) variates, one row per use."""
    return jax.random.uniform(key, (rows, num), dtype)


def _categorical(u, k: int):
    """A uniform index in 0..k-1 from a U[0, 1) variate."""
    return jnp.minimum(jnp.floor(k * u).astype(jnp.int32), k - 1)


def _gaussian_pair(u1, u2):
    """Box–Muller: two independent U[0, 1) arrays -> an (..., 2) array of N(0, I)."""
    r = jnp.sqrt(-2.0 * jnp.log1p(-u1))
    theta = 2 * jnp.pi * u2
    return jnp.stack([r * jnp.cos(theta), r * jnp.sin(theta)], axis=-1)


def _sample_8gaussians(key, num, dtype):
    u = _uniforms(key, 3, num, dtype)
    centres = jnp.asarray(_G8_CENTRES, dtype=dtype)[_categorical(u[0], 8)]
    return centres + _G8_STD * _gaussian_pair(u[1], u[2])


def _sample_pinwheel(key, num, dtype):
    # Five arms; a point is a Gaussian (radial std 0.3 around 1, tangential std
    # 0.1) rotated clockwise by its arm's angle plus 0.25·exp(radial coordinate),
    # then scaled by 2.
    u = _uniforms(key, 3, num, dtype)
    arm = _categorical(u[0], 5)
    eps = _gaussian_pair(u[1], u[2])
    f0 = 1.0 + 0.3 * eps[:, 0]
    f1 = 0.1 * eps[:, 1]
    angle = 2 * jnp.pi * arm.astype(dtype) / 5 + 0.25 * jnp.exp(f0)
    c, s = jnp.cos(angle), jnp.sin(angle)
    return 2.0 * jnp.stack([f0 * c + f1 * s, f1 * c - f0 * s], axis=-1)


def _sample_2spirals(key, num, dtype):
    # Arc parameter s = 3π √u, point (-s cos s, s sin s) plus a U[0, 0.5)² offset,
    # reflected through the origin for the second spiral, divided by 3, plus
    # N(0, 0.1²I) noise.
    u = _uniforms(key, 6, num, dtype)
    s = 3 * jnp.pi * jnp.sqrt(u[0])
    offset = 0.5 * jnp.stack([u[1], u[2]], axis=-1)
    arm = jnp.stack([-jnp.cos(s) * s, jnp.sin(s) * s], axis=-1) + offset
    sign = jnp.where(u[3] < 0.5, 1.0, -1.0).astype(dtype)[:, None]
    return sign * arm / 3 + 0.1 * _gaussian_pair(u[4], u[5])


def _sample_checkerboard(key, num, dtype):
    # u1 ~ U[-2, 2); u2 ~ U[0, 1) or U[-2, -1), shifted up by 1 in odd columns.
    u = _uniforms(key, 3, num, dtype)
    u1 = 4.0 * u[0] - 2.0
    row = u[1] - jnp.where(u[2] < 0.5, 2.0, 0.0).astype(dtype)
    u2 = row + jnp.mod(jnp.floor(u1), 2.0)
    return 2.0 * jnp.stack([u1, u2], axis=-1)


def _sample_moons(key, num, dtype):
    u = _uniforms(key, 4, num, dtype)
    lower = u[0] < 0.5
    phi = jnp.pi * u[1]
    c, s = jnp.cos(phi), jnp.sin(phi)
    x = jnp.where(lower, 1.0 - c, c)
    y = jnp.where(lower, 0.5 - s, s)
    pts = jnp.stack([x, y], axis=-1) + 0.1 * _gaussian_pair(u[2], u[3])
    return 2.0 * pts + jnp.asarray([-1.0, -0.2], dtype)


def _sample_rings_mixture(key, num, dtype, radii, std):
    u = _uniforms(key, 4, num, dtype)
    r = jnp.asarray(radii, dtype)[_categorical(u[0], len(radii))]
    phi = 2 * jnp.pi * u[1]
    pts = r[:, None] * jnp.stack([jnp.cos(phi), jnp.sin(phi)], axis=-1)
    return pts + std * _gaussian_pair(u[2], u[3])


_SAMPLERS: dict[str, Callable] = {
    "8gaussians": _sample_8gaussians,
    "pinwheel": _sample_pinwheel,
    "2spirals": _sample_2spirals,
    "checkerboard": _sample_checkerboard,
    "moons": _sample_moons,
    "circles": functools.partial(
        _sample_rings_mixture, radii=_CIRCLES_RADII, std=_CIRCLES_STD
    ),
    "rings": functools.partial(
        _sample_rings_mixture, radii=_RINGS_RADII, std=_RINGS_STD
    ),
}
assert tuple(_SAMPLERS) == TOY_2D_NAMES


def _check_name(name: str) -> None:
    if name not in _SAMPLERS:
        raise ValueError(
            f"Unknown toy dataset {name!r}; valid names are {', '.join(TOY_2D_NAMES)}."
        )


@functools.partial(jax.jit, static_argnames=("name", "num", "dtype"))
def _toy_2d(key, *, name, num, dtype):
    # Low-precision dtypes are sampled in float32 and rounded.
    compute_dtype = dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)
    return _SAMPLERS[name](key, num, compute_dtype).astype(dtype)


def toy_2d(
    name: str,
    num: int,
    *,
    key: PRNGKeyArray,
    dtype: jnp.dtype | type = jnp.float32,
) -> Float[Array, "num 2"]:
    """Draw samples from a named 2-D toy distribution of FFJORD.

    The distributions, each point drawn i.i.d.:

    - `"8gaussians"`: equal mixture of N(μ_k, σ²I), μ_k = R (cos kπ/4, sin kπ/4),
      k = 0..7, with R = 4/√2 = 2√2 and σ = 0.5/√2 = √2/4. (FFJORD draws
      4 u_k + 0.5 ε and divides by 1.414; dividing by exactly √2 differs from it
      by 1e-4 relative.)
    - `"pinwheel"`: five arms; (f_0, f_1) ~ N((1, 0), diag(0.3², 0.1²)) is rotated
      clockwise by 2πk/5 + 0.25 exp(f_0), k uniform in 0..4, and scaled by 2.
    - `"2spirals"`: s = 3π√u, u ~ U[0, 1); x = ±((-s cos s, s sin s) + v)/3 + 0.1 ε
      with v ~ U[0, 0.5)², the sign uniform.
    - `"checkerboard"`: uniform on the 8 squares of side 2 in [-4, 4)² whose
      corner (2i, 2j) has i + j even, i.e. density 1/32 there.
    - `"moons"`: scikit-learn's two moons, (cos φ, sin φ) or (1 - cos φ, 0.5 -
      sin φ), φ ~ U[0, π), plus N(0, 0.1²I), then mapped by x ↦ 2x + (-1, -0.2).
    - `"circles"`: radius 3 or 1.5 at a uniform angle plus N(0, 0.24²I).
    - `"rings"`: radius 3, 2.25, 1.5 or 0.75 at a uniform angle plus
      N(0, 0.08²I).

    All the randomness of a call comes from one `jax.random.uniform` draw
    (Gaussians by the Box–Muller transform), which keeps compilation cheap. The
    sampler is jit-compiled per (name, num, dtype) and may itself be called under
    `jax.jit` with `name` and `num` static. Samples of dtypes narrower than
    float32 are computed in float32 and rounded.

    **Arguments:**

    - `name`: one of [`TOY_2D_NAMES`][].
    - `num`: number of samples, at least 1.
    - `key`: a JAX PRNG key; the samples are a deterministic function of it.
    - `dtype`: floating dtype of the result; float32 by default, also when
      `jax_enable_x64` is on.

    **Returns:**

    An array of shape `(num, 2)` and dtype `dtype`.

    **Raises:**

    `ValueError` for an unknown name or `num < 1`.

    **References:**

    Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable
    Reversible Generative Models", ICLR 2019.
    """
    _check_name(name)
    num = operator.index(num)
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}.")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    return _toy_2d(key, name=name, num=num, dtype=dtype)


# ---------------------------------------------------------------- log densities


def _log_density_8gaussians(x):
    centres = jnp.asarray(_G8_CENTRES, dtype=x.dtype)
    sq = jnp.sum((x[..., None, :] - centres) ** 2, axis=-1)
    log_norm = math.log(8.0) + math.log(2 * math.pi * _G8_STD**2)
    return logsumexp(-0.5 * sq / _G8_STD**2, axis=-1) - log_norm


def _log_density_checkerboard(x):
    u = x / 2
    in_box = jnp.all((u >= -2) & (u < 2), axis=-1)
    cell = jnp.floor(u)
    even = jnp.mod(cell[..., 0] + cell[..., 1], 2.0) == 0
    return jnp.where(in_box & even, _CHECKERBOARD_LOG_DENSITY, -jnp.inf).astype(x.dtype)


def _log_density_rings_mixture(x, radii, std):
    # Uniform angle on a circle of radius R convolved with N(0, σ²I):
    # p_R(x) = exp(-(r² + R²)/2σ²) I_0(rR/σ²) / (2πσ²), r = |x|;
    # with I_0(z) = e^z i0e(z): log p_R = -(r - R)²/2σ² + log i0e(rR/σ²) - log 2πσ².
    r = jnp.sqrt(jnp.sum(x**2, axis=-1))[..., None]
    big_r = jnp.asarray(radii, dtype=x.dtype)
    var = std**2
    log_comp = -0.5 * (r - big_r) ** 2 / var + jnp.log(i0e(r * big_r / var))
    log_norm = math.log(len(radii)) + math.log(2 * math.pi * var)
    return logsumexp(log_comp, axis=-1) - log_norm


_LOG_DENSITIES: dict[str, Callable] = {
    "8gaussians": _log_density_8gaussians,
    "checkerboard": _log_density_checkerboard,
    "circles": functools.partial(
        _log_density_rings_mixture, radii=_CIRCLES_RADII, std=_CIRCLES_STD
    ),
    "rings": functools.partial(
        _log_density_rings_mixture, radii=_RINGS_RADII, std=_RINGS_STD
    ),
}


def _check_density_name(name: str) -> None:
    _check_name(name)
    if name not in _LOG_DENSITIES:
        raise NotImplementedError(
            f"No closed-form density is implemented for toy dataset {name!r}; it is "
            f"available for {', '.join(_LOG_DENSITIES)}."
        )


@functools.partial(jax.jit, static_argnames=("name",))
def _log_density(x, *, name):
    return _LOG_DENSITIES[name](x)


def toy_2d_log_density(
    name: str, x: Float[ArrayLike, "*batch 2"]
) -> Float[Array, "*batch"]:
    """Exact log density log p(x) of a 2-D toy distribution.

    Available where the generating density has closed form:

    - `"8gaussians"`: log p(x) = logsumexp_k(-|x - μ_k|²/2σ²) - log 8 - log 2πσ²
      (centres and σ as in [`toy_2d`][]).
    - `"checkerboard"`: -log 32 on the support, -inf off it.
    - `"circles"`, `"rings"`: mixtures of equal weight of a uniform angle on a
      circle of radius R_k convolved with N(0, σ²I), whose density is
      p_k(x) = exp(-(|x|² + R_k²)/2σ²) I_0(|x| R_k/σ²) / 2πσ², I_0 the modified
      Bessel function of the first kind (evaluated stably through `i0e`).

    **Arguments:**

    - `name`: a name in [`TOY_2D_NAMES`][].
    - `x`: points of shape `(..., 2)`. Floating inputs keep their dtype;
      integer inputs are cast to float32.

    **Returns:**

    log p(x), of shape `x.shape[:-1]`.

    **Raises:**

    `ValueError` for an unknown name or a last axis not of size 2;
    `NotImplementedError` for `"pinwheel"`, `"2spirals"` and `"moons"`, whose
    densities are not closed-form.
    """
    _check_density_name(name)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.ndim < 1 or x.shape[-1] != 2:
        raise ValueError(f"x must have shape (..., 2), got {x.shape}.")
    return _log_density(x, name=name)


# -------------------------------------------------------------------- entropies

# Quadrature grids (half-width L, spacing h) on [-L, L]²: h ≤ σ/8 and L ≥ R + 10σ,
# so the truncated tails and the trapezoid error are far below 1e-6 nats.
_QUADRATURE: dict[str, tuple[float, float]] = {
    "8gaussians": (_G8_RADIUS + 10 * _G8_STD, _G8_STD / 8),
    "circles": (max(_CIRCLES_RADII) + 10 * _CIRCLES_STD, _CIRCLES_STD / 8),
    "rings": (max(_RINGS_RADII) + 10 * _RINGS_STD, _RINGS_STD / 8),
}
_EXACT_ENTROPIES: dict[str, float] = {"checkerboard": -_CHECKERBOARD_LOG_DENSITY}


@functools.cache
def _entropy(name: str) -> float:
    if name in _EXACT_ENTROPIES:
        return _EXACT_ENTROPIES[name]
    half_width, h = _QUADRATURE[name]
    n = int(math.ceil(half_width / h))
    axis = h * np.arange(-n, n + 1, dtype=np.float64)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1)
    # log p in float32 (relative error ~1e-7) is ample; accumulate in float64.
    log_p = np.asarray(
        _log_density(jnp.asarray(grid, jnp.float32), name=name), np.float64
    )
    return float(-np.sum(np.exp(log_p) * log_p) * h * h)


def toy_2d_entropy(name: str) -> float:
    """Differential entropy H = -∫ p log p of a 2-D toy distribution, in nats.

    For `"checkerboard"` it is exact, log 32 (uniform on area 32). For
    `"8gaussians"`, `"circles"` and `"rings"` it is computed by trapezoidal
    quadrature of -p log p on a uniform grid over [-L, L]², with spacing h ≤ σ/8
    and L ≥ max R + 10σ (σ the noise std, R the centre or circle radius); the
    integrand is smooth and decays like a Gaussian, so the error is well below
    1e-4 nats. The value is computed on first use and cached. For reference:
    8gaussians 2.831578, circles 3.268136, rings 2.623183, checkerboard
    log 32 = 3.465736. (8gaussians lies 0.006 below log 8 + H(N(0, σ²I)) =
    log 2πe, the value for non-overlapping components.)

    A lower bound on what a density model can reach: its expected negative
    log-likelihood on the data is H plus the KL divergence from the data.

    **Arguments:**

    - `name`: a name in [`TOY_2D_NAMES`][] with a known density (see
      [`toy_2d_log_density`][]).

    **Returns:**

    The entropy as a Python float.

    **Raises:**

    `ValueError` for an unknown name; `NotImplementedError` for a dataset
    without a closed-form density.
    """
    _check_density_name(name)
    return _entropy(name)
