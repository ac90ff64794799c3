"""Float64 reference solutions, computed once per problem and cached on disk.

- Solutions (forward problems, ``y(t1)`` and the CNF log-density) come from
  SciPy's DOP853 at ``rtol=1e-12, atol=1e-14`` on the float64 JAX field.
- Gradients come from discretise-then-optimise through a fine fixed-step
  classical RK4 in float64 (reverse mode through a checkpointed ``lax.scan``),
  which needs no rival library and is stable at any horizon. The same gradient
  with half the steps gives an estimate of the reference's own error, stored as
  ``grad_ref_error``.

Run in a float64 process: ``python -m benchmarks.run --reference PROBLEM --ref FILE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .problems import Problem

REF_RTOL = 1e-12
REF_ATOL = 1e-14


def _rk4_grid(t0: float, t1: float, refine: int = 1) -> np.ndarray:
    """Step boundaries: fine over the transient, coarser once a flow has settled."""
    span = t1 - t0
    if span <= 2.0:
        grid = np.linspace(t0, t1, 1000 * refine + 1)
    else:
        t_mid = t0 + min(span, 15.0)
        grid = np.linspace(t0, t_mid, int(200 * (t_mid - t0)) * refine + 1)
        if t1 > t_mid:
            tail = np.linspace(t_mid, t1, int(20 * (t1 - t_mid)) * refine + 1)
            grid = np.concatenate([grid, tail[1:]])
    return grid


def _rk4_solve(field: Any, y0: Any, params: Any, grid: Any) -> Any:
    """Classical RK4 over the step boundaries `grid`, checkpointed per step."""
    import jax
    import jax.numpy as jnp

    def axpy(y: Any, h: Any, k: Any) -> Any:
        return jax.tree_util.tree_map(lambda a, b: a + h * b, y, k)

    @jax.checkpoint
    def step(y: Any, t_and_h: Any) -> tuple[Any, None]:
        t, h = t_and_h[0], t_and_h[1]
        k1 = field(t, y, params)
        k2 = field(t + h / 2, axpy(y, h / 2, k1), params)
        k3 = field(t + h / 2, axpy(y, h / 2, k2), params)
        k4 = field(t + h, axpy(y, h, k3), params)
        incr = jax.tree_util.tree_map(
            lambda a, b, c, d: (a + 2 * b + 2 * c + d) / 6, k1, k2, k3, k4
        )
        return axpy(y, h, incr), None

    grid = jnp.asarray(grid)
    steps = jnp.stack([grid[:-1], jnp.diff(grid)], axis=-1)
    y1, _ = jax.lax.scan(step, y0, steps)
    return y1


def _scipy_solution(field: Any, y0: Any, params: Any, ts: np.ndarray) -> np.ndarray:
    """DOP853 solution at `ts`, shape (len(ts), flat state size)."""
    import jax
    from jax.flatten_util import ravel_pytree
    from scipy.integrate import solve_ivp

    flat_y0, unravel = ravel_pytree(y0)

    @jax.jit
    def rhs(t: Any, y: Any) -> Any:
        return ravel_pytree(field(t, unravel(y), params))[0]

    sol = solve_ivp(
        lambda t, y: np.asarray(rhs(t, y)),
        (float(ts[0]), float(ts[-1])),
        np.asarray(flat_y0),
        method="DOP853",
        t_eval=ts,
        rtol=REF_RTOL,
        atol=REF_ATOL,
    )
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    return sol.y.T


def compute_reference(problem: Problem) -> dict[str, np.ndarray]:
    """Reference arrays for `problem` (requires ``jax_enable_x64``)."""
    import jax
    import jax.numpy as jnp

    from .fields import FIELDS, cnf_log_density, flat, jax_inputs, sum_squares_loss

    if not jax.config.jax_enable_x64:
        raise RuntimeError("references must be computed with jax_enable_x64")
    field = FIELDS[problem.field]
    y0, params, _ = jax_inputs(problem, jnp.float64)
    ts = np.asarray(problem.ts, np.float64)
    out: dict[str, np.ndarray] = {}
    solution = _scipy_solution(field, y0, params, ts)
    if problem.kind == "fwd":
        out["ys"] = solution.reshape((len(ts),) + problem.y0.shape)
        return out

    if problem.kind == "grad":
        out["y_final"] = solution[-1].reshape(problem.y0.shape)

        def loss(p: Any, grid: Any) -> Any:
            return sum_squares_loss(_rk4_solve(field, y0, p, grid))

    else:
        n = problem.y0.shape[0]
        final = (solution[-1][: 2 * n].reshape(n, 2), solution[-1][2 * n :])
        out["logp"] = np.asarray(cnf_log_density(final))

        def loss(p: Any, grid: Any) -> Any:
            return jnp.mean(cnf_log_density(_rk4_solve(field, y0, p, grid)))

    grad = jax.jit(jax.grad(loss))
    t0, t1 = float(ts[0]), float(ts[-1])
    fine = flat(grad(params, _rk4_grid(t0, t1, refine=2)))
    coarse = flat(grad(params, _rk4_grid(t0, t1, refine=1)))
    out["grad"] = fine
    out["grad_ref_error"] = np.array(
        np.linalg.norm(fine - coarse) / np.linalg.norm(fine)
    )
    return out


def save_reference(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write reference arrays to an ``.npz`` file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_reference(path: Path | None) -> dict[str, np.ndarray] | None:
    """Read reference arrays, or None if there is no file."""
    if path is None or not Path(path).exists():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
