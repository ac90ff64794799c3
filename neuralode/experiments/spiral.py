"""`spiral`: the latent ODE of Chen et al. (2018, §5) on irregularly sampled spirals.

Each training example is a 2-D spiral observed with noise at a random subset
of the first half of its time window. A GRU run backward in time over the
observations (each input is the observation and the time gap to the next
one) gives the approximate posterior
$q(z_0 \\mid x) = \\mathcal{N}(\\mu, \\operatorname{diag}\\sigma^2)$; a sample
$z_0$ is evolved by the latent ODE $\\dot z = f_\\theta(z)$ (a `NeuralODE`, the
whole batch as one ODE with outputs at every grid time, read off the dense
output); a decoder maps $z(t_i)$ to the mean of $p(x_i \\mid z(t_i)) =
\\mathcal{N}(\\cdot, s^2 I)$. Training maximises the ELBO

$$\\sum_i \\log p(x_i \\mid z(t_i)) - \\mathrm{KL}\\big(q(z_0 \\mid x)\\,\\|\\,
\\mathcal{N}(0, I)\\big).$$

On held-out spirals the posterior mean $z_0$ gives reconstructions of the
observed half and extrapolations over the unobserved half; both are scored
against the noiseless spiral.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

import neuralode as no

from ._checkpoint import TrainState
from ._latent_model import LatentODEBase
from ._output import UsageError
from ._plotting import new_figure, plot_loss, save_figure
from ._run import (
    Run,
    add_common_arguments,
    add_tolerance_arguments,
    positive_float,
    positive_int,
)
from ._training import batch_indices

NAME = "spiral"
HELP = "latent ODE on irregularly sampled noisy spirals (paper section 5)"
DTYPE = jnp.float32
STEPS = 6000
QUICK = {
    "steps": 4,
    "num_train": 32,
    "num_test": 8,
    "batch_size": 8,
    "hidden": 8,
    "width": 8,
    "window": 40,
    "num_obs": 8,
}


class Observations(NamedTuple):
    """Spirals observed at `idx` (sorted grid indices, the first one 0).

    - `ts`: (W,) the fine time grid of a window.
    - `idx`: (N, P) observed grid indices, all in the first half.
    - `ys`: (N, P, 2) noisy observations.
    - `clean`: (N, W, 2) the noiseless spirals on the whole grid.
    """

    ts: Float[np.ndarray, " W"]
    idx: Int[np.ndarray, "N P"]
    ys: Float[np.ndarray, "N P 2"]
    clean: Float[np.ndarray, "N W 2"]


def make_data(
    num: int, num_obs: int, window: int, noise: float, key: PRNGKeyArray
) -> Observations:
    """Draw `num` spirals, each observed at `num_obs` times in its first half."""
    k_data, k_idx = jr.split(key)
    data = no.datasets.spiral(
        num, window, window=window, noise_std=noise, key=k_data, dtype=DTYPE
    )
    half = window // 2
    # A random subset of grid points 1..half-1 per spiral, plus the start.
    scores = jr.uniform(k_idx, (num, half - 1))
    rest = jnp.sort(jnp.argsort(scores, axis=1)[:, : num_obs - 1], axis=1) + 1
    idx = np.concatenate([np.zeros((num, 1), np.int32), np.asarray(rest)], axis=1)
    ys = np.take_along_axis(np.asarray(data.ys), idx[..., None], axis=1)
    return Observations(np.asarray(data.ts_grid), idx, ys, np.asarray(data.ys_grid))


class LatentODE(LatentODEBase):
    """GRU encoder (backward in time) → latent `NeuralODE` → MLP decoder."""

    INPUTS = 3  # an observation (x, y) and the time to the next one
    OUTPUTS = 2

    def __init__(self, latent, hidden, width, *, rtol, atol, key):
        super().__init__(latent, hidden, width, rtol=rtol, atol=atol, key=key)

    def encode(
        self, ts: Float[Array, " P"], ys: Float[Array, "P 2"]
    ) -> tuple[Array, Array]:
        """Mean and log-variance of q(z0) for one spiral's observations."""
        gaps = jnp.diff(ts, append=ts[-1:])  # time to the next observation
        inputs = jnp.concatenate([ys, gaps[:, None]], axis=-1)[::-1]

        def scan_fn(h, x):
            return self.cell(x, h), None

        h0 = jnp.zeros(self.cell.hidden_size, DTYPE)
        h, _ = jax.lax.scan(scan_fn, h0, inputs)
        return self.posterior(h)

    def decode_path(self, z0: Float[Array, "B L"], ts: Float[Array, " T"]) -> Array:
        """Decoded means at every time of `ts` for a batch of z0: (B, T, 2)."""
        return self.decoded(z0, ts)


