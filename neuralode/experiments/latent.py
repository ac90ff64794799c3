"""`latent`: a latent ODE on the Mauna Loa weekly CO₂ record (real, with gaps).

Windows of four years of the weekly record (statsmodels' `co2`, 1958–2001,
missing weeks included) are the examples: the model sees a random half of the
measured weeks of the first three years and must give the CO₂ at every other
measured week of the window, the held-out weeks of the first three years
(interpolation) and the whole fourth year (extrapolation). Each window is
centred on the mean of what is seen and scaled by a fixed 5 ppm.

The latent ODE of Rubanova et al. (2019), as in the `spiral` experiment: a GRU
run backward in time over the seen weeks (input: the value and the gap to the
next seen week) gives $q(z_0 \\mid x) = \\mathcal{N}(\\mu, \\operatorname{diag}
\\sigma^2)$; $\\dot z = f_\\theta(z)$ carries $z_0$ through the window (one
solve for the whole batch, the outputs read off the dense output); a decoder
maps $z(t)$ to the mean of $\\mathcal{N}(\\cdot, s^2)$. Training maximises the
ELBO over every measured week of the window.

Baselines in the same run, scored on the same windows and seen weeks:

- RNN-Δt: a GRU run forward over the seen weeks, input the value and the time
  since the previous seen week; the CO₂ at any time comes from a read-out of
  the state after the last seen week before it and the time since that week.
  Trained alongside the latent ODE (same steps, batches and optimiser, losses
  added; the two share no parameters).
- ETS: statsmodels' Holt–Winters exponential smoothing (additive trend and
  52-week season) fitted to each test window's seen weeks regularised onto
  the weekly grid by linear interpolation, forecasting the fourth year; its
  interpolation is that linear interpolation.

Training windows end before 1990; test windows start every half year from
1990 to 1998. Errors are in ppm².
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from neuralode.datasets import CO2Windows, co2_windows, mauna_loa_co2, week_of_year

from ._checkpoint import TrainState
from ._density_baselines import require
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

NAME = "latent"
HELP = "latent ODE on the Mauna Loa weekly CO2 record (Rubanova et al. 2019)"
DTYPE = jnp.float32
STEPS = 4000
QUICK = {
    "steps": 3,
    "batch_size": 4,
    "latent": 3,
    "hidden": 8,
    "width": 8,
    "num_test": 1,
}
SEEN_WEEKS = 156  # three years seen (in part) ...
FORECAST_WEEKS = 52  # ... and one year forecast
SCALE = 5.0  # ppm: the unit of the model's values
TRAIN_END = 1990.0  # training windows end before this year
TEST_START, TEST_STEP = 1990.0, 0.5  # test windows start here, every half year
PLOTTED = 3  # test windows in the plot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the latent experiment."""
    parser.add_argument(
        "--data", default="co2", choices=("co2",), help="the series (Mauna Loa CO2)"
    )
    parser.add_argument(
        "--seen-fraction",
        type=positive_float,
        default=0.5,
        help="fraction of the measured weeks of the first three years that the "
        "models see",
    )
    parser.add_argument(
        "--num-test",
        type=positive_int,
        default=17,
        help="test windows, every half year from 1990 (at most 17)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="windows per step"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=3e-3, help="initial learning rate"
    )
    parser.add_argument(
        "--latent", type=positive_int, default=6, help="size of the latent state"
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        default=32,
        help="size of the GRU of the encoder and of the RNN-dt baseline",
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        default=48,
        help="width of the latent vector field, the decoder and the read-out",
    )
    parser.add_argument(
        "--noise",
        type=positive_float,
        default=0.05,
        help="standard deviation s of the latent ODE's likelihood, in units of 5 ppm",
    )
    add_tolerance_arguments(parser, rtol=1e-3, atol=1e-4)
    add_common_arguments(parser, steps=STEPS, quick_steps=QUICK["steps"])


def _test_starts(year: np.ndarray, num: int) -> np.ndarray:
    """First weeks of the test windows: every half year from 1990 that fits."""
    length = SEEN_WEEKS + FORECAST_WEEKS
    starts = []
    for i in range(num):
        first = int(np.searchsorted(year, TEST_START + i * TEST_STEP))
        if first + length > len(year):
            break
        starts.append(first)
    return np.asarray(starts)


