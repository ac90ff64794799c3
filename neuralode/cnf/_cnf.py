"""Continuous normalizing flows (FFJORD) with RNODE regularisation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._adjoint import AbstractAdjoint, BacksolveAdjoint
from .._neural_ode import check_int, concrete_time, solver_options
from .._problem import check_throw
from .._solve import solve
from .._solvers import AbstractSolver, Dopri5
from ..nn import ConcatSquashMLP, MLPField
from ._trace import exact_trace, hutchinson_trace

_TRACES = ("exact", "hutchinson")
_NOISES = ("rademacher", "gaussian")
# neuralode's own fields act row-wise on states of shape (..., d).
_ROW_WISE_FIELDS = (MLPField, ConcatSquashMLP)


def _standard_normal_log_prob(z: Float[Array, "N d"]) -> Float[Array, " N"]:
    d = z.shape[-1]
    return -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * d * math.log(2 * math.pi)


def _default_float() -> Any:
    return jnp.zeros(()).dtype


class _MapOverRows(eqx.Module):
    """A field written for one point z of shape (d,), mapped over the rows of (N, d)."""

    field: Callable[..., Array]

    def __call__(self, t: ArrayLike, z: Float[Array, "N d"], args: Any) -> Array:
        return jax.vmap(self.field, in_axes=(None, 0, None))(t, z, args)


# What a field written for other shapes raises (a bad matmul, index, einsum).
_SHAPE_ERRORS = (TypeError, ValueError, IndexError)


def _fails(fn: Callable[[], Any]) -> bool:
    try:
        fn()
    except _SHAPE_ERRORS:
        return True
    return False


def _check_field(
    field: Callable[..., Array], batched: bool, shape: tuple[int, ...], dtype: Any
) -> None:
    """Evaluate `field` abstractly on the states it will see and check its output.

    A row-wise field sees the whole batch `shape = (N, d)`, a single-point field
    one row `(d,)`. When the call fails on one but works on the other, the error
    says which `batched=` to pass.
    """
    t = jax.ShapeDtypeStruct((), dtype)
    rows, point = (jax.ShapeDtypeStruct(s, dtype) for s in (shape, shape[-1:]))
    mine, other = (rows, point) if batched else (point, rows)
    kind = "the batch" if batched else "one point"

    def call(z):
        return jax.eval_shape(field, t, z, None)

    try:
        out = call(mine)
    except _SHAPE_ERRORS as e:
        if not _fails(lambda: call(other)):
            fix = "batched=False" if batched else "batched=True"
            raise ValueError(
                f"CNF: field(t, z, args) fails on {kind} z of shape {mine.shape} "
                f"but works on z of shape {other.shape}; pass `CNF(..., {fix})` "
                "(see the CNF docstring)."
            ) from e
        cls = TypeError if isinstance(e, TypeError) else ValueError
        raise cls(
            f"CNF: calling field(t, z, args) on {kind} z of shape {mine.shape} "
            f"failed: {e}"
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != mine.shape:
        got = out.shape if isinstance(out, jax.ShapeDtypeStruct) else out
        raise ValueError(
            f"CNF: field(t, z, args) must return dz/dt of the shape of z, "
            f"{mine.shape}, on {kind}; got {got}."
        )


def _check_key(key: Any) -> None:
    """Refuse anything but one PRNG key (new-style or raw uint32 key data)."""
    typed = isinstance(key, jax.Array) and jnp.issubdtype(
        key.dtype, jax.dtypes.prng_key
    )
    raw = eqx.is_array(key) and key.dtype == jnp.uint32
    if not (typed or raw):
        raise TypeError(
            f"`key` must be a PRNG key such as jax.random.key(0); got {key!r}."
        )
    if key.ndim != (0 if typed else 1):
        raise ValueError(
            f"`key` must be a single PRNG key; got a key array of shape {key.shape} "
            "(to use several keys, jax.vmap over them)."
        )


class _CNFDynamics(eqx.Module):
    """The augmented vector field of a CNF.

    State `(z, l)` or `(z, l, k, j)` with z of shape (N, d) and the rest (N,):
    dz/dt = f(t, z), dl/dt = -Tr(∂f/∂z), dk/dt = ‖f‖², dj/dt = ‖∂f/∂z‖²_F.
    `args` is the Hutchinson probe (None for the exact trace).
    """

    field: Callable[..., Array]
    trace: str = eqx.field(static=True)
    regularize: bool = eqx.field(static=True)

    def __call__(self, t, state, args):
        z = state[0]

        def fn(z):
            return self.field(t, z, None)

        if self.trace == "exact":
            f, tr, frob = exact_trace(fn, z)
        else:
            f, tr, frob = hutchinson_trace(fn, z, args)
        tr = tr.astype(z.dtype)
        if self.regularize:
            kinetic = jnp.sum(f**2, axis=-1)
            return f, -tr, kinetic, frob.astype(z.dtype)
        return f, -tr


def _data_dim(field: Callable[..., Array], dim: Any) -> int | None:
    """`dim`, or the field's integer `data_size` when `dim` is None."""
    field_dim = getattr(field, "data_size", None)
    if isinstance(field_dim, bool) or not isinstance(field_dim, int):
        field_dim = None
    if dim is None:
        return field_dim
    dim = check_int("dim", dim, 1)
    if field_dim is not None and field_dim != dim:
        raise ValueError(f"`dim={dim}` but the field's data_size is {field_dim}.")
    return dim


