"""Every derivative order of a solve, for every input, against finite differences.

L(y0, args, field, ts) is a scalar loss of the outputs at four times of a
small nonlinear, time-dependent problem, solved at tight tolerances. For each
way of differentiating the solve, its gradient is checked against central
differences of L, and its Hessian against central differences of the gradient,
block by block: ∂²L/∂x∂z for every pair of inputs x, z among y0, args, the
arrays of an `equinox.Module` field and ts (so mixed derivatives too). Reverse
mode is `jax.jacrev` and `jax.jacrev(jax.jacrev(·))` for the custom_vjp
adjoints, `ForwardMode` is `jax.jacfwd` and `jax.jacfwd(jax.jacfwd(·))`; each
order differentiates the jitted one below it, as a training step that jits its
gradient would.
"""

import functools
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import neuralode as no

ADJOINTS = {
    "BacksolveAdjoint": no.BacksolveAdjoint(),
    "CheckpointAdjoint": no.CheckpointAdjoint(),
    # Three slots: the record thins and dropped states are recomputed.
    "CheckpointAdjoint-3": no.CheckpointAdjoint(checkpoints=3),
    "ForwardMode": no.ForwardMode(),
}
# Compiling a Hessian takes ~10-30 s; one adjoint's runs by default.
FAST_HESSIAN = "ForwardMode"
INPUTS = ("y0", "args", "field", "ts")
# At these tolerances the derivatives of the computed solution (and the
# continuous-time formula for ts) are those of the exact flow to ~1e-7, about
# what central differences with step EPS resolve.
SOLVE_TOL = dict(rtol=1e-10, atol=1e-10)
EPS = 1e-5
TOL = dict(rtol=1e-6, atol=1e-6)


class Field(eqx.Module):
    """f(t, y) = tanh(W y + b) - k y + sin(w t) reverse(y)."""

    weight: jax.Array
    bias: jax.Array

    def __call__(self, t, y, args):
        drive = jnp.sin(args["w"] * t) * y[::-1]
        return jnp.tanh(self.weight @ y + self.bias) - args["k"] * y + drive


X0 = {
    "y0": jnp.array([0.8, -0.4]),
    "args": {"k": jnp.array(0.6), "w": jnp.array(2.5)},
    "field": Field(jnp.array([[0.3, -1.1], [0.9, 0.2]]), jnp.array([0.1, -0.2])),
    "ts": jnp.array([0.0, 0.35, 0.9, 1.6]),
}
FLAT, UNRAVEL = ravel_pytree([X0[name] for name in INPUTS])
_sizes = [ravel_pytree(X0[name])[0].size for name in INPUTS]
BLOCKS = {
    name: slice(end - size, end)
    for name, size, end in zip(INPUTS, _sizes, np.cumsum(_sizes), strict=True)
}


def _loss(adjoint, x):
    y0, args, field, ts = UNRAVEL(x)
    ys = no.odeint(field, y0, ts, args, adjoint=adjoint, **SOLVE_TOL)
    weights = jnp.arange(1.0, ys.shape[0] + 1.0)[:, None]
    return jnp.sum(weights * ys**2) + jnp.sum(jnp.sin(ys[:, 0] * ys[:, 1]))


@functools.cache
def _jitted(adjoint_name: str, order: int):
    """L (order 0) or its derivative of `order`, jitted."""
    adjoint = ADJOINTS[adjoint_name]
    if order == 0:
        return jax.jit(functools.partial(_loss, adjoint))
    differentiate = jax.jacfwd if isinstance(adjoint, no.ForwardMode) else jax.jacrev
    return jax.jit(differentiate(_jitted(adjoint_name, order - 1)))


@functools.cache
def _derivatives(adjoint_name: str, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The derivative of `order` at X0 and its central-difference estimate
    (∂/∂x_j in the last axis's entry j)."""
    lower = _jitted(adjoint_name, order - 1)
    columns = []
    for j in range(FLAT.size):
        step = jnp.zeros_like(FLAT).at[j].set(EPS)
        plus, minus = np.asarray(lower(FLAT + step)), np.asarray(lower(FLAT - step))
        columns.append((plus - minus) / (2 * EPS))
    exact = np.asarray(_jitted(adjoint_name, order)(FLAT))
    return exact, np.stack(columns, axis=-1)


#: Hessians of these adjoints (each compiles for 10-30 s): the record that
#: thins and recomputes stands for CheckpointAdjoint, whose default record
#: (every step kept) gets its second derivatives in test_adjoint.py.
# The custom_vjp adjoints' second-order rules are checked by test_adjoint's
# gradient-of-gradient and second-derivative tests (thinned record included)
# and test_trust's reverse-over-reverse Hessian; their Hessians here cost
# 25 s of CI each.
HESSIAN_ADJOINTS = ("ForwardMode",)


def _cases(order: int, input_sets):
    """(adjoint name, *inputs) for every adjoint (of `HESSIAN_ADJOINTS` for
    order 2) and set of inputs, with the slow Hessians marked."""
    cases = []
    names = ADJOINTS if order == 1 else HESSIAN_ADJOINTS
    for inputs, name in itertools.product(input_sets, names):
        marks = []
        if order == 2 and name != FAST_HESSIAN:
            marks.append(pytest.mark.slow)
        cases.append(
            pytest.param(name, *inputs, marks=marks, id="-".join((name,) + inputs))
        )
    return cases


@pytest.mark.parametrize("adjoint_name, x", _cases(1, [(x,) for x in INPUTS]))
def test_gradient(adjoint_name, x):
    exact, fd = _derivatives(adjoint_name, 1)
    np.testing.assert_allclose(exact[BLOCKS[x]], fd[BLOCKS[x]], **TOL)


@pytest.mark.parametrize(
    "adjoint_name, x, z",
    _cases(2, list(itertools.combinations_with_replacement(INPUTS, 2))),
)
def test_hessian(adjoint_name, x, z):
    """The blocks ∂²L/∂x∂z and ∂²L/∂z∂x of the Hessian (rows: the gradient's
    entries, columns: the inputs differentiated last)."""
    exact, fd = _derivatives(adjoint_name, 2)
    tol = TOL
    if adjoint_name == "ForwardMode" and "ts" in (x, z):
        # Forward mode differentiates the computed solution exactly, step
        # sizes held; central differences of its ts gradient also see the
        # adaptive steps move, at ~1e-5 here.
        tol = dict(rtol=1e-4, atol=1e-4)
    for rows, columns in ((x, z), (z, x)):
        block = (BLOCKS[rows], BLOCKS[columns])
        np.testing.assert_allclose(exact[block], fd[block], **tol)
