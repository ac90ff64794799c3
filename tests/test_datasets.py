import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neuralode.datasets import (
    TOY_2D_NAMES,
    Digits,
    SpiralData,
    digits,
    spiral,
    toy_2d,
    toy_2d_entropy,
    toy_2d_log_density,
)

DENSITY_NAMES = ("8gaussians", "checkerboard", "circles", "rings")
NO_DENSITY_NAMES = ("pinwheel", "2spirals", "moons")
# One sample size throughout, so that each program is compiled once.
N = 100_000


def test_name_lists_partition():
    assert set(DENSITY_NAMES) | set(NO_DENSITY_NAMES) == set(TOY_2D_NAMES)
    assert len(TOY_2D_NAMES) == 7


# ------------------------------------------------------------------------ toy_2d


@pytest.mark.parametrize("name", TOY_2D_NAMES)
def test_toy_2d_shape_dtype_determinism(name):
    key = jax.random.key(0)
    x = toy_2d(name, N, key=key)
    assert x.shape == (N, 2)
    assert x.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_array_equal(x, toy_2d(name, N, key=key))
    y = toy_2d(name, N, key=jax.random.key(1))
    assert not np.allclose(x, y)


def test_toy_2d_under_jit_and_dtype():
    key = jax.random.key(3)
    jitted = jax.jit(toy_2d, static_argnums=(0, 1))
    np.testing.assert_array_equal(
        jitted("8gaussians", N, key=key), toy_2d("8gaussians", N, key=key)
    )
    # Legacy uint32 keys, a single sample, another dtype (traced, not compiled).
    one = jax.eval_shape(lambda k: toy_2d("moons", 1, key=k), jax.random.PRNGKey(0))
    assert one.shape == (1, 2) and one.dtype == jnp.float32
    x16 = jax.eval_shape(
        lambda k: toy_2d("pinwheel", 8, key=k, dtype=jnp.bfloat16), key
    )
    assert x16.dtype == jnp.bfloat16
    if jax.config.jax_enable_x64:
        x64 = jax.eval_shape(lambda k: toy_2d("rings", 8, key=k, dtype="float64"), key)
        assert x64.dtype == jnp.float64


def test_toy_2d_moments():
    # 8gaussians: centred, E|x|² = R² + 2σ² = 8 + 0.25.
    x = toy_2d("8gaussians", N, key=jax.random.key(5))
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(jnp.mean(jnp.sum(x**2, -1)), 8.25, rtol=0.02)
    # checkerboard lies on its support.
    c = toy_2d("checkerboard", N, key=jax.random.key(6))
    assert bool(jnp.all(jnp.abs(c) <= 4.0))
    assert bool(jnp.all(jnp.isfinite(toy_2d_log_density("checkerboard", c))))


def test_toy_2d_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="8gaussians"):
        toy_2d("swissroll", 10, key=key)
    with pytest.raises(ValueError, match="num"):
        toy_2d("moons", 0, key=key)
    with pytest.raises(ValueError, match="floating"):
        toy_2d("moons", 4, key=key, dtype=jnp.int32)


# -------------------------------------------------------------- log densities


def _grid(half_width, h):
    # Cell centres of a uniform grid of spacing h over [-half_width, half_width]².
    n = int(round(half_width / h))
    axis = h * (np.arange(-n, n) + 0.5)
    return np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1)


@pytest.mark.parametrize(
    "name, half_width, h",
    [("8gaussians", 7.0, 0.05), ("circles", 6.0, 0.03), ("rings", 4.5, 0.01)],
)
def test_smooth_density_integrates_to_one(name, half_width, h):
    grid = _grid(half_width, h)
    log_p = np.asarray(toy_2d_log_density(name, grid), np.float64)
    assert log_p.shape == grid.shape[:-1]
    assert np.all(np.isfinite(log_p))
    np.testing.assert_allclose(np.sum(np.exp(log_p)) * h * h, 1.0, atol=1e-4)


