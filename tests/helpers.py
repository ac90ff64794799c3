"""Shared solver lists, comparisons and reference problems for the tests."""

import jax
import jax.numpy as jnp
import numpy as np

import neuralode as no

ADAPTIVE = [no.Dopri5(), no.Tsit5(), no.Bosh3(), no.Fehlberg45()]
FIXED = [no.Euler(), no.Midpoint(), no.RK4()]
ALL = ADAPTIVE + FIXED


def name(solver) -> str:
    return type(solver).__name__


def tree_allclose(a, b, *, rtol=1e-7, atol=1e-9) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    if tree_a != tree_b:
        return False
    return all(
        np.shape(x) == np.shape(y) and np.allclose(x, y, rtol=rtol, atol=atol)
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def linear_field(t, y, a):
    return a @ y


def random_stable_matrix(key, n: int) -> jax.Array:
    m = jax.random.normal(key, (n, n)) / jnp.sqrt(n)
    return m - 1.5 * jnp.eye(n)


def lotka_volterra(t, y, args):
    alpha, beta, delta, gamma = 1.5, 1.0, 1.0, 3.0
    x, z = y[0], y[1]
    return jnp.stack([alpha * x - beta * x * z, delta * x * z - gamma * z])


def kepler(t, y, args):
    q, p = y[:2], y[2:]
    r3 = jnp.sum(q**2) ** 1.5
    return jnp.concatenate([p, -q / r3])


def kepler_initial(e: float = 0.5) -> np.ndarray:
    """Kepler orbit of eccentricity e starting at perihelion (period 2π)."""
    return np.array([1 - e, 0.0, 0.0, np.sqrt((1 + e) / (1 - e))])


def van_der_pol(t, y, mu):
    x, v = y[0], y[1]
    return jnp.stack([v, mu * (1 - x**2) * v - x])