def configure(args: argparse.Namespace) -> None:
    """Check --seen-fraction, --num-test and that statsmodels is installed."""
    require("statsmodels", "latent --data co2 (the data and the ETS baseline)")
    if not 0.0 < args.seen_fraction < 1.0:
        raise UsageError(f"--seen-fraction must be in (0, 1), got {args.seen_fraction}")
    most = len(_test_starts(mauna_loa_co2().year, 10**6))
    if args.num_test > most:
        raise UsageError(f"--num-test must be at most {most}, got {args.num_test}")


class Windows(NamedTuple):
    """Windows with the models' view of them (in units of SCALE around `offset`).

    - `y`: (N, W) scaled values (0 where not measured).
    - `seen`: (N, W) the weeks the models see (measured, first three years).
    - `target`: (N, W) the weeks they are scored on (measured, not seen).
    - `offset`: (N,) ppm subtracted before scaling (the mean of the seen weeks).
    """

    y: Float[Array, "N W"]
    seen: Bool[Array, "N W"]
    target: Bool[Array, "N W"]
    offset: Float[Array, " N"]


def view(
    ppm: Float[Array, "N W"],
    measured: Bool[Array, "N W"],
    seen_fraction: float,
    key: PRNGKeyArray,
) -> Windows:
    """Draw which measured weeks of the first three years are seen; scale."""
    draw = jr.uniform(key, measured.shape) < seen_fraction
    first = jnp.arange(measured.shape[1]) < SEEN_WEEKS
    seen = measured & first & draw
    # At least the first measured week is seen, so no window is seen empty.
    first_measured = jnp.argmax(measured, axis=1)
    seen = seen.at[jnp.arange(len(seen)), first_measured].set(True)
    count = jnp.sum(seen, axis=1).astype(ppm.dtype)
    offset = jnp.sum(jnp.where(seen, ppm, 0.0), axis=1) / count
    y = jnp.where(measured, (ppm - offset[:, None]) / SCALE, 0.0).astype(DTYPE)
    return Windows(y, seen, measured & ~seen, offset)


class LatentODE(LatentODEBase):
    """Backward GRU encoder over the seen weeks → latent `NeuralODE` → decoder."""

    INPUTS = 2  # a seen week's value and the time to the next seen week
    OUTPUTS = 1

    def __init__(self, latent, hidden, width, *, rtol, atol, key):
        super().__init__(latent, hidden, width, rtol=rtol, atol=atol, key=key)

    def encode(self, t, y, seen) -> tuple[Array, Array]:
        """Mean and log-variance of q(z0) from one window's seen weeks."""

        def scan_fn(carry, x):
            h, t_next = carry
            ti, yi, si = x
            gap = jnp.where(jnp.isfinite(t_next), t_next - ti, 0.0)
            h_new = self.cell(jnp.stack([yi, gap]).astype(DTYPE), h)
            return (jnp.where(si, h_new, h), jnp.where(si, ti, t_next)), None

        h0 = jnp.zeros(self.cell.hidden_size, DTYPE)
        carry0 = (h0, jnp.asarray(jnp.inf, DTYPE))
        (h, _), _ = jax.lax.scan(scan_fn, carry0, (t, y, seen), reverse=True)
        return self.posterior(h)

    def decode(self, z0: Float[Array, "B L"], t: Float[Array, " W"]) -> Array:
        """Decoded values at every time of `t` for a batch of z0: (B, W)."""
        return self.decoded(z0, t)[..., 0]