@final
class CNF(eqx.Module):
    r"""Continuous normalizing flow: a neural ODE transporting $\mathcal{N}(0, I)$.

    Samples are $x = z(t_1)$ where $z(t_0) \sim \mathcal{N}(0, I)$ and
    $\dot z = f_\theta(t, z)$. By the instantaneous change of variables
    (Chen et al. 2018) the log density along a trajectory obeys
    $\frac{d}{dt}\log p(z(t)) = -\mathrm{Tr}\,\frac{\partial f}{\partial z}$, so

    $$\log p_{t_1}(x) = \log \mathcal{N}(z(t_0); 0, I)
      - \int_{t_0}^{t_1} \mathrm{Tr}\,\frac{\partial f}{\partial z}(t, z(t))\,dt,$$

    computed by integrating the augmented state $[z, \Delta\log p]$ backward
    from $x$ at $t_1$ to $t_0$. The trace is exact (one batched forward-mode
    product per dimension) or Hutchinson's estimate
    $\varepsilon^\top \frac{\partial f}{\partial z}\varepsilon$ with a probe
    $\varepsilon$ drawn once per solve (FFJORD, Grathwohl et al. 2019).

    The field may be written for one point, $z$ of shape (d,) (the JAX habit,
    e.g. `lambda t, z, args: A @ z`), and is then mapped over the batch with
    `jax.vmap`; or it may act row-wise on states of shape (N, d), row $n$ of
    $f$ depending on row $n$ of $z$ only (`neuralode.nn.MLPField`,
    `neuralode.nn.ConcatSquashMLP`), and is then called on the whole batch.
    Both give the same densities. Which one a field is cannot be told from
    shapes (`A @ z` accepts (d,) and, wrongly, (d, d)), so it is declared:
    `batched=None` (default) treats neuralode's own fields as row-wise and any
    other callable as written for one point; pass `batched=True` for a custom
    row-wise field (e.g. one that only accepts (N, d)), `batched=False` to map
    any field over the rows.

    A batch of points is integrated as one ODE (one shared step size); to give
    every point its own adaptive steps, `jax.vmap` `log_prob` over single
    points instead (with `trace="hutchinson"`, map over one key per point too).

    **Arguments:**

    - `field`: the vector field `field(t, z, args)` (called with `args=None`),
      written for one point or acting row-wise (see `batched`).
    - `batched`: True if `field` acts row-wise on (N, d), False if it is
      written for one point (d,), None (default) for True exactly when `field`
      is a `neuralode.nn.MLPField` or `neuralode.nn.ConcatSquashMLP`.
    - `t0`, `t1`: the times of the base and the data distribution, `t0 < t1`.
    - `trace`: `"exact"` (default) or `"hutchinson"`.
    - `noise`: the Hutchinson probe distribution, `"rademacher"` (default) or
      `"gaussian"`.
    - `solver`: the Runge–Kutta solver (default `Dopri5()`).
    - `rtol`, `atol`: tolerances (default 1e-5 both, as in FFJORD).
    - `adjoint`: how gradients are computed (default
      `BacksolveAdjoint(checkpoints=0)`: on the short horizon of a CNF,
      resetting the reconstructed state at intermediate checkpoints costs more
      backward steps than it saves in accuracy).
    - `dt0`: the initial step size, or None to select it automatically.
    - `max_steps`: the maximum number of solver steps.
    - `dim`: the data dimension $d$; taken from `field.data_size` when omitted.
    - `throw`: raise `SolveError` when a solve fails (default). With False,
      log densities and samples of a failed solve are NaN (and so are their
      gradients), and the compiled program holds no host callback.

    **References:**

    Chen, Rubanova, Bettencourt, Duvenaud. *Neural Ordinary Differential
    Equations.* NeurIPS 2018.

    Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. *FFJORD: Free-form
    Continuous Dynamics for Scalable Reversible Generative Models.* ICLR 2019.

    Finlay, Jacobsen, Nurbekyan, Oberman. *How to Train Your Neural ODE: the
    World of Jacobian and Kinetic Regularization.* ICML 2020.
    """

    field: Callable[..., Array]
    t0: float
    t1: float
    solver: AbstractSolver
    rtol: float
    atol: float
    adjoint: AbstractAdjoint
    dt0: float | None
    max_steps: int = eqx.field(static=True)
    trace: str = eqx.field(static=True)
    noise: str = eqx.field(static=True)
    dim: int | None = eqx.field(static=True)
    batched: bool = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        field: Callable[..., Array],
        *,
        t0: float = 0.0,
        t1: float = 1.0,
        trace: Literal["exact", "hutchinson"] = "exact",
        noise: Literal["rademacher", "gaussian"] = "rademacher",
        solver: AbstractSolver | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: AbstractAdjoint | None = None,
        dt0: float | None = None,
        max_steps: int = 4096,
        dim: int | None = None,
        batched: bool | None = None,
        throw: bool = True,
    ):
        if not callable(field):
            raise TypeError(f"`field` must be callable; got {type(field).__name__}.")
        if trace not in _TRACES:
            raise ValueError(f"Unknown trace {trace!r}; expected one of {_TRACES}.")
        if noise not in _NOISES:
            raise ValueError(f"Unknown noise {noise!r}; expected one of {_NOISES}.")
        start, end = concrete_time("t0", t0), concrete_time("t1", t1)
        if start is not None and end is not None and start >= end:
            raise ValueError(f"Need t0 < t1; got t0={start}, t1={end}.")
        max_steps = check_int("max_steps", max_steps, 1)
        if batched is None:
            batched = isinstance(field, _ROW_WISE_FIELDS)
        elif not isinstance(batched, bool):
            raise TypeError(f"`batched` must be True, False or None; got {batched!r}.")
        self.field = field
        self.batched = batched
        self.t0 = t0
        self.t1 = t1
        self.trace = trace
        self.noise = noise
        self.solver = Dopri5() if solver is None else solver
        self.rtol = rtol
        self.atol = atol
        if adjoint is None:
            adjoint = BacksolveAdjoint(checkpoints=0)
        self.adjoint = adjoint
        self.dt0 = dt0
        self.max_steps = max_steps
        self.dim = _data_dim(field, dim)
        self.throw = check_throw(throw)

    # ------------------------------------------------------------------ helpers

    def _row_field(self, shape: tuple[int, ...], dtype: Any) -> Callable[..., Array]:
        """The field acting on the rows of states of `shape` (N, d), checked."""
        _check_field(self.field, self.batched, shape, dtype)
        return self.field if self.batched else _MapOverRows(self.field)

    def _points(
        self, x: ArrayLike, name: str
    ) -> tuple[Float[Array, "N d"], tuple[int, ...]]:
        """`x` as a float array of shape (N, d) and the batch shape to restore."""
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            raise TypeError(f"`{name}` must be real; got dtype {x.dtype}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(_default_float())
        if x.ndim == 0 or (self.dim is not None and x.shape[-1] != self.dim):
            d = "d" if self.dim is None else self.dim
            raise ValueError(f"`{name}` must have shape (..., {d}); got {x.shape}.")
        return x.reshape(-1, x.shape[-1]), x.shape[:-1]

    def _base_sample(
        self, key: PRNGKeyArray, num: int, dtype: Any
    ) -> Float[Array, "num d"]:
        """`num` draws of $z \\sim \\mathcal{N}(0, I)$, after checking the arguments."""
        _check_key(key)
        num = check_int("num", num, 1)
        dtype = _default_float() if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`dtype` must be a real floating dtype; got {dtype}.")
        return jr.normal(key, (num, self._dim_for_sampling()), dtype)

    def _solve(self, state, ts, probe, regularize):
        field = self._row_field(state[0].shape, state[0].dtype)
        dynamics = _CNFDynamics(field, self.trace, regularize)
        ys = solve(
            dynamics, state, ts, probe, throw=self.throw, **solver_options(self)
        ).ys
        return tuple(y[-1] for y in ys)

    def _probe(self, key, shape, dtype):
        if self.trace == "exact":
            return None
        if key is None:
            raise ValueError(
                "CNF(trace='hutchinson') needs a PRNG `key` to draw the probe."
            )
        _check_key(key)
        if self.noise == "rademacher":
            return jr.rademacher(key, shape, dtype=dtype)
        return jr.normal(key, shape, dtype)

    def _dim_for_sampling(self):
        if self.dim is None:
            raise ValueError(
                "The data dimension is unknown: pass `dim=` to CNF or use a field "
                "with an integer `data_size` attribute."
            )
        return self.dim

    def _times(self, dtype, backward):
        ts = [self.t1, self.t0] if backward else [self.t0, self.t1]
        return jnp.asarray(ts, dtype)

    # ------------------------------------------------------------------ public

    def log_prob(
        self,
        x: Float[ArrayLike, "*batch d"],
        *,
        key: PRNGKeyArray | None = None,
        regularize: bool = False,
    ) -> Any:
        r"""Log density $\log p_{t_1}(x)$ of the flow at the points `x`.

        Integrates $[z, \Delta\log p]$ (and, with `regularize=True`, the RNODE
        integrals) backward from $t_1$ to $t_0$ as one ODE over the whole
        batch. With `regularize=True` it also returns, per point, the kinetic
        energy $\int_{t_0}^{t_1}\lVert f\rVert^2\,dt$ and the Jacobian
        Frobenius norm $\int_{t_0}^{t_1}\lVert\partial f/\partial z\rVert_F^2\,dt$
        along the trajectory (Finlay et al. 2020): exact with
        `trace="exact"`, Hutchinson's estimate $\lVert\varepsilon^\top
        \partial f/\partial z\rVert^2$ with `trace="hutchinson"`.

        **Arguments:**

        - `x`: points of shape (..., d).
        - `key`: PRNG key for the Hutchinson probe (required with
          `trace="hutchinson"`, ignored otherwise).
        - `regularize`: also return the RNODE regularisers.

        **Returns:**

        The log density, shape `x.shape[:-1]`; with `regularize=True` the pair
        `(log_prob, {"kinetic": ..., "jacobian": ...})`, each of that shape.
        """
        z, batch_shape = self._points(x, "x")
        probe = self._probe(key, z.shape, z.dtype)
        zeros = jnp.zeros(z.shape[:1], z.dtype)
        state = (z, zeros, zeros, zeros) if regularize else (z, zeros)
        final = self._solve(state, self._times(z.dtype, True), probe, regularize)
        # Backward solve from t1 to t0: each extra component ends at
        # ∫_{t1}^{t0} (·) dt = -∫_{t0}^{t1} (·) dt.
        logp = _standard_normal_log_prob(final[0]) - final[1]
        logp = logp.reshape(batch_shape)
        if not regularize:
            return logp
        regs = {
            "kinetic": (-final[2]).reshape(batch_shape),
            "jacobian": (-final[3]).reshape(batch_shape),
        }
        return logp, regs

    def sample(
        self, key: PRNGKeyArray, num: int, *, dtype: Any = None
    ) -> Float[Array, "num d"]:
        """Draw `num` samples: push $z \\sim \\mathcal{N}(0, I)$ from $t_0$ to $t_1$.

        **Arguments:**

        - `key`: PRNG key.
        - `num`: the number of samples, an int >= 1.
        - `dtype`: float dtype of the samples (default: JAX's default float).

        **Returns:**

        Samples of shape (num, d).
        """
        return self.transform(self._base_sample(key, num, dtype))

    def transform(self, z0: Float[ArrayLike, "*batch d"]) -> Float[Array, "*batch d"]:
        """Push base points forward from $t_0$ to $t_1$ (the sampling map).

        **Arguments:**

        - `z0`: points of shape (..., d) in the base space.

        **Returns:**

        The transported points $z(t_1)$, same shape.
        """
        z, batch_shape = self._points(z0, "z0")
        ys = solve(
            self._row_field(z.shape, z.dtype),
            z,
            self._times(z.dtype, False),
            None,
            throw=self.throw,
            **solver_options(self),
        ).ys
        return ys[-1].reshape(batch_shape + z.shape[-1:])

    def sample_and_log_prob(
        self,
        key: PRNGKeyArray,
        num: int,
        *,
        dtype: Any = None,
    ) -> tuple[Float[Array, "num d"], Float[Array, " num"]]:
        r"""Draw samples and their log densities in one forward solve.

        Starts from $z(t_0) \sim \mathcal{N}(0, I)$ with
        $\ell(t_0) = \log\mathcal{N}(z(t_0); 0, I)$ and integrates
        $\dot\ell = -\mathrm{Tr}\,\partial f/\partial z$ alongside $z$ to $t_1$.

        **Arguments:**

        - `key`: PRNG key. The samples equal `sample(key, num)`; the
          Hutchinson probe is drawn from `jax.random.fold_in(key, 1)`.
        - `num`: the number of samples, an int >= 1.
        - `dtype`: float dtype (default: JAX's default float).

        **Returns:**

        `(samples, log_prob)` of shapes (num, d) and (num,).
        """
        z0 = self._base_sample(key, num, dtype)
        probe = self._probe(jr.fold_in(key, 1), z0.shape, z0.dtype)
        state = (z0, _standard_normal_log_prob(z0))
        z1, logp = self._solve(state, self._times(z0.dtype, False), probe, False)
        return z1, logp
