"""JAX vector fields and losses shared by the JAX-based runners and the limit.

All fields have the signature ``f(t, y, params) -> dy/dt``. Libraries whose
convention differs (``jax.experimental.ode`` wants ``f(y, t, *args)``) wrap them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .problems import Problem

Field = Callable[[Any, Any, Any], Any]

VDP_MU = 1.0


def mlp_apply(params: Any, x: jax.Array) -> jax.Array:
    """Apply tanh-MLP layers ``((W, b), ...)`` to the last axis of `x`."""
    *hidden, (w_out, b_out) = params
    for w, b in hidden:
        x = jnp.tanh(x @ w + b)
    return x @ w_out + b_out


def _with_time(t: Any, y: jax.Array) -> jax.Array:
    tcol = jnp.broadcast_to(jnp.asarray(t, y.dtype), y.shape[:-1] + (1,))
    return jnp.concatenate([tcol, y], axis=-1)


def mlp_t_field(t: Any, y: jax.Array, params: Any) -> jax.Array:
    """MLP of ``[t, y]`` applied row-wise to a batch ``y`` of shape (B, d)."""
    return mlp_apply(params, _with_time(t, y))


def mlp_field(t: Any, y: jax.Array, params: Any) -> jax.Array:
    """Autonomous MLP of ``y`` applied row-wise."""
    del t
    return mlp_apply(params, y)


def vdp_field(t: Any, y: jax.Array, params: Any) -> jax.Array:
    """Van der Pol oscillator ``x'' = μ (1 - x²) x' - x`` as a first-order system."""
    del t, params
    x, v = y[0], y[1]
    return jnp.stack([v, VDP_MU * (1 - x**2) * v - x])


def cnf_field(t: Any, state: tuple[jax.Array, jax.Array], params: Any) -> Any:
    """CNF dynamics with the exact trace: ``(dz/dt, d∫tr/dt) = (g, tr ∂g/∂z)``.

    `state` is ``(z, trace_integral)`` with ``z`` of shape (B, 2). The
    per-point 2 × 2 Jacobian is computed with forward mode.
    """
    z, _ = state

    def point(zi: jax.Array) -> jax.Array:
        return mlp_apply(params, _with_time(t, zi))

    dz = jax.vmap(point)(z)
    jac = jax.vmap(jax.jacfwd(point))(z)
    return dz, jnp.trace(jac, axis1=-2, axis2=-1)


FIELDS: dict[str, Field] = {
    "mlp_t": mlp_t_field,
    "mlp": mlp_field,
    "vdp": vdp_field,
    "cnf": cnf_field,
}


def jax_inputs(problem: Problem, dtype: Any = None) -> tuple[Any, Any, jax.Array]:
    """Initial state, parameters and output times as JAX arrays of the problem dtype.

    For a CNF the state is ``(points, zeros)``.
    """
    dtype = dtype or problem.dtype
    y0 = jnp.asarray(problem.y0, dtype)
    if problem.kind == "cnf":
        y0 = (y0, jnp.zeros(problem.y0.shape[0], dtype))
    params = None
    if problem.params is not None:
        params = tuple(
            (jnp.asarray(w, dtype), jnp.asarray(b, dtype)) for w, b in problem.params
        )
    return y0, params, jnp.asarray(problem.ts, dtype)


def sum_squares_loss(y_final: jax.Array) -> jax.Array:
    """The loss of the gradient problems: ``Σ y(t1)²``."""
    return jnp.sum(y_final**2)


def cnf_log_density(final_state: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``log p(x) = log N(z(1); 0, I) + ∫ tr ∂g/∂z dt`` per point."""
    z1, trace_integral = final_state
    log_base = -0.5 * jnp.sum(z1**2, axis=-1) - z1.shape[-1] * 0.5 * math.log(
        2 * math.pi
    )
    return log_base + trace_integral


def flat(tree: Any) -> np.ndarray:
    """All leaves of a pytree concatenated into one float64 NumPy vector."""
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def rel_error(value: Any, reference: Any) -> float:
    """Relative 2-norm error ``‖value − reference‖ / ‖reference‖`` of two pytrees."""
    v, r = flat(value), flat(reference)
    if v.shape != r.shape:
        raise ValueError(f"shape mismatch {v.shape} vs {r.shape}")
    return float(np.linalg.norm(v - r) / max(np.linalg.norm(r), 1e-300))