class RNNDeltaT(eqx.Module):
    """The RNN-Δt baseline: a GRU over the seen weeks with time gaps as input.

    The prediction at time t is a read-out of the state after the last seen
    week before t and of the time since that week; at a seen week it is made
    before that week is read.
    """

    cell: eqx.nn.GRUCell
    readout: eqx.nn.MLP

    def __init__(self, hidden, width, *, key):
        k1, k2 = jr.split(key)
        self.cell = eqx.nn.GRUCell(2, hidden, key=k1, dtype=DTYPE)
        self.readout = eqx.nn.MLP(
            hidden + 1, 1, width, 1, activation=jax.nn.elu, key=k2, dtype=DTYPE
        )

    def __call__(self, t, y, seen) -> Float[Array, " W"]:
        """Predictions at every time of `t` for one window."""

        def scan_fn(carry, x):
            h, t_last = carry
            ti, yi, si = x
            gap = (ti - t_last).astype(DTYPE)
            pred = self.readout(jnp.concatenate([h, gap[None]]))[0]
            h_new = self.cell(jnp.stack([yi, gap]).astype(DTYPE), h)
            carry = (jnp.where(si, h_new, h), jnp.where(si, ti, t_last))
            return carry, pred

        h0 = jnp.zeros(self.cell.hidden_size, DTYPE)
        _, preds = jax.lax.scan(scan_fn, (h0, jnp.asarray(0.0, DTYPE)), (t, y, seen))
        return preds


class Models(eqx.Module):
    """The trained pair: the latent ODE and the RNN-Δt baseline."""

    latent_ode: LatentODE
    rnn: RNNDeltaT


def _split(key: PRNGKeyArray) -> Array:
    """The model, data-order, training and test-view keys of a run."""
    return jr.split(key, 4)


def build(
    args: argparse.Namespace, key: PRNGKeyArray
) -> tuple[Models, optax.GradientTransformation]:
    """The two models and their optimiser (Adam, cosine decay)."""

    # Initialised in one compiled program rather than one per parameter shape.
    @eqx.filter_jit
    def init(key):
        k_ode, k_rnn = jr.split(key)
        latent_ode = LatentODE(
            args.latent,
            args.hidden,
            args.width,
            rtol=args.rtol,
            atol=args.atol,
            key=k_ode,
        )
        return Models(latent_ode, RNNDeltaT(args.hidden, args.width, key=k_rnn))

    schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05)
    return init(_split(key)[0]), optax.adam(schedule)


def _latent_loss(model: LatentODE, t, w: Windows, noise: float, key):
    """Negative ELBO per scored week, and the mean squared error of the means."""
    mean, logvar = jax.vmap(model.encode, in_axes=(None, 0, 0))(t, w.y, w.seen)
    z0 = mean + jnp.exp(0.5 * logvar) * jr.normal(key, mean.shape, DTYPE)
    pred = model.decode(z0, t)
    scored = (w.seen | w.target).astype(DTYPE)
    sq = (pred - w.y) ** 2
    loglik = -0.5 * sq / noise**2 - 0.5 * math.log(2 * math.pi * noise**2)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1 - logvar, axis=-1)
    count = jnp.sum(scored)
    neg_elbo = (jnp.sum(kl) - jnp.sum(loglik * scored)) / count
    return neg_elbo, jnp.sum(sq * scored) / count


def _rnn_predict(model: RNNDeltaT, t, w: Windows) -> Float[Array, "N W"]:
    return jax.vmap(model, in_axes=(None, 0, 0))(t, w.y, w.seen)


def _rnn_loss(model: RNNDeltaT, t, w: Windows):
    pred = _rnn_predict(model, t, w)
    scored = (w.seen | w.target).astype(DTYPE)
    return jnp.sum((pred - w.y) ** 2 * scored) / jnp.sum(scored)


def _clip(grads, norm: float = 1.0):
    """Scale `grads` down to global norm `norm` (one model's gradients)."""
    g = optax.tree.norm(grads)
    return jax.tree_util.tree_map(lambda x: x * jnp.minimum(1.0, norm / g), grads)


