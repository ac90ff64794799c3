"""`stiff`: learn Robertson's three rate constants from noisy concentrations.

Robertson's chemical kinetics (Hairer & Wanner II, §IV.1),

$$y_1' = -k_1 y_1 + k_3 y_2 y_3,\\quad
y_2' = k_1 y_1 - k_2 y_2^2 - k_3 y_2 y_3,\\quad y_3' = k_2 y_2^2,$$

with $(k_1, k_2, k_3) = (0.04, 3\\cdot 10^7, 10^4)$, is the classic stiff
problem: its Jacobian has eigenvalues down to about $-10^4$ while the solution
changes on time scales from $10^{-4}$ to $10^5$. The three concentrations are observed
on a log-spaced time grid from $10^{-5}$ to $10^5$ with multiplicative noise,
$\\tilde y_{ij} = y_{ij}\\, e^{\\sigma \\varepsilon_{ij}}$. Since $y_2$ stays
below $4\\cdot 10^{-5}$ while $y_1$ and $y_3$ are of order one, the loss is
(up to a factor and a constant) the Gaussian negative log-likelihood in log
space, which weighs every species alike:

$$L(\\theta) = \\frac{1}{3N}\\sum_{i,j}
\\Big(\\frac{\\log y_j(t_i; 10^\\theta) - \\log \\tilde y_{ij}}{\\sigma}\\Big)^2,$$

about 1 at the true constants. The parameters are $\\theta = \\log_{10} k$,
started each $\\pm$`--perturb` decades from the truth, and trained with Adam.
The solves run in float64 with `AutoSwitch` (Tsit5 while the problem is not
stiff, Rodas5P while it is) or, with `--solver`, `Rodas5P` or `Kvaerno5`
throughout; the gradients come from `CheckpointAdjoint`, the exact derivative
of the discrete solve. The run reports the recovered constants and their
relative errors, and one attempt of the same loss with the explicit `Dopri5`,
which runs out of steps long before the last observation.
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
from jaxtyping import Array, Float, PRNGKeyArray

import neuralode as no

from ._checkpoint import TrainState
from ._output import UsageError
from ._plotting import new_figure, save_figure
from ._run import (
    Run,
    add_common_arguments,
    add_tolerance_arguments,
    positive_float,
    positive_int,
)

NAME = "stiff"
HELP = "learn Robertson's stiff rate constants from noisy data (implicit solvers)"
DTYPE = jnp.float64
STEPS = 200
QUICK = {"steps": 30, "num_obs": 12}
SOLVERS = {
    "autoswitch": no.AutoSwitch,
    "rodas5p": no.Rodas5P,
    "kvaerno5": no.Kvaerno5,
}
#: The observation window, log-spaced (the solve starts at t = 0).
T_FIRST, T_LAST = 1e-5, 1e5
#: The data are solved with Rodas5P at these tolerances, whatever --solver is.
REFERENCE_TOLERANCES = (1e-10, 1e-20)
#: The explicit attempt: Dopri5 with a realistic step budget.
EXPLICIT_MAX_STEPS = 4096
#: Concentrations below this count as this in the log loss (never reached by
#: the fits here; it keeps a slightly negative solver value from giving NaN).
FLOOR = 1e-30
#: Points of the fine time grid of the plotted curves (at least).
PLOT_POINTS = 150
SPECIES = ("y1", "y2", "y3")
RATE_NAMES = ("k1", "k2", "k3")
ROBERTSON = no.datasets.stiff_system("robertson")


class RateConstants(eqx.Module):
    """The trainable parameters: log₁₀ of Robertson's (k1, k2, k3)."""

    log10_k: Float[Array, " 3"]


class Observations(NamedTuple):
    """Noisy concentrations at the output times `ts[1:]` (`ts[0] = 0`).

    - `ts`: (N + 1,) 0, then N log-spaced times.
    - `clean`: (N, 3) the true concentrations.
    - `ys`: (N, 3) the observations, `clean · exp(noise · ε)`.
    """

    ts: Float[Array, " N1"]
    clean: Float[Array, "N 3"]
    ys: Float[Array, "N 3"]


