"""Trace (and Jacobian Frobenius norm) estimators for continuous normalizing flows.

Both functions take a map `fn` from a batch of states `z` of shape (N, d) to
velocities of the same shape that acts on each row independently (row n of the
output depends on row n of the input only), and return the velocity together
with, per row, the Jacobian trace and the squared Frobenius norm (exact or
estimated).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# Up to this dimension the exact trace unrolls its d products in Python.
_UNROLL = 16

_RowMap = Callable[[Float[Array, "N d"]], Float[Array, "N d"]]


def exact_trace(
    fn: _RowMap, z: Float[Array, "N d"]
) -> tuple[Float[Array, "N d"], Float[Array, " N"], Float[Array, " N"]]:
    r"""Exact Jacobian trace and Frobenius norm by batched forward-mode products.

    For each basis vector $e_i$ the Jacobian–vector product $J e_i$ (the $i$-th
    column of every row's Jacobian) is computed for the whole batch at once,
    with the tangent $e_i$ broadcast to every row. The $d$ products share one
    linearisation (`jax.linearize`), so the primal is evaluated once; they are
    unrolled for $d \le 16$ (much cheaper to differentiate, as the adjoint
    does) and vectorised with `jax.vmap` above that. Then
    $\mathrm{Tr}\,J = \sum_i (J e_i)_i$ and
    $\lVert J\rVert_F^2 = \sum_i \lVert J e_i\rVert^2$. The cost is about $d$
    tangent passes, which is cheap for low-dimensional data; in high
    dimensions use `hutchinson_trace`.

    **Arguments:**

    - `fn`: a row-wise map from (N, d) to (N, d).
    - `z`: the batch of states, shape (N, d).

    **Returns:**

    `(fn(z), trace, frobenius_sq)` with shapes (N, d), (N,), (N,).
    """
    d = z.shape[-1]
    f, jvp = jax.linearize(fn, z)
    basis = jnp.eye(d, dtype=z.dtype)
    if d <= _UNROLL:
        # One product per dimension, unrolled: differentiating this (as the
        # adjoint does) is several times cheaper than differentiating a vmap.
        trace = jnp.zeros(z.shape[:-1], f.dtype)
        frob = jnp.zeros(z.shape[:-1], f.dtype)
        for i in range(d):
            col = jvp(jnp.broadcast_to(basis[i], z.shape))
            trace = trace + col[..., i]
            frob = frob + jnp.sum(col**2, axis=-1)
        return f, trace, frob
    tangents = jnp.broadcast_to(basis[:, None, :], (d,) + z.shape)
    cols = jax.vmap(jvp)(tangents)
    # cols[i, n, j] = d f_j / d z_i for row n.
    trace = jnp.sum(cols * tangents, axis=(0, 2))
    frob = jnp.sum(cols**2, axis=(0, 2))
    return f, trace, frob


def hutchinson_trace(
    fn: _RowMap, z: Float[Array, "N d"], eps: Float[Array, "N d"]
) -> tuple[Float[Array, "N d"], Float[Array, " N"], Float[Array, " N"]]:
    r"""Hutchinson's stochastic estimate of the Jacobian trace and Frobenius norm.

    With a probe $\varepsilon$ of zero mean and identity covariance (Rademacher
    or Gaussian), $\mathrm{Tr}\,J = \mathbb{E}[\varepsilon^\top J \varepsilon]$
    and $\lVert J\rVert_F^2 = \mathbb{E}\lVert \varepsilon^\top J\rVert^2$. Both
    come from one vector–Jacobian product $\varepsilon^\top J$ per evaluation
    (Grathwohl et al. 2019; Finlay et al. 2020). In a CNF the probe is drawn
    once and held fixed during the whole solve.

    **Arguments:**

    - `fn`: a row-wise map from (N, d) to (N, d).
    - `z`: the batch of states, shape (N, d).
    - `eps`: the probe, shape (N, d).

    **Returns:**

    `(fn(z), trace_estimate, frobenius_sq_estimate)` with shapes (N, d), (N,),
    (N,).
    """
    f, vjp_fn = jax.vjp(fn, z)
    (eps_j,) = vjp_fn(eps.astype(f.dtype))
    trace = jnp.sum(eps_j * eps, axis=-1)
    frob = jnp.sum(eps_j**2, axis=-1)
    return f, trace, frob