def run(ctx: Run) -> dict[str, Any]:
    """Train the latent ODE and the RNN-Δt, fit ETS, score all on test windows."""
    args = ctx.args
    _, order_key, train_key, view_key = _split(ctx.key)
    series = mauna_loa_co2()
    length = SEEN_WEEKS + FORECAST_WEEKS
    last_train = week_of_year(series, TRAIN_END) - length
    train = co2_windows(series, np.arange(last_train + 1), length)
    test = co2_windows(series, _test_starts(series.year, args.num_test), length)
    t = jnp.asarray(train.t, DTYPE)
    train_ppm = jnp.asarray(train.ppm, DTYPE)
    train_measured = jnp.asarray(train.measured)
    optimiser = ctx.optimiser
    state = ctx.parallel.replicate(ctx.state)
    noise, fraction = args.noise, args.seen_fraction

    @eqx.filter_jit
    def step(state: TrainState, rows, key):
        k_view, k_z = jr.split(key)
        w = view(train_ppm[rows], train_measured[rows], fraction, k_view)

        def loss_fn(models):
            neg_elbo, mse = _latent_loss(models.latent_ode, t, w, noise, k_z)
            rnn_mse = _rnn_loss(models.rnn, t, w)
            return neg_elbo + rnn_mse / (2 * noise**2), (neg_elbo, mse, rnn_mse)

        (loss, (neg_elbo, mse, rnn_mse)), grads = eqx.filter_value_and_grad(
            loss_fn, has_aux=True
        )(state.model)
        grads = Models(_clip(grads.latent_ode), _clip(grads.rnn))
        params = eqx.filter(state.model, eqx.is_array)
        updates, opt_state = optimiser.update(grads, state.opt_state, params)
        models = eqx.apply_updates(state.model, updates)
        logs = {"loss": loss, "neg_elbo": neg_elbo, "mse": mse, "rnn_mse": rnn_mse}
        return TrainState(models, opt_state, state.step + 1), logs

    num_train = len(train.start)

    def batch_fn(i: int):
        key = jr.fold_in(order_key, i)
        return ctx.parallel.shard(jr.randint(key, (args.batch_size,), 0, num_train))

    state, summary = ctx.train(state, step, batch_fn, train_key)
    models = state.model
    w = jax.jit(view, static_argnums=2)(
        jnp.asarray(test.ppm, DTYPE), jnp.asarray(test.measured), fraction, view_key
    )
    seen, target = np.asarray(w.seen), np.asarray(w.target)
    future = np.arange(length) >= SEEN_WEEKS
    interp_mask, extrap_mask = target & ~future, target & future
    truth = test.ppm

    latent_ppm, band, nfe = _latent_predictions(models.latent_ode, t, w)
    rnn_pred = eqx.filter_jit(_rnn_predict)(models.rnn, t, w)
    rnn_ppm = np.asarray(rnn_pred) * SCALE + np.asarray(w.offset)[:, None]
    tic = time.perf_counter()
    ets_ppm = _ets_predictions(test.t, truth, seen)
    ets_seconds = time.perf_counter() - tic

    def mse(pred: np.ndarray, mask: np.ndarray) -> float:
        return float(np.sum((pred - truth) ** 2 * mask) / np.sum(mask))

    metrics: dict[str, Any] = {
        "data": "co2",
        "steps": int(state.step),
        "train_seconds": summary["train_seconds"],
        "compile_seconds": summary["compile_seconds"],
        "steps_per_second": summary["steps_per_second"],
        "devices": ctx.parallel.num_devices,
        "num_train_windows": num_train,
        "num_test_windows": len(test.start),
        "test_window_start_years": [round(float(y), 3) for y in test.start_year],
        "seen_weeks_per_window": float(seen.sum(axis=1).mean()),
        "interpolation_weeks": int(interp_mask.sum()),
        "extrapolation_weeks": int(extrap_mask.sum()),
        "units": "ppm^2",
    }
    for name, pred in (("latent_ode", latent_ppm), ("rnn_dt", rnn_ppm)):
        metrics[f"{name}_interpolation_mse"] = mse(pred, interp_mask)
        metrics[f"{name}_extrapolation_mse"] = mse(pred, extrap_mask)
    metrics["ets_interpolation_mse"] = mse(ets_ppm, interp_mask)
    metrics["ets_extrapolation_mse"] = mse(ets_ppm, extrap_mask)
    metrics["ets_fit_seconds"] = ets_seconds
    metrics["latent_ode_params"] = _num_params(models.latent_ode)
    metrics["rnn_dt_params"] = _num_params(models.rnn)
    metrics["nfe_test_solve"] = nfe
    metrics["history"] = summary["history"][-200:]
    if summary["history"]:
        plot_loss(summary["history"], ctx.directory / "loss.png", "loss")
    _plot(
        test,
        seen,
        latent_ppm,
        band,
        rnn_ppm,
        ets_ppm,
        ctx.directory / "co2.png",
    )
    return metrics