def test_checkerboard_density_integrates_to_one():
    # Cell centres never fall on a square's edge, so the midpoint rule is exact.
    h = 0.1
    grid = _grid(5.0, h)
    p = np.exp(np.asarray(toy_2d_log_density("checkerboard", grid), np.float64))
    np.testing.assert_allclose(np.sum(p) * h * h, 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.unique(p), [0.0, 1 / 32], rtol=1e-6)
    lp = toy_2d_log_density("checkerboard", jnp.array([[1.0, 1.0], [1.0, -1.0]]))
    assert lp[0] == pytest.approx(-math.log(32)) and lp[1] == -jnp.inf
    assert toy_2d_log_density("checkerboard", jnp.array([5.0, 5.0])) == -jnp.inf


def test_8gaussians_log_density_values():
    # At a centre, the density is dominated by its own component: 1/(8·2πσ²).
    centre = jnp.array([2 * math.sqrt(2), 0.0])
    sigma2 = 0.125
    expected = -math.log(8 * 2 * math.pi * sigma2)
    assert float(toy_2d_log_density("8gaussians", centre)) == pytest.approx(
        expected, abs=1e-5
    )
    far = toy_2d_log_density("8gaussians", jnp.array([100.0, 100.0]))
    assert bool(jnp.isfinite(far)) and float(far) < -1e4


def test_log_density_shapes_and_dtypes():
    x = jax.ShapeDtypeStruct((3, 4, 2), jnp.float32)
    for name in DENSITY_NAMES:
        lp = jax.eval_shape(lambda x: toy_2d_log_density(name, x), x)
        assert lp.shape == (3, 4)
        assert lp.dtype == jnp.float32
    lp = toy_2d_log_density("rings", np.zeros(2, np.int32))
    assert lp.shape == () and bool(jnp.isfinite(lp))
    with pytest.raises(ValueError, match="shape"):
        toy_2d_log_density("rings", jnp.zeros((4, 3)))


def test_log_density_is_jittable_and_differentiable():
    f = jax.jit(lambda x: toy_2d_log_density("rings", x))
    x = toy_2d("rings", N, key=jax.random.key(2))
    np.testing.assert_allclose(f(x), toy_2d_log_density("rings", x), rtol=1e-5)
    g = jax.grad(lambda x: toy_2d_log_density("8gaussians", x).sum())(x)
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("name", DENSITY_NAMES)
def test_entropy_matches_monte_carlo(name):
    x = toy_2d(name, N, key=jax.random.key(11))
    log_p = np.asarray(toy_2d_log_density(name, x), np.float64)
    assert np.all(np.isfinite(log_p))
    entropy = toy_2d_entropy(name)
    assert isinstance(entropy, float)
    # Standard error of the estimate is std(log p)/√n ≈ 0.003.
    assert abs(entropy - (-log_p.mean())) < 0.02


def test_entropy_values():
    assert toy_2d_entropy("checkerboard") == pytest.approx(math.log(32), abs=1e-12)
    h8 = toy_2d_entropy("8gaussians")
    assert h8 == pytest.approx(2.831578, abs=1e-4)
    # Overlap of the components can only lower it below log 8 + H(N(0, σ²I)).
    assert h8 < math.log(2 * math.pi * math.e)


@pytest.mark.parametrize("name", NO_DENSITY_NAMES)
def test_no_density_raises(name):
    with pytest.raises(NotImplementedError, match=name):
        toy_2d_log_density(name, jnp.zeros((2,)))
    with pytest.raises(NotImplementedError, match=name):
        toy_2d_entropy(name)


def test_density_unknown_name():
    with pytest.raises(ValueError, match="valid names"):
        toy_2d_log_density("nope", jnp.zeros((2,)))
    with pytest.raises(ValueError, match="valid names"):
        toy_2d_entropy("nope")


# ------------------------------------------------------------------------ spiral


SPIRAL_KWARGS = dict(num_trajectories=200, num_points=30, noise_std=0.05, window=80)


