"""Baselines of the image density experiment: a Gaussian and flowjax's MAF.

Both model the preprocessed images (dequantised, logit-transformed,
standardised: `neuralode.experiments.digits_density.Preprocess`), the space in
which the CNF models them, so the log-Jacobian of the preprocessing is the same
for all three and their bits per dimension compare directly.

**References:**

- Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density
  Estimation." NeurIPS 2017.
- Ward, Kidger et al. flowjax (https://github.com/danielward27/flowjax).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

REAL_DATA_EXTRA = "pip install 'neuralode[real-data]'"


def require(module: str, purpose: str) -> None:
    """Raise `UsageError` naming the extra if `module` cannot be imported."""
    import importlib.util

    from ._output import UsageError

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{purpose} needs {module}: {REAL_DATA_EXTRA}")


class Gaussian(NamedTuple):
    """A full-covariance Gaussian fitted by maximum likelihood (closed form).

    - `mean`: (d,) the sample mean.
    - `cholesky`: (d, d) the lower Cholesky factor of the sample covariance
      (normalised by n, the maximum-likelihood estimate).
    """

    mean: Float[np.ndarray, " d"]
    cholesky: Float[np.ndarray, "d d"]

    @classmethod
    def fit(cls, x: Float[np.ndarray, "n d"]) -> Gaussian:
        """The maximum-likelihood Gaussian of the rows of `x` (in float64).

        **Raises:** `ValueError` for fewer rows than columns plus one (the
        covariance would be singular).
        """
        x = np.asarray(x, np.float64)
        n, d = x.shape
        if n <= d:
            raise ValueError(
                f"Gaussian.fit needs more points than dimensions, got {n} points "
                f"of dimension {d} (the covariance would be singular)."
            )
        mean = x.mean(axis=0)
        cov = (x - mean).T @ (x - mean) / n
        return cls(mean, np.linalg.cholesky(cov))

    @property
    def num_params(self) -> int:
        """Free parameters: d for the mean, d(d+1)/2 for the covariance."""
        d = self.mean.shape[0]
        return d + d * (d + 1) // 2

    def log_prob(self, x: Float[np.ndarray, "n d"]) -> Float[np.ndarray, " n"]:
        """log N(x; mean, cov) of each row, in float64."""
        x = np.asarray(x, np.float64)
        d = self.mean.shape[0]
        # Solve L v = (x - mean)^T for the Mahalanobis term.
        v = np.linalg.solve(self.cholesky, (x - self.mean).T)
        log_det = 2 * np.sum(np.log(np.diag(self.cholesky)))
        return -0.5 * (np.sum(v**2, axis=0) + log_det + d * math.log(2 * math.pi))

    def entropy(self) -> float:
        """Differential entropy ½ log det(2πe Σ) in nats: the mean negative
        log-likelihood of the very points it was fitted to."""
        d = self.mean.shape[0]
        log_det = 2 * np.sum(np.log(np.diag(self.cholesky)))
        return float(0.5 * (d * math.log(2 * math.pi * math.e) + log_det))


def make_maf(key: PRNGKeyArray, dim: int, *, layers: int, width: int) -> Any:
    """flowjax's masked autoregressive flow (affine transformers) on N(0, I)."""
    from flowjax.distributions import Normal
    from flowjax.flows import masked_autoregressive_flow

    base = Normal(jnp.zeros(dim, jnp.float32))
    return masked_autoregressive_flow(
        key, base_dist=base, flow_layers=layers, nn_width=width
    )


def _partition(flow: Any) -> tuple[Any, Any]:
    import paramax

    return eqx.partition(
        flow,
        eqx.is_inexact_array,
        is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable),
    )


def num_params(tree: Any) -> int:
    """The number of trainable array elements in `tree` (masked weights too)."""
    params = _partition(tree)[0] if _is_flowjax(tree) else tree
    leaves = jax.tree_util.tree_leaves(eqx.filter(params, eqx.is_inexact_array))
    return int(sum(leaf.size for leaf in leaves))


def _is_flowjax(tree: Any) -> bool:
    return type(tree).__module__.startswith("flowjax")


def maf_log_prob(flow: Any, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    """log p(x) of a flowjax distribution (its parameter wrappers unwrapped)."""
    import paramax

    return paramax.unwrap(flow).log_prob(x)


def maf_sample(flow: Any, key: PRNGKeyArray, num: int) -> Float[Array, "num d"]:
    """`num` samples of a flowjax distribution."""
    import paramax

    return paramax.unwrap(flow).sample(key, (num,))


class MAFResult(NamedTuple):
    """What `train_maf` returns: the flow at its best validation loss and a log."""

    flow: Any
    steps: int
    best_step: int
    train_seconds: float
    seconds_to_best: float
    history: list[dict[str, float]]


def train_maf(
    flow: Any,
    batches: Callable[[int], Float[Array, "b d"]],
    validation: Callable[[Any], float],
    *,
    lr: float,
    max_seconds: float,
    max_steps: int,
    eval_every: int,
    patience: int,
) -> MAFResult:
    """Train a flowjax flow by maximum likelihood within a wall-clock budget.

    Adam on the mean negative log-likelihood of `batches(i)`; every
    `eval_every` steps `validation(flow)` (a loss, lower is better) decides
    which parameters are kept, and training stops after `patience`
    evaluations without improvement, after `max_steps`, or once `max_seconds`
    have passed (measured from the start, compilation included, as the CNF's
    training time is).
    """
    params, static = _partition(flow)
    optimiser = optax.adam(lr)
    opt_state = optimiser.init(params)

    @eqx.filter_jit
    def step(params, opt_state, x):
        def loss_fn(p):
            return -jnp.mean(maf_log_prob(eqx.combine(p, static), x))

        loss, grads = eqx.filter_value_and_grad(loss_fn)(params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    tic = time.perf_counter()
    best = (math.inf, params, 0, 0.0)
    history: list[dict[str, float]] = []
    bad = 0
    i = 0
    while i < max_steps:
        params, opt_state, loss = step(params, opt_state, batches(i))
        i += 1
        if i % eval_every == 0 or i == max_steps:
            val = validation(eqx.combine(params, static))
            elapsed = time.perf_counter() - tic
            history.append({"step": i, "loss": float(loss), "valid": val})
            if val < best[0]:
                best, bad = (val, params, i, elapsed), 0
            else:
                bad += 1
            if bad >= patience or elapsed >= max_seconds:
                break
    seconds = time.perf_counter() - tic
    return MAFResult(
        eqx.combine(best[1], static), i, best[2], seconds, best[3], history
    )