def _num_params(model: eqx.Module) -> int:
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    return int(sum(leaf.size for leaf in leaves))


def _latent_predictions(model: LatentODE, t, w: Windows, num_samples: int = 32):
    """Posterior-mean decodings, the 10–90% band over posterior samples (ppm),
    and the function evaluations of the latent ODE's solve.

    The posterior means and the samples are solved as one batch (one ODE).
    """

    @eqx.filter_jit
    def predict(model, w, key):
        mean, logvar = jax.vmap(model.encode, in_axes=(None, 0, 0))(t, w.y, w.seen)
        eps = jr.normal(key, (num_samples,) + mean.shape, DTYPE)
        samples = (mean + jnp.exp(0.5 * logvar) * eps).reshape(-1, mean.shape[-1])
        sol = model.ode.solve(jnp.concatenate([mean, samples]), t)
        values = jax.vmap(jax.vmap(model.decoder))(sol.ys)[..., 0].T  # (B, W)
        at_mean, decoded = values[: len(mean)], values[len(mean) :]
        decoded = decoded.reshape(num_samples, *at_mean.shape)
        return at_mean, decoded, sol.stats["num_fevals"]

    at_mean, decoded, nfe = predict(model, w, jr.key(0))
    band = np.quantile(np.asarray(decoded), [0.1, 0.9], axis=0)
    offset = np.asarray(w.offset)[:, None]
    return (
        np.asarray(at_mean) * SCALE + offset,
        np.asarray(band) * SCALE + offset,
        int(nfe),
    )


def _ets_predictions(
    t: np.ndarray, ppm: np.ndarray, seen: np.ndarray
) -> Float[np.ndarray, "N W"]:
    """Linear interpolation of the seen weeks, then a Holt–Winters forecast."""
    from statsmodels.tools.sm_exceptions import ConvergenceWarning
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    out = np.empty_like(ppm)
    for i in range(len(ppm)):
        s = seen[i, :SEEN_WEEKS]
        regular = np.interp(t[:SEEN_WEEKS], t[:SEEN_WEEKS][s], ppm[i, :SEEN_WEEKS][s])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fit = ExponentialSmoothing(
                regular,
                trend="add",
                seasonal="add",
                seasonal_periods=52,
                initialization_method="heuristic",
            ).fit()
        out[i, :SEEN_WEEKS] = regular
        out[i, SEEN_WEEKS:] = fit.forecast(len(t) - SEEN_WEEKS)
    return out


def _plot(
    test: CO2Windows,
    seen: np.ndarray,
    latent_ppm: np.ndarray,
    band: np.ndarray,
    rnn_ppm: np.ndarray,
    ets_ppm: np.ndarray,
    path: Path,
) -> None:
    """A few test windows: data, posterior mean and spread, baselines."""
    num = min(PLOTTED, len(test.start))
    rows = np.linspace(0, len(test.start) - 1, num).round().astype(int)
    fig, axes = new_figure(1, size=4.0, nrows=num)
    fig.set_size_inches(10, 3 * num)
    for ax, i in zip(axes, rows, strict=True):
        years = test.start_year[i] + test.t
        m = test.measured[i]
        ax.axvspan(years[SEEN_WEEKS], years[-1], color="0.93", lw=0)
        ax.scatter(
            years[m & ~seen[i]],
            test.ppm[i][m & ~seen[i]],
            s=6,
            c="0.6",
            label="held out",
        )
        ax.scatter(years[seen[i]], test.ppm[i][seen[i]], s=6, c="k", label="seen")
        ax.fill_between(
            years,
            band[0, i],
            band[1, i],
            color="C0",
            alpha=0.25,
            lw=0,
            label="latent ODE 10–90%",
        )
        ax.plot(years, latent_ppm[i], color="C0", lw=1.5, label="latent ODE mean")
        ax.plot(years, rnn_ppm[i], color="C1", lw=1, label="RNN-Δt")
        ax.plot(years, ets_ppm[i], "--", color="C2", lw=1, label="ETS / linear")
        ax.set_ylabel("CO₂ (ppm)")
    axes[0].legend(fontsize=7, ncol=3, loc="upper left")
    axes[-1].set_xlabel("year (shaded: extrapolated)")
    save_figure(fig, path)