def time_grids(num_obs: int) -> tuple[Float[Array, " N1"], Float[Array, " M1"], int]:
    """The observation times and a finer grid for the curves that contains them.

    Both start with t = 0 (the initial value). The fine grid has about
    `PLOT_POINTS` log-spaced times from `T_FIRST` to `T_LAST`, and every
    `refine`-th of them is an observation time, so one solve on the fine grid
    gives the curves and the loss alike.

    **Returns:** `(ts, fine_ts, refine)` with `ts = [0, *fine_ts[1::refine]]`.
    """
    refine = max(1, -(-PLOT_POINTS // (num_obs - 1)))
    fine = jnp.logspace(
        math.log10(T_FIRST),
        math.log10(T_LAST),
        (num_obs - 1) * refine + 1,
        dtype=DTYPE,
    )
    zero = jnp.zeros(1, DTYPE)
    return (
        jnp.concatenate([zero, fine[::refine]]),
        jnp.concatenate([zero, fine]),
        refine,
    )


def true_log10_rates() -> Float[Array, " 3"]:
    """log₁₀ of Robertson's (k1, k2, k3) = (0.04, 3·10⁷, 10⁴)."""
    return jnp.log10(jnp.asarray(ROBERTSON.args, DTYPE))


def initial_log10_rates(perturb: float, key: PRNGKeyArray) -> Float[Array, " 3"]:
    """The truth moved by ±`perturb` decades per constant (signs from `key`)."""
    signs = jr.rademacher(key, (3,), dtype=DTYPE)
    return true_log10_rates() + perturb * signs


def solve_robertson(
    log10_k: Float[Array, " 3"],
    ts: Float[Array, " T"],
    solver: no.AbstractSolver,
    rtol: float,
    atol: float,
    *,
    max_steps: int = 4096,
) -> no.Solution:
    """Robertson from y0 = (1, 0, 0) with rates 10**`log10_k`, outputs at `ts`.

    Never raises: a failed solve returns its result code (and NaN beyond the
    time it reached), so that training can skip the step and the explicit
    attempt can report how it failed.
    """
    return no.solve(
        ROBERTSON.field,
        jnp.asarray(ROBERTSON.y0, DTYPE),
        ts,
        10.0**log10_k,
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        adjoint=no.CheckpointAdjoint(),
        throw=False,
    )


@eqx.filter_jit
def make_observations(num_obs: int, noise: float, key: PRNGKeyArray) -> Observations:
    """The true trajectory at `num_obs` log-spaced times, with lognormal noise."""
    ts, _, _ = time_grids(num_obs)
    sol = solve_robertson(true_log10_rates(), ts, no.Rodas5P(), *REFERENCE_TOLERANCES)
    clean = sol.ys[1:]
    eps = jr.normal(key, clean.shape, DTYPE)
    return Observations(ts, clean, clean * jnp.exp(noise * eps))


def log_loss(ys: Float[Array, "N 3"], data: Observations, noise: float) -> Array:
    """Mean squared log-space residual in units of the noise (≈ 1 at the truth)."""
    residual = jnp.log(jnp.maximum(ys, FLOOR)) - jnp.log(data.ys)
    return jnp.mean((residual / noise) ** 2)


def loss_and_solution(
    model: RateConstants,
    data: Observations,
    noise: float,
    solver: no.AbstractSolver,
    rtol: float,
    atol: float,
    max_steps: int = 4096,
) -> tuple[Array, no.Solution]:
    """The log loss of `model`'s trajectory, and the solve behind it."""
    sol = solve_robertson(
        model.log10_k, data.ts, solver, rtol, atol, max_steps=max_steps
    )
    return log_loss(sol.ys[1:], data, noise), sol


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the stiff experiment."""
    parser.add_argument(
        "--solver",
        default="autoswitch",
        choices=sorted(SOLVERS),
        help="the solver of the training solves: AutoSwitch (Tsit5 while "
        "non-stiff, Rodas5P while stiff) or an implicit method throughout",
    )
    parser.add_argument(
        "--num-obs",
        type=positive_int,
        default=40,
        help=f"observation times, log-spaced from {T_FIRST:g} to {T_LAST:g}",
    )
    parser.add_argument(
        "--noise",
        type=positive_float,
        default=0.05,
        help="standard deviation of the multiplicative (log-space) noise",
    )
    parser.add_argument(
        "--perturb",
        type=positive_float,
        default=1.0,
        help="decades between each initial log10 k and the truth (signs drawn "
        "from --seed)",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=0.2, help="Adam's initial learning rate"
    )
    add_tolerance_arguments(parser, rtol=1e-6, atol=1e-14)
    add_common_arguments(parser, steps=STEPS, quick_steps=QUICK["steps"])


def configure(args: argparse.Namespace) -> None:
    """Turn on float64; one data set per step, so one device.

    float64 goes on here rather than in `run`, because the parameters are
    built (and a checkpoint read back) before `run` starts.
    """
    if args.devices != 1:
        raise UsageError(
            f"--devices {args.devices}: the stiff experiment fits three numbers to "
            "one data set and runs on one device; leave out --devices"
        )
    if args.num_obs < 3:
        raise UsageError(f"--num-obs must be at least 3, got {args.num_obs}")
    jax.config.update("jax_enable_x64", True)
    # The shared run preparation checks --devices against a batch size.
    args.batch_size = 1


def _split(key: PRNGKeyArray) -> Array:
    """The data, initial-guess and training keys of a run."""
    return jr.split(key, 3)


def build(
    args: argparse.Namespace, key: PRNGKeyArray
) -> tuple[RateConstants, optax.GradientTransformation]:
    """The perturbed rate constants and their optimiser (Adam, cosine decay).

    An update whose gradient is not finite (a solve that failed) is skipped.
    """
    model = RateConstants(initial_log10_rates(args.perturb, _split(key)[1]))
    schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.01)
    return model, optax.apply_if_finite(optax.adam(schedule), 10)


def run(ctx: Run) -> dict[str, Any]:
    """Fit the rate constants and compare them with the truth and with Dopri5."""
    args = ctx.args
    data_key, init_key, train_key = _split(ctx.key)
    data = make_observations(args.num_obs, args.noise, data_key)
    solver = SOLVERS[args.solver]()
    optimiser = ctx.optimiser
    noise, rtol, atol = args.noise, args.rtol, args.atol

    @eqx.filter_jit
    def step(state: TrainState, batch, key):
        del batch, key
        (loss, sol), grads = eqx.filter_value_and_grad(loss_and_solution, has_aux=True)(
            state.model, data, noise, solver, rtol, atol
        )
        params = eqx.filter(state.model, eqx.is_array)
        updates, opt_state = optimiser.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
        logs = {
            "loss": loss,
            **{f"log10_{n}": state.model.log10_k[i] for i, n in enumerate(RATE_NAMES)},
            "num_steps": sol.stats["num_steps"],
            "result": sol.result,
        }
        return TrainState(model, opt_state, state.step + 1), logs

    state, summary = ctx.train(ctx.state, step, lambda i: None, train_key)
    truth = true_log10_rates()
    initial = initial_log10_rates(args.perturb, init_key)
    fitted = state.model.log10_k
    _, fine_ts, refine = time_grids(args.num_obs)
    curves, losses, stats = [], [], []
    for log10_k in (truth, initial, fitted):
        ys, loss, sol_stats = _evaluate(
            log10_k, data, fine_ts, refine, noise, solver, rtol, atol
        )
        curves.append(np.asarray(ys))
        losses.append(float(loss))
        stats.append({k: int(v) for k, v in sol_stats.items()})
    failed = sum(1 for row in summary["history"] if row.get("result", 0) != 0)

    metrics: dict[str, Any] = {
        "steps": int(state.step),
        "solver": type(solver).__name__,
        "train_seconds": summary["train_seconds"],
        "compile_seconds": summary["compile_seconds"],
        "steps_per_second": summary["steps_per_second"],
        "failed_training_solves": failed,
        "loss": losses[2],
        "initial_loss": losses[1],
        "loss_at_true_rates": losses[0],
        **_rate_metrics(np.asarray(truth), np.asarray(initial), np.asarray(fitted)),
        **{f"fit_solve_{k}": v for k, v in stats[2].items()},
        **_explicit_attempt(RateConstants(initial), data, args),
        "history": summary["history"][-200:],
    }
    _plot_fit(data, np.asarray(fine_ts[1:]), curves, ctx.directory)
    if summary["history"]:
        _plot_training(summary["history"], np.asarray(truth), losses[0], ctx.directory)
    return metrics


@eqx.filter_jit
def _evaluate(
    log10_k: Float[Array, " 3"],
    data: Observations,
    fine_ts: Float[Array, " M1"],
    refine: int,
    noise: float,
    solver: no.AbstractSolver,
    rtol: float,
    atol: float,
) -> tuple[Float[Array, "M 3"], Array, dict[str, Array]]:
    """The trajectory on the fine grid, the loss and the solve's statistics."""
    sol = solve_robertson(log10_k, fine_ts, solver, rtol, atol)
    ys = sol.ys[1:]
    return ys, log_loss(ys[::refine], data, noise), sol.stats


def _rate_metrics(
    truth: np.ndarray, initial: np.ndarray, fitted: np.ndarray
) -> dict[str, float]:
    """True, initial and fitted constants, their relative errors, the largest,
    and the distance from the truth in log10 space before and after."""
    out: dict[str, float] = {}
    for i, name in enumerate(RATE_NAMES):
        out[f"{name}_true"] = float(np.asarray(ROBERTSON.args)[i])
        out[f"{name}_initial"] = float(10.0 ** initial[i])
        out[f"{name}_fitted"] = float(10.0 ** fitted[i])
        out[f"{name}_relative_error"] = float(10.0 ** (fitted[i] - truth[i]) - 1)
    relative = lambda x: float(np.max(np.abs(10.0 ** (x - truth) - 1)))
    out["max_relative_error"] = relative(fitted)
    out["initial_max_relative_error"] = relative(initial)
    out["log10_distance"] = float(np.linalg.norm(fitted - truth))
    out["initial_log10_distance"] = float(np.linalg.norm(initial - truth))
    return out


def _explicit_attempt(
    model: RateConstants, data: Observations, args: argparse.Namespace
) -> dict[str, Any]:
    """The same loss at the initial guess, solved with Dopri5 instead.

    The explicit method's stable step is bounded by its stability region
    (|hλ| ≲ 3.3 with λ ≈ −10⁴ once y3 has formed), so `EXPLICIT_MAX_STEPS`
    steps get nowhere near t = 10⁵: the solve returns
    `RESULTS.max_steps_reached`, NaN beyond the time it reached, and so a NaN
    loss (and gradient).
    """
    loss, sol = eqx.filter_jit(loss_and_solution)(
        model,
        data,
        args.noise,
        no.Dopri5(),
        args.rtol,
        args.atol,
        EXPLICIT_MAX_STEPS,
    )
    finite = np.all(np.isfinite(np.asarray(sol.ys)), axis=1)
    return {
        "dopri5_max_steps": EXPLICIT_MAX_STEPS,
        "dopri5_result": int(sol.result),
        "dopri5_message": no.RESULTS.message(int(sol.result)),
        "dopri5_num_steps": int(sol.stats["num_steps"]),
        "dopri5_num_fevals": int(sol.stats["num_fevals"]),
        "dopri5_last_output_time": float(np.asarray(data.ts)[finite][-1]),
        "dopri5_loss": float(loss),
    }


def _plot_fit(
    data: Observations, ts: np.ndarray, curves: list[np.ndarray], directory: Path
) -> None:
    """Observations with the true, initial and fitted trajectories, per species.

    `curves` holds those three trajectories at the times `ts`, in that order.
    """
    styles = [
        ("truth", "0.6", "-", 3.0),
        ("initial guess", "C3", ":", 1.5),
        ("fitted", "C0", "--", 1.5),
    ]
    t_obs, y_obs = np.asarray(data.ts[1:]), np.asarray(data.ys)
    fig, axes = new_figure(3, size=3.6)
    for j, ax in enumerate(axes):
        for (label, color, ls, lw), ys in zip(styles, curves, strict=True):
            y = np.maximum(ys[:, j], FLOOR)
            ax.plot(ts, y, ls, color=color, lw=lw, label=label)
        ax.scatter(t_obs, y_obs[:, j], s=12, color="k", zorder=3, label="observed")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(y_obs[:, j].min() / 3, y_obs[:, j].max() * 3)
        ax.set_xlabel("t")
        ax.set_title(f"{SPECIES[j]} (log scales)")
    axes[0].legend(fontsize=7, loc="lower left")
    save_figure(fig, directory / "fit.png")


def _plot_training(
    history: list[dict[str, float]],
    truth: np.ndarray,
    loss_at_truth: float,
    directory: Path,
) -> None:
    """The loss (log scale, with its value at the true constants) and
    log10(k / k_true) of each constant, per step."""
    steps = [r["step"] for r in history]
    fig, (ax,) = new_figure(size=4.0)
    ax.semilogy(steps, [r["loss"] for r in history], lw=1, label="fit")
    ax.axhline(loss_at_truth, color="k", ls="--", lw=0.8, label="at the true k")
    ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("mean (log residual / noise)²")
    ax.set_title("training loss")
    save_figure(fig, directory / "loss.png")

    fig, (ax,) = new_figure(size=4.0)
    for i, name in enumerate(RATE_NAMES):
        values = np.asarray([r[f"log10_{name}"] for r in history]) - truth[i]
        ax.plot(steps, values, lw=1.5, label=name)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("log10(k / k_true)")
    ax.set_title("rate constants")
    ax.legend()
    save_figure(fig, directory / "rates.png")