def test_spiral_shapes_and_determinism():
    key = jax.random.key(0)
    data = spiral(**SPIRAL_KWARGS, key=key)
    assert isinstance(data, SpiralData)
    assert data.ts.shape == (200, 30) and data.ts.dtype == jnp.float32
    assert data.ys.shape == (200, 30, 2) and data.ys.dtype == jnp.float32
    assert data.ys_clean.shape == (200, 30, 2) and data.ys_clean.dtype == jnp.float32
    assert data.clockwise.shape == (200,) and data.clockwise.dtype == jnp.bool_
    assert data.ts_grid.shape == (80,) and data.ts_grid.dtype == jnp.float32
    assert data.ys_grid.shape == (200, 80, 2) and data.ys_grid.dtype == jnp.float32
    again = spiral(**SPIRAL_KWARGS, key=key)
    for a, b in zip(data, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = spiral(**SPIRAL_KWARGS, key=jax.random.key(1))
    assert not np.allclose(data.ys, other.ys)
    assert not np.array_equal(data.ts, other.ts)
    # Default sizes, traced only.
    default = jax.eval_shape(lambda k: spiral(key=k), key)
    assert default.ts.shape == (1000, 50) and default.ys.shape == (1000, 50, 2)
    assert default.ys_grid.shape == (1000, 150, 2)


def test_spiral_structure():
    data = spiral(**SPIRAL_KWARGS, key=jax.random.key(4))
    ts = np.asarray(data.ts)
    assert np.all(ts[:, 0] == 0.0)
    assert np.all(np.diff(ts, axis=1) > 0)  # strictly increasing
    dts = np.diff(ts, axis=1)
    assert dts.min() < dts.max() / 2  # genuinely irregular
    # Observations lie on the fine grid and agree with the dense trajectory.
    grid = np.asarray(data.ts_grid)
    idx = np.searchsorted(grid, ts)
    np.testing.assert_allclose(grid[idx], ts)
    dense = np.take_along_axis(np.asarray(data.ys_grid), idx[..., None], axis=1)
    np.testing.assert_allclose(dense, data.ys_clean)
    # Noise level.
    resid = np.asarray(data.ys - data.ys_clean)
    assert abs(resid.std() - SPIRAL_KWARGS["noise_std"]) < 0.005
    # Archimedean spiral: radius grows linearly, r = 0.5 + 0.3 θ, dr/dt = 0.3.
    r = np.linalg.norm(np.asarray(data.ys_grid), axis=-1)
    np.testing.assert_allclose(np.diff(r, axis=1) / np.diff(grid), 0.3, rtol=1e-3)
    # Rotation direction: sign of the cross product of successive positions.
    y = np.asarray(data.ys_grid)
    cross = y[:, :-1, 0] * y[:, 1:, 1] - y[:, :-1, 1] * y[:, 1:, 0]
    cw = np.asarray(data.clockwise)
    assert 0 < cw.sum() < len(cw)
    assert np.all(cross[cw] < 0) and np.all(cross[~cw] > 0)


def test_spiral_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_points"):
        spiral(4, 50, key=key, window=20)
    with pytest.raises(ValueError, match="window"):
        spiral(4, 10, key=key, window=600, num_grid=500)
    with pytest.raises(ValueError, match="num_trajectories"):
        spiral(0, 10, key=key)


# ------------------------------------------------------------------------ digits


def test_digits():
    data = digits()
    assert isinstance(data, Digits)
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert data.x_train.dtype == np.float32 and data.x_test.dtype == np.float32
    assert data.y_train.dtype == np.int32 and data.y_test.dtype == np.int32
    assert data.y_train.shape == (1437,) and data.y_test.shape == (360,)
    for x in (data.x_train, data.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(data.y_test)) == set(range(10))
    # Stratified: every class has about 20% of its images in the test set.
    counts = np.bincount(data.y_test, minlength=10)
    totals = counts + np.bincount(data.y_train, minlength=10)
    np.testing.assert_allclose(counts / totals, 0.2, atol=0.01)
    # Deterministic for a seed; a different seed gives a different split.
    again = digits()
    for a, b in zip(data, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = digits(seed=1)
    assert not np.array_equal(data.y_test, other.y_test)
    half = digits(test_fraction=0.5)
    assert len(half.y_test) + len(half.y_train) == 1797
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=1.0)
