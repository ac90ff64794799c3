"""scikit-learn's 8×8 digits as images for density estimation.

Each pixel of the digits is a count in 0..16, so an image is a point of the
discrete cube {0, ..., 16}^64. Density models of continuous variables are fitted
to it the usual way (Theis, van den Oord, Bethge 2016; Dinh et al. 2017;
Grathwohl et al. 2019): uniform dequantisation $x = (k + u)/17$,
$u \\sim U[0, 1)^{64}$, so that the negative log-likelihood of a density on
$[0, 1]^{64}$ plus $64 \\log 17$ bounds the discrete negative log-likelihood
from above; then the logit transform
$y = \\operatorname{logit}(\\alpha + (1 - 2\\alpha) x)$, whose log-Jacobian
enters the likelihood, maps the cube onto $\\mathbb{R}^{64}$.

**References:**

- Theis, van den Oord, Bethge. "A note on the evaluation of generative
  models." ICLR 2016.
- Dinh, Sohl-Dickstein, Bengio. "Density estimation using Real NVP." ICLR 2017.
- Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. "FFJORD: Free-form
  Continuous Dynamics for Scalable Reversible Generative Models." ICLR 2019.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._digits import digits

DIGIT_LEVELS = 17
"""Intensity levels of a digits pixel (counts 0..16)."""


class DigitImages(NamedTuple):
    """Train/validation/test split returned by [`digit_images`][]; NumPy arrays.

    Each is (n, 64) int32 pixel counts in 0..16, rows of 8×8 images.
    """

    train: Int[np.ndarray, "n_train 64"]
    valid: Int[np.ndarray, "n_valid 64"]
    test: Int[np.ndarray, "n_test 64"]


def digit_images(
    *, test_fraction: float = 0.2, valid_fraction: float = 0.1, seed: int = 0
) -> DigitImages:
    """scikit-learn's digits as integer images, split into train/valid/test.

    The test set is that of [`digits`][] with the same `test_fraction` and
    `seed` (stratified by class); the validation set is the last
    `valid_fraction` of the remaining images after a shuffle seeded by `seed`.
    The split is the same on every call with the same arguments.

    **Arguments:**

    - `test_fraction`: fraction of all images in the test set, in (0, 1).
    - `valid_fraction`: fraction of the non-test images held out for
      validation, in [0, 1).
    - `seed`: seed of the split.

    **Returns:**

    A [`DigitImages`][]; with the defaults 1294 training, 143 validation and
    360 test images.

    **Raises:**

    `ValueError` for a fraction outside its range.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}.")
    split = digits(test_fraction=test_fraction, seed=seed)
    train = np.rint(split.x_train * 16).astype(np.int32)
    test = np.rint(split.x_test * 16).astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(train))
    num_valid = int(round(valid_fraction * len(train)))
    keep, valid = order[: len(train) - num_valid], order[len(train) - num_valid :]
    return DigitImages(train[keep], train[valid], test)


def dequantize(
    key: PRNGKeyArray, counts: Int[ArrayLike, "*batch d"], levels: int = DIGIT_LEVELS
) -> Float[Array, "*batch d"]:
    """Uniform dequantisation $x = (k + u)/L$, $u \\sim U[0, 1)$, into $[0, 1)$.

    **Arguments:**

    - `key`: PRNG key of the noise.
    - `counts`: integer levels in 0..levels-1.
    - `levels`: the number of levels $L$ (17 for the digits).

    **Returns:**

    float32 values of the shape of `counts`.

    **Raises:**

    `ValueError` for non-integer counts or `levels < 2`.
    """
    counts = jnp.asarray(counts)
    if not jnp.issubdtype(counts.dtype, jnp.integer):
        raise ValueError(
            f"counts must be integer levels, got dtype {counts.dtype} "
            "(pass the images of digit_images, not scaled ones)."
        )
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}.")
    u = jr.uniform(key, counts.shape, jnp.float32)
    return (counts.astype(jnp.float32) + u) / levels


def logit_transform(
    x: Float[ArrayLike, "*batch d"], alpha: float
) -> tuple[Float[Array, "*batch d"], Float[Array, " *batch"]]:
    """FFJORD's logit transform and its log-Jacobian, per row.

    $s = \\alpha + (1 - 2\\alpha)x$, $y = \\log s - \\log(1 - s)$, so that
    $\\log|\\det \\partial y/\\partial x| = \\sum_i [\\log(1 - 2\\alpha) -
    \\log s_i - \\log(1 - s_i)]$, and a density $p_Y$ on $\\mathbb{R}^d$ gives
    $\\log p_X(x) = \\log p_Y(y) + \\log|\\det \\partial y/\\partial x|$.

    **Arguments:**

    - `x`: values in [0, 1], shape (..., d).
    - `alpha`: the squeeze $\\alpha \\in [0, 1/2)$ that keeps $s$ away from 0
      and 1 (FFJORD uses 1e-6 on MNIST, Real NVP 0.05).

    **Returns:**

    `(y, log_det)` of shapes (..., d) and (...,).

    **Raises:**

    `ValueError` for `alpha` outside [0, 1/2).
    """
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha}.")
    x = jnp.asarray(x)
    s = alpha + (1 - 2 * alpha) * x
    log_s, log_1ms = jnp.log(s), jnp.log1p(-s)
    log_det = jnp.sum(math.log1p(-2 * alpha) - log_s - log_1ms, axis=-1)
    return log_s - log_1ms, log_det


def bits_per_dim(
    nll: Float[ArrayLike, "*batch"], dim: int, levels: int = DIGIT_LEVELS
) -> Float[Array, "*batch"]:
    """Negative log-likelihood of dequantised data in bits per dimension.

    `nll` is $-\\log p_X(x)$ in nats for a density on $[0, 1]^d$ of
    $x = (k + u)/L$. The density of $k + u$ on $[0, L]^d$ is $p_X / L^d$, so the
    discrete NLL is bounded by $(\\mathrm{nll} + d \\log L)/(d \\log 2)$ bits per
    dimension; a uniform model scores $\\log_2 L$ (4.09 for 17 levels).

    **Arguments:**

    - `nll`: negative log-likelihood in nats, of the whole d-dimensional point.
    - `dim`: the dimension $d$.
    - `levels`: the number of levels $L$.

    **Returns:**

    Bits per dimension, the shape of `nll`.
    """
    return (jnp.asarray(nll) + dim * math.log(levels)) / (dim * math.log(2.0))
