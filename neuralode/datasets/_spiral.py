"""Noisy, irregularly sampled 2-D spirals for the latent-ODE demonstration."""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._toy import _categorical, _gaussian_pair


class SpiralData(NamedTuple):
    """Spiral trajectories returned by [`spiral`][]; a pytree (a NamedTuple).

    With N trajectories, P observations each and W fine-grid points per window:

    - `ts`: (N, P) observation times, strictly increasing along each row,
      measured from the start of the trajectory's window, so `ts[:, 0] == 0`.
    - `ys`: (N, P, 2) noisy observations `ys_clean + noise_std · ε`.
    - `ys_clean`: (N, P, 2) the noiseless spiral at `ts`.
    - `clockwise`: (N,) bool, the direction of rotation of each trajectory.
    - `ts_grid`: (W,) the fine time grid of a window, `ts_grid[0] == 0`; every
      `ts[i]` is a subset of it.
    - `ys_grid`: (N, W, 2) the noiseless trajectory on `ts_grid`, e.g. for
      plotting or scoring interpolation and extrapolation.
    """

    ts: Float[Array, "num_trajectories num_points"]
    ys: Float[Array, "num_trajectories num_points 2"]
    ys_clean: Float[Array, "num_trajectories num_points 2"]
    clockwise: Bool[Array, " num_trajectories"]
    ts_grid: Float[Array, " window"]
    ys_grid: Float[Array, "num_trajectories window 2"]


@functools.partial(
    jax.jit,
    static_argnames=("num_trajectories", "num_points", "num_grid", "window", "dtype"),
)
def _spiral(
    key,
    noise_std,
    max_angle,
    radius_offset,
    radius_growth,
    *,
    num_trajectories,
    num_points,
    num_grid,
    window,
    dtype,
):
    out_dtype = dtype
    dtype = dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)
    noise_std, max_angle, radius_offset, radius_growth = (
        jnp.asarray(p, dtype)
        for p in (noise_std, max_angle, radius_offset, radius_growth)
    )
    # One call to jax.random for all randomness (see _toy.py on compile time):
    # per trajectory, direction, start, window - 1 sort keys, 2·P for the noise.
    n_start = num_grid - window + 1
    u = jax.random.uniform(
        key, (2 + (window - 1) + 2 * num_points, num_trajectories), dtype
    )
    clockwise = u[0] < 0.5
    start = _categorical(u[1], n_start)
    sort_keys = u[2 : window + 1].T  # (N, W - 1)
    noise_u = (
        u[window + 1 :].reshape(2, num_points, num_trajectories).transpose(0, 2, 1)
    )

    dtheta = max_angle / (num_grid - 1)
    ts_grid = dtheta * jnp.arange(window, dtype=dtype)
    theta = start[:, None].astype(dtype) * dtheta + ts_grid  # (N, W)
    r = radius_offset + radius_growth * theta
    sign = jnp.where(clockwise, -1.0, 1.0).astype(dtype)[:, None]
    ys_grid = jnp.stack([r * jnp.cos(theta), sign * r * jnp.sin(theta)], axis=-1)

    # Observed indices: the window start plus a uniformly random subset of size
    # P - 1 of the other W - 1 grid points (the P - 1 smallest sort keys), sorted.
    rest = jnp.sort(jnp.argsort(sort_keys, axis=1)[:, : num_points - 1], axis=1) + 1
    first = jnp.zeros((num_trajectories, 1), rest.dtype)
    idx = jnp.concatenate([first, rest], axis=1)

    ts = ts_grid[idx]
    ys_clean = jnp.take_along_axis(ys_grid, idx[..., None], axis=1)
    ys = ys_clean + noise_std * _gaussian_pair(noise_u[0], noise_u[1])
    cast = lambda a: a.astype(out_dtype)
    return SpiralData(
        cast(ts), cast(ys), cast(ys_clean), clockwise, cast(ts_grid), cast(ys_grid)
    )


def spiral(
    num_trajectories: int = 1000,
    num_points: int = 50,
    *,
    key: PRNGKeyArray,
    noise_std: float = 0.1,
    num_grid: int = 500,
    window: int = 150,
    max_angle: float = 6 * math.pi,
    radius_offset: float = 0.5,
    radius_growth: float = 0.3,
    dtype: jnp.dtype | type = jnp.float32,
) -> SpiralData:
    """Noisy observations of 2-D spirals at irregular times (Chen et al. 2018, §5).

    Each trajectory is an Archimedean spiral r = a + bθ traversed at unit
    angular speed, counter-clockwise, y(t) = r (cos θ, sin θ), or clockwise,
    y(t) = r (cos θ, -sin θ), with equal probability; θ = θ_0 + t. Either is the
    solution of the autonomous ODE dy/dt = b y/|y| ± J y, J the rotation by π/2
    (+ counter-clockwise), valid while r > 0, so a latent ODE can represent it
    exactly.

    The angle range [0, `max_angle`] is discretised into `num_grid` points. Each
    trajectory starts at a uniformly random grid point θ_0 and spans `window`
    consecutive grid points; its observation times are the window start (t = 0)
    and a uniformly random subset of `num_points - 1` of the other grid points in
    the window, sorted. Gaussian noise of std `noise_std` is added to each
    coordinate.

    **Arguments:**

    - `num_trajectories`: number of spirals N.
    - `num_points`: observations per spiral P, `1 <= P <= window`.
    - `key`: a JAX PRNG key; the data are a deterministic function of it.
    - `noise_std`: standard deviation of the observation noise.
    - `num_grid`: points of the fine grid over [0, `max_angle`], at least 2.
    - `window`: fine-grid points spanned by one trajectory, W <= `num_grid`.
      With the defaults a window lasts 149 · 6π/499 ≈ 5.6 time units, 0.9 turn.
    - `max_angle`: largest angle θ of the spiral (default 6π, three turns).
    - `radius_offset`, `radius_growth`: a and b in r = a + bθ (default radius
      from 0.5 to about 6.2).
    - `dtype`: floating dtype of the times and positions; float32 by default,
      also when `jax_enable_x64` is on. Dtypes narrower than float32 are computed
      in float32 and rounded.

    **Returns:**

    A [`SpiralData`][] `(ts, ys, ys_clean, clockwise, ts_grid, ys_grid)` with
    shapes (N, P), (N, P, 2), (N, P, 2), (N,), (W,), (N, W, 2).

    **Raises:**

    `ValueError` if the sizes are inconsistent.

    **References:**

    Chen, Rubanova, Bettencourt, Duvenaud. "Neural Ordinary Differential
    Equations." NeurIPS 2018, §5 (latent ODE on spirals).
    """
    num_trajectories = operator.index(num_trajectories)
    num_points = operator.index(num_points)
    num_grid = operator.index(num_grid)
    window = operator.index(window)
    if num_trajectories < 1:
        raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}.")
    if num_grid < 2:
        raise ValueError(f"num_grid must be >= 2, got {num_grid}.")
    if not 1 <= window <= num_grid:
        raise ValueError(f"window must be in [1, num_grid={num_grid}], got {window}.")
    if not 1 <= num_points <= window:
        raise ValueError(
            f"num_points must be in [1, window={window}], got {num_points}."
        )
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    return _spiral(
        key,
        noise_std,
        max_angle,
        radius_offset,
        radius_growth,
        num_trajectories=num_trajectories,
        num_points=num_points,
        num_grid=num_grid,
        window=window,
        dtype=dtype,
    )