def _elbo(model: LatentODE, ts, idx, ys, noise: float, key) -> tuple[Array, Array]:
    """Mean negative ELBO per observation and the reconstruction MSE."""
    obs_ts = ts[idx]  # (B, P)
    mean, logvar = jax.vmap(model.encode)(obs_ts, ys)
    eps = jr.normal(key, mean.shape, DTYPE)
    z0 = mean + jnp.exp(0.5 * logvar) * eps
    half = ts[: ts.shape[0] // 2]
    pred = model.decode_path(z0, half)  # (B, H, 2)
    pred = jnp.take_along_axis(pred, idx[..., None], axis=1)
    sq = jnp.sum((pred - ys) ** 2, axis=-1)
    loglik = -0.5 * sq / noise**2 - math.log(2 * math.pi * noise**2)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1 - logvar, axis=-1)
    neg_elbo = jnp.mean(kl - jnp.sum(loglik, axis=-1)) / idx.shape[1]
    return neg_elbo, jnp.mean(sq) / 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the spiral experiment."""
    parser.add_argument(
        "--num-train", type=positive_int, default=512, help="training spirals"
    )
    parser.add_argument(
        "--num-test", type=positive_int, default=100, help="held-out spirals"
    )
    parser.add_argument(
        "--num-obs",
        type=positive_int,
        default=30,
        help="observations per spiral in the first half of its window",
    )
    parser.add_argument(
        "--window",
        type=positive_int,
        default=150,
        help="points of the time grid of each spiral",
    )
    parser.add_argument(
        "--noise",
        type=positive_float,
        default=0.1,
        help="standard deviation of the observation noise",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        help="spirals per training step (at most --num-train)",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=1e-2, help="initial learning rate"
    )
    parser.add_argument(
        "--latent", type=positive_int, default=4, help="size of the latent state"
    )
    parser.add_argument(
        "--hidden", type=positive_int, default=25, help="size of the GRU encoder"
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        default=32,
        help="width of the latent vector field and the decoder",
    )
    add_tolerance_arguments(parser, rtol=1e-3, atol=1e-4)
    add_common_arguments(parser, steps=STEPS, quick_steps=QUICK["steps"])


def configure(args: argparse.Namespace) -> None:
    """Check --num-obs; clip --batch-size to --num-train, the size actually used."""
    if not 2 <= args.num_obs <= args.window // 2:
        raise UsageError(
            f"--num-obs must be in [2, window/2 = {args.window // 2}], "
            f"got {args.num_obs}"
        )
    args.batch_size = min(args.batch_size, args.num_train)


def _split(key: PRNGKeyArray) -> Array:
    """The train-data, test-data, model, data-order and training keys of a run."""
    return jr.split(key, 5)


def build(
    args: argparse.Namespace, key: PRNGKeyArray
) -> tuple[LatentODE, optax.GradientTransformation]:
    """The latent ODE and its optimiser (clipped Adam, cosine decay)."""
    model = LatentODE(
        args.latent,
        args.hidden,
        args.width,
        rtol=args.rtol,
        atol=args.atol,
        key=_split(key)[2],
    )
    schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05)
    return model, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def run(ctx: Run) -> dict[str, Any]:
    """Train the latent ODE on the ELBO and score it on held-out spirals."""
    args = ctx.args
    data_key, test_key, _, order_key, train_key = _split(ctx.key)
    train_data = make_data(
        args.num_train, args.num_obs, args.window, args.noise, data_key
    )
    test_data = make_data(
        args.num_test, args.num_obs, args.window, args.noise, test_key
    )
    batch_size = args.batch_size
    optimiser = ctx.optimiser
    state = ctx.parallel.replicate(ctx.state)
    ts = jnp.asarray(train_data.ts)
    noise = args.noise

    @eqx.filter_jit
    def step(state: TrainState, batch, key):
        idx, ys = batch
        (loss, mse), grads = eqx.filter_value_and_grad(_elbo, has_aux=True)(
            state.model, ts, idx, ys, noise, key
        )
        params = eqx.filter(state.model, eqx.is_array)
        updates, opt_state = optimiser.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
        return TrainState(model, opt_state, state.step + 1), {
            "loss": loss,
            "recon_mse": mse,
        }

    def batch_fn(i: int):
        rows = batch_indices(order_key, i, args.num_train, batch_size)
        return ctx.parallel.shard((train_data.idx[rows], train_data.ys[rows]))

    state, summary = ctx.train(state, step, batch_fn, train_key)
    pred = eqx.filter_jit(_predict)(state.model, test_data)
    pred = np.asarray(pred)
    half = args.window // 2
    err = np.sum((pred - test_data.clean) ** 2, axis=-1)  # (N, W)
    obs_err = np.take_along_axis(err, test_data.idx, axis=1)
    metrics = {
        "steps": int(state.step),
        "train_seconds": summary["train_seconds"],
        "compile_seconds": summary["compile_seconds"],
        "steps_per_second": summary["steps_per_second"],
        "devices": ctx.parallel.num_devices,
        "test_reconstruction_mse_at_observations": float(obs_err.mean() / 2),
        "test_reconstruction_mse": float(err[:, :half].mean() / 2),
        "test_extrapolation_mse": float(err[:, half:].mean() / 2),
        "noise_variance": args.noise**2,
        "observed_time": float(test_data.ts[half - 1]),
        "extrapolated_time": float(test_data.ts[-1]),
        "history": summary["history"][-200:],
    }
    metrics |= _extrapolation_breakdown(err, test_data.clean, half)
    if summary["history"]:
        plot_loss(summary["history"], ctx.directory / "loss.png", "-ELBO / obs.")
    _plot(test_data, pred, half, ctx.directory / "spirals.png")
    return metrics


def _extrapolation_breakdown(
    err: np.ndarray, clean: np.ndarray, half: int
) -> dict[str, Any]:
    """Where the extrapolation error comes from.

    It is scored against the noiseless spiral, so the noise variance is no
    floor for it; what sets it is the horizon (an error in the inferred
    angular speed, phase or radial growth grows along the extrapolated half)
    and the radius (the same angular error is a larger distance on an outer
    turn). Reported: the MSE in each quarter of the extrapolated half, the
    MSE relative to the mean squared distance of the true points from the
    origin (a fraction of the signal), and the MSE of the spirals whose
    extrapolated half lies beyond the median radius against the rest.
    """
    future = err[:, half:]  # (N, W - half) squared errors summed over x, y
    quarters = np.array_split(np.arange(future.shape[1]), 4)
    radius = np.sqrt(np.sum(clean[:, half:] ** 2, axis=-1)).mean(axis=1)
    outer = radius > np.median(radius)
    return {
        "test_extrapolation_mse_by_quarter": [
            float(future[:, q].mean() / 2) for q in quarters
        ],
        "test_extrapolation_relative_mse": float(
            future.mean() / np.mean(np.sum(clean[:, half:] ** 2, axis=-1))
        ),
        "test_extrapolation_mse_outer_half": float(future[outer].mean() / 2),
        "test_extrapolation_mse_inner_half": float(future[~outer].mean() / 2),
    }


def _predict(model: LatentODE, data: Observations) -> Array:
    """Decoded trajectories on the whole grid from the posterior means."""
    ts = jnp.asarray(data.ts)
    obs_ts = ts[jnp.asarray(data.idx)]
    mean, _ = jax.vmap(model.encode)(obs_ts, jnp.asarray(data.ys))
    return model.decode_path(mean, ts)


def _plot(data: Observations, pred: np.ndarray, half: int, path: Path) -> None:
    """Observations, reconstructions and extrapolations of a few test spirals."""
    num = min(4, len(pred))
    fig, axes = new_figure(num, size=3.2)
    for i, ax in enumerate(axes[:num]):
        ax.plot(*data.clean[i].T, color="0.75", lw=3, label="true spiral")
        ax.scatter(*data.ys[i].T, s=10, color="k", zorder=3, label="observations")
        ax.plot(*pred[i, :half].T, color="C0", lw=1.5, label="reconstruction")
        ax.plot(*pred[i, half - 1 :].T, "--", color="C3", lw=1.5, label="extrapolation")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="lower left")
    save_figure(fig, path)
