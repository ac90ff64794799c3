"""The event root finder on a step's dense output: accuracy to the last bits,
robustness where Newton alone diverges, implicit derivatives, jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neuralode import _interpolation as interp
from neuralode._event_root import MAX_ROUNDS, bracketed_root, crossing_fraction


def _ulps(got: float, want: float, dtype) -> float:
    return abs(got - want) / float(np.spacing(np.asarray(want, dtype)))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("root", [0.013, 0.3, 0.777, 0.999])
def test_simple_root_to_the_last_bits_in_few_rounds(root, dtype):
    r = jnp.asarray(root, dtype)
    g = lambda th: (th - r) * (1 + th**2)
    theta, rounds = jax.jit(lambda: bracketed_root(g, 0.0, dtype))()
    assert theta.dtype == dtype
    assert _ulps(float(theta), float(r), dtype) <= 1
    assert int(rounds) <= 8


def test_root_at_the_step_end_is_found_without_iterating():
    theta, rounds = bracketed_root(lambda th: th - 1.0, 0.0, jnp.float64)
    assert float(theta) == 1.0 and int(rounds) == 0


def test_steep_crossing_where_newton_alone_diverges():
    # From either end Newton's step on tanh overshoots far outside [0, 1].
    g = lambda th: jnp.tanh(60.0 * (th - 0.3))
    theta, rounds = bracketed_root(g, 0.0, jnp.float64)
    assert _ulps(float(theta), 0.3, np.float64) <= 2
    assert int(rounds) < MAX_ROUNDS


def test_no_sign_change_gives_nan():
    theta, _ = bracketed_root(lambda th: th + 1.0, 0.0, jnp.float64)
    assert np.isnan(float(theta))


def test_crossing_of_a_hermite_interpolant_to_a_few_ulps_of_the_time():
    """The time at which a step's cubic interpolant crosses a level, against
    the cubic's root by numpy, in units of the spacing of the event time."""
    t0, h = 1234.5, 0.37
    y0, y1, f0, f1 = map(jnp.array, ([2.0], [-1.0], [-3.0], [-7.0]))
    coeffs = interp.hermite_coefficients(y0, y1, f0, f1, jnp.asarray(h))
    level = 0.4
    g = lambda th: interp.evaluate(y0, coeffs, th)[0] - level
    tol = 4 * np.spacing(t0 + h) / h
    theta = crossing_fraction(g, tol, jnp.float64)
    c = np.asarray(coeffs)[:, 0]
    roots = np.roots([c[2], c[1], c[0], float(y0[0]) - level])
    want = min(r.real for r in roots if abs(r.imag) < 1e-12 and 0 <= r.real <= 1)
    assert _ulps(t0 + float(theta) * h, t0 + want * h, np.float64) <= 4


def _root(a, b):
    return crossing_fraction(lambda th: th**3 + a * th - b, 0.0, jnp.float64)


def test_implicit_derivatives_match_the_closed_form():
    """θ³ + aθ - b = 0: dθ/da = -θ/(3θ² + a), dθ/db = 1/(3θ² + a)."""
    a, b = 0.5, 0.2
    theta = float(_root(a, b))
    assert abs(theta**3 + a * theta - b) < 1e-15
    d = 3 * theta**2 + a
    grads = jax.jit(jax.grad(_root, argnums=(0, 1)))(a, b)
    np.testing.assert_allclose(grads, (-theta / d, 1 / d), rtol=1e-12)
    forward = jax.jacfwd(_root, argnums=(0, 1))(a, b)
    np.testing.assert_allclose(forward, (-theta / d, 1 / d), rtol=1e-12)


def test_vmap_gives_each_sample_its_own_root():
    bs = jnp.linspace(0.1, 1.2, 5)
    thetas = jax.vmap(_root, (None, 0))(0.5, bs)
    for theta, b in zip(np.asarray(thetas), np.asarray(bs), strict=True):
        assert abs(theta**3 + 0.5 * theta - b) < 1e-14
    grads = jax.vmap(jax.grad(_root, argnums=1), (None, 0))(0.5, bs)
    np.testing.assert_allclose(grads, 1 / (3 * thetas**2 + 0.5), rtol=1e-12)
