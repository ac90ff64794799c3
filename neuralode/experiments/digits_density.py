"""`cnf --data digits`: a CNF on scikit-learn's 8×8 digits, in bits per dimension.

FFJORD's image experiment at a size two CPU cores can train (Grathwohl et al.
2019). Each image (64 pixels, counts 0..16) is dequantised,
$x = (k + u)/17$ with fresh $u \\sim U[0, 1)^{64}$ every step, mapped to
$\\mathbb{R}^{64}$ by the logit transform
$y = \\operatorname{logit}(\\alpha + (1 - 2\\alpha)x)$ and standardised with the
training set's per-pixel mean and spread, $w = (y - m)/s$; the log-Jacobian of
these fixed maps enters every likelihood. A CNF with a concat-squash field and
Hutchinson's trace estimator models $w$; `--reg kinetic,jacobian` adds the RNODE
penalties of Finlay et al. (2020), divided by the dimension. The test
negative log-likelihood is computed with the exact trace at a tight tolerance
and reported in bits per dimension,
$(\\mathrm{NLL} + 64 \\log 17)/(64 \\log 2)$ (a uniform model scores
$\\log_2 17 = 4.09$).

Baselines, fitted in the same run to the same preprocessed images and scored
on the same dequantised test images: a full-covariance Gaussian (closed form)
and flowjax's masked autoregressive flow (Papamakarios et al. 2017) trained
with Adam for at most the CNF's training time, keeping the parameters of its
best validation loss.

Settings that differ from the 2-D `cnf` experiment are in `DEFAULTS` (and
`QUICK` for `--quick`); options given explicitly win.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

import neuralode as no
from neuralode.datasets import (
    DIGIT_LEVELS,
    bits_per_dim,
    dequantize,
    digit_images,
    logit_transform,
)

from ._checkpoint import TrainState
from ._density_baselines import (
    Gaussian,
    maf_log_prob,
    maf_sample,
    make_maf,
    num_params,
    require,
    train_maf,
)
from ._output import UsageError
from ._plotting import new_figure, plot_loss, save_figure
from ._run import Run, positive_float, positive_int
from ._training import batch_indices, mean_of_history

NAME = "cnf"
HELP = "FFJORD CNF on scikit-learn's 8x8 digits (cnf --data digits)"
DTYPE = jnp.float32
DIM = 64
STEPS = 4000
DEFAULTS = {
    "steps": STEPS,
    "width": 256,
    "depth": 2,
    "batch_size": 128,
    "lr": 1e-3,
    "rtol": 1e-4,
    "atol": 1e-4,
    "eval_tol": 1e-5,
    "num_test": 4 * 360,
}
QUICK = {
    "steps": 3,
    "width": 16,
    "depth": 1,
    "batch_size": 32,
    "num_test": 360,
    "eval_tol": 1e-3,
    "maf_steps": 3,
    "maf_width": 16,
    "maf_layers": 1,
}
NUM_SAMPLES = 60  # images in each panel of the sample grid (6 rows of 10)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that only `--data digits` reads (added to cnf's parser)."""
    group = parser.add_argument_group("with --data digits")
    group.add_argument(
        "--logit-alpha",
        type=float,
        default=0.05,
        help="squeeze alpha of the logit transform, in [0, 0.5)",
    )
    group.add_argument(
        "--maf-layers",
        type=positive_int,
        default=4,
        help="autoregressive layers of the MAF baseline",
    )
    group.add_argument(
        "--maf-width",
        type=positive_int,
        default=128,
        help="hidden width of each MADE network of the MAF baseline",
    )
    group.add_argument(
        "--maf-steps",
        type=positive_int,
        default=50000,
        help="most Adam steps of the MAF baseline",
    )
    group.add_argument(
        "--maf-seconds",
        type=positive_float,
        default=None,
        help="wall-clock budget of the MAF baseline (default: the CNF's "
        "training time in this run)",
    )


def configure(args: argparse.Namespace) -> None:
    """Check --logit-alpha, --baseline and that flowjax is installed."""
    require("flowjax", "cnf --data digits (its MAF baseline)")
    if not 0.0 <= args.logit_alpha < 0.5:
        raise UsageError(f"--logit-alpha must be in [0, 0.5), got {args.logit_alpha}")
    if args.baseline is not None:
        from .cnf import read_baseline

        data = read_baseline(args.baseline).get("data")
        if data != "digits":
            raise UsageError(
                f"--baseline {args.baseline} is a cnf run on {data}, not on digits"
            )


def _split(key: PRNGKeyArray) -> Array:
    """The model, training, data-order, evaluation, plot and MAF keys of a run."""
    return jr.split(key, 6)


def build(
    args: argparse.Namespace, key: PRNGKeyArray
) -> tuple[no.CNF, optax.GradientTransformation]:
    """The flow and its optimiser (Adam, warmup and cosine decay)."""
    steps = args.steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(100, max(1, steps // 10)), steps, args.lr / 20
    )
    # Initialised in one compiled program rather than one per parameter shape.
    field = eqx.filter_jit(no.nn.ConcatSquashMLP)(
        DIM,
        args.width,
        args.depth,
        key=_split(key)[0],
        activation=jnp.tanh,
        dtype=DTYPE,
    )
    flow = no.CNF(field, trace="hutchinson", rtol=args.rtol, atol=args.atol)
    return flow, optax.adam(schedule)


class Preprocess(eqx.Module):
    """Dequantised images in [0, 1] -> standardised logits, with log-Jacobian.

    $w = (\\operatorname{logit}(\\alpha + (1 - 2\\alpha)x) - m)/s$; `mean` $m$
    and `scale` $s$ are fixed per pixel (from the training images).
    """

    alpha: float = eqx.field(static=True)
    mean: Float[Array, " d"]
    scale: Float[Array, " d"]

    @classmethod
    def fit(cls, counts: np.ndarray, alpha: float, key: PRNGKeyArray) -> Preprocess:
        """Per-pixel mean and spread of the logits of one dequantised draw."""
        y, _ = logit_transform(dequantize(key, counts), alpha)
        return cls(alpha, jnp.mean(y, axis=0), jnp.std(y, axis=0))

    def __call__(self, x: Float[Array, "n d"]) -> tuple[Array, Array]:
        """`(w, log|det dw/dx|)` per row."""
        y, log_det = logit_transform(x, self.alpha)
        w = (y - self.mean) / self.scale
        return w, log_det - jnp.sum(jnp.log(self.scale))

    def inverse(self, w: Float[Array, "n d"]) -> Float[Array, "n d"]:
        """Back to pixel intensities in [0, 1]."""
        s = jax.nn.sigmoid(w * self.scale + self.mean)
        return jnp.clip((s - self.alpha) / (1 - 2 * self.alpha), 0.0, 1.0)


def _test_draws(num_test: int, num_images: int) -> int:
    """Dequantised copies of each test image: --num-test in whole test sets."""
    return max(1, round(num_test / num_images))


def run(ctx: Run) -> dict[str, Any]:
    """Train the flow by maximum likelihood, fit the baselines, evaluate all."""
    args = ctx.args
    _, train_key, order_key, eval_key, plot_key, maf_key = _split(ctx.key)
    images = digit_images()
    prep = Preprocess.fit(images.train, args.logit_alpha, jr.key(0))
    state = ctx.parallel.replicate(ctx.state)
    regs, weight = tuple(args.reg), args.reg_weight
    optimiser = ctx.optimiser

    @eqx.filter_jit
    def step(state: TrainState, counts, key):
        k_deq, k_probe = jr.split(key)
        w, log_det = prep(dequantize(k_deq, counts))

        def loss_fn(flow):
            if regs:
                logp, penalties = flow.log_prob(w, key=k_probe, regularize=True)
            else:
                logp, penalties = flow.log_prob(w, key=k_probe), {}
            bpd = jnp.mean(bits_per_dim(-(logp + log_det), DIM))
            logs = {"bpd": bpd} | {r: jnp.mean(penalties[r]) / DIM for r in regs}
            return bpd + weight * sum(logs[r] for r in regs), logs

        (loss, logs), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            state.model
        )
        params = eqx.filter(state.model, eqx.is_array)
        updates, opt_state = optimiser.update(grads, state.opt_state, params)
        flow = eqx.apply_updates(state.model, updates)
        return TrainState(flow, opt_state, state.step + 1), {"loss": loss, **logs}

    def batch_fn(i: int):
        rows = batch_indices(order_key, i, len(images.train), args.batch_size)
        return ctx.parallel.shard(images.train[rows])

    state, summary = ctx.train(state, step, batch_fn, train_key)
    flow = state.model
    metrics: dict[str, Any] = {
        "data": "digits",
        "reg": list(regs),
        "steps": int(state.step),
        "train_seconds": summary["train_seconds"],
        "compile_seconds": summary["compile_seconds"],
        "steps_per_second": summary["steps_per_second"],
        "devices": ctx.parallel.num_devices,
        "num_train": len(images.train),
        "num_valid": len(images.valid),
        "num_test_images": len(images.test),
        "params": num_params(eqx.filter(flow, eqx.is_inexact_array)),
        "train_bits_per_dim_final": mean_of_history(summary["history"], "bpd", 0.05),
    }
    draws = _test_draws(args.num_test, len(images.test))
    k_test, k_valid, k_fit = jr.split(eval_key, 3)
    test = [_prepare(prep, images.test, jr.fold_in(k_test, i)) for i in range(draws)]
    metrics |= _evaluate_cnf(flow, test, args.eval_tol)

    tic = time.perf_counter()
    train_w = jnp.concatenate(
        [_prepare(prep, images.train, jr.fold_in(k_fit, i))[0] for i in range(4)]
    )
    gaussian = Gaussian.fit(np.asarray(train_w))
    metrics |= _scores(
        "gaussian", [(gaussian.log_prob(np.asarray(w)), ld) for w, ld in test]
    )
    metrics["gaussian_params"] = gaussian.num_params
    metrics["gaussian_fit_seconds"] = time.perf_counter() - tic

    budget = args.maf_seconds or summary["train_seconds"]
    maf, maf_metrics = _fit_maf(args, prep, images, maf_key, k_valid, budget)
    metrics |= maf_metrics
    metrics |= _scores(
        "maf",
        [(_maf_log_prob(maf, w), ld) for w, ld in test],
    )
    metrics["cnf_train_time_over_maf"] = summary["train_seconds"] / max(
        metrics["maf_train_seconds"], 1e-9
    )
    metrics |= _savings(metrics, args.baseline)
    metrics["history"] = summary["history"][-200:]
    if summary["history"]:
        plot_loss(summary["history"], ctx.directory / "loss.png", "loss (bits/dim)")
    cnf_w, metrics["nfe_forward"] = _push(flow, _base(plot_key, NUM_SAMPLES))
    if not args.quick:  # the backward pass's count compiles a program of its own
        metrics["nfe_backward"] = _backward_fevals(flow, _base(plot_key, NUM_SAMPLES))
    _plot_samples(cnf_w, maf, gaussian, prep, images.test, plot_key, ctx.directory)
    return metrics


def _scores(name: str, parts: list[tuple[Any, Any]]) -> dict[str, float]:
    """Test bits/dim (and its standard error) from (log p(w), log-Jacobian) pairs."""
    nll = -np.concatenate(
        [np.asarray(lp, np.float64) + np.asarray(ld) for lp, ld in parts]
    )
    bpd = np.asarray(bits_per_dim(nll, DIM))
    return {
        f"{name}_test_bits_per_dim": float(bpd.mean()),
        f"{name}_test_bits_per_dim_stderr": float(bpd.std() / math.sqrt(len(bpd))),
        f"{name}_test_nll": float(nll.mean()),
    }


@eqx.filter_jit
def _exact_log_prob(flow: no.CNF, w: Array) -> Array:
    return flow.log_prob(w)


def _evaluate_cnf(flow: no.CNF, test: list, tol: float) -> dict[str, Any]:
    """Test bits/dim of the flow with the exact trace at rtol = atol = `tol`."""
    exact = no.CNF(flow.field, trace="exact", rtol=tol, atol=tol)
    tic = time.perf_counter()
    parts = [(_exact_log_prob(exact, w), ld) for w, ld in test]
    out = {k.removeprefix("cnf_"): v for k, v in _scores("cnf", parts).items()}
    out["num_test"] = sum(len(w) for w, _ in test)
    out["eval_tol"] = tol
    out["eval_seconds"] = time.perf_counter() - tic
    return out


@eqx.filter_jit
def _prepare(prep: Preprocess, counts, key: PRNGKeyArray) -> tuple[Array, Array]:
    """Dequantise and preprocess images: `(w, log-Jacobian)`."""
    return prep(dequantize(key, counts))


def _base(key: PRNGKeyArray, num: int) -> Array:
    return jr.normal(jr.fold_in(key, 0), (num, DIM), DTYPE)


def _solve_kwargs(flow: no.CNF) -> dict[str, Any]:
    return dict(solver=flow.solver, rtol=flow.rtol, atol=flow.atol)


@eqx.filter_jit
def _push_jit(flow: no.CNF, z0: Array) -> tuple[Array, Array]:
    ts = jnp.asarray([flow.t0, flow.t1], DTYPE)
    sol = no.solve(flow.field, z0, ts, **_solve_kwargs(flow))
    return sol.ys[-1], sol.stats["num_fevals"]


def _push(flow: no.CNF, z0: Array) -> tuple[Array, int]:
    """Samples z(t1) from base points z0, and the function evaluations taken.

    The count is that of the flow's ODE dz/dt = f at the training tolerances,
    which sets the steps of a training step's forward solve.
    """
    x, nfe = _push_jit(flow, z0)
    return x, int(nfe)


def _backward_fevals(flow: no.CNF, z0: Array) -> int:
    """Function evaluations of the adjoint's backward pass of the same solve."""

    @eqx.filter_jit
    def fevals(flow, z0):
        ts = jnp.asarray([flow.t0, flow.t1], DTYPE)
        kw = _solve_kwargs(flow)
        return no.backward_stats(flow.field, z0, ts, adjoint=flow.adjoint, **kw)

    return int(fevals(flow, z0)["num_fevals"])


MAF_CHUNK = 72  # rows per MAF evaluation: one compiled program for every set


@eqx.filter_jit
def _maf_log_prob_chunk(maf: Any, w: Array) -> Array:
    return maf_log_prob(maf, w)


def _maf_log_prob(maf: Any, w: Array) -> np.ndarray:
    """log p(w) of the MAF, in chunks of `MAF_CHUNK` rows (the last one padded)."""
    pad = -len(w) % MAF_CHUNK
    padded = jnp.concatenate([w, jnp.zeros((pad, w.shape[1]), w.dtype)])
    chunks = padded.reshape(-1, MAF_CHUNK, w.shape[1])
    out = np.concatenate([np.asarray(_maf_log_prob_chunk(maf, c)) for c in chunks])
    return out[: len(w)]


def _fit_maf(
    args: argparse.Namespace,
    prep: Preprocess,
    images: Any,
    key: PRNGKeyArray,
    valid_key: PRNGKeyArray,
    budget: float,
) -> tuple[Any, dict[str, Any]]:
    """Train flowjax's MAF on the preprocessed images for at most `budget` s."""
    k_model, k_order, k_deq = jr.split(key, 3)
    # Eager: flowjax's constructor keeps closures that must not see tracers.
    maf = make_maf(k_model, DIM, layers=args.maf_layers, width=args.maf_width)
    valid = [_prepare(prep, images.valid, jr.fold_in(valid_key, i)) for i in range(2)]
    per_epoch = max(1, len(images.train) // args.batch_size)

    def batches(i: int) -> Array:
        rows = batch_indices(k_order, i, len(images.train), args.batch_size)
        return _prepare(prep, images.train[rows], jr.fold_in(k_deq, i))[0]

    def validation(flow) -> float:
        nll = [-(_maf_log_prob(flow, w) + np.asarray(ld)) for w, ld in valid]
        return float(np.mean(bits_per_dim(np.concatenate(nll), DIM)))

    result = train_maf(
        maf,
        batches,
        validation,
        lr=1e-3,
        max_seconds=budget,
        max_steps=args.maf_steps,
        eval_every=per_epoch,
        patience=20,
    )
    return result.flow, {
        "maf_params": num_params(result.flow),
        "maf_layers": args.maf_layers,
        "maf_width": args.maf_width,
        "maf_budget_seconds": budget,
        "maf_train_seconds": result.train_seconds,
        "maf_seconds_to_best": result.seconds_to_best,
        "maf_steps": result.steps,
        "maf_best_step": result.best_step,
        "maf_best_valid_bits_per_dim": min(
            (row["valid"] for row in result.history), default=math.nan
        ),
    }


def _savings(metrics: dict[str, Any], baseline: str | None) -> dict[str, Any]:
    if baseline is None:
        return {}
    from .cnf import baseline_savings

    out = baseline_savings(metrics, baseline)
    return out | {"baseline_test_bits_per_dim": _baseline_bpd(baseline)}


def _baseline_bpd(baseline: str) -> float | None:
    from .cnf import read_baseline

    return read_baseline(baseline).get("test_bits_per_dim")


def _mosaic(x: np.ndarray, cols: int = 10) -> np.ndarray:
    """Rows of 64 pixels as one image of 8×8 tiles, `cols` per row, 1-px gaps."""
    rows = math.ceil(len(x) / cols)
    out = np.full((rows * 9 + 1, cols * 9 + 1), 0.3)
    for i, img in enumerate(x):
        r, c = divmod(i, cols)
        out[1 + 9 * r : 9 * r + 9, 1 + 9 * c : 9 * c + 9] = img.reshape(8, 8)
    return out


def _plot_samples(
    cnf_w: Array,
    maf: Any,
    gaussian: Gaussian,
    prep: Preprocess,
    test: np.ndarray,
    key: PRNGKeyArray,
    directory: Path,
) -> None:
    """Test images and samples of the CNF (given), the MAF and the Gaussian."""
    k_maf, k_gauss = jr.split(jr.fold_in(key, 1))
    num = len(cnf_w)
    maf_w = eqx.filter_jit(maf_sample)(maf, k_maf, num)
    eps = np.asarray(jr.normal(k_gauss, (num, DIM), DTYPE), np.float64)
    gauss_w = gaussian.mean + eps @ gaussian.cholesky.T
    inverse = eqx.filter_jit(lambda p, w: p.inverse(w.astype(DTYPE)))
    panels = [
        ("test images", test[:num] / (DIGIT_LEVELS - 1)),
        ("CNF samples", inverse(prep, cnf_w)),
        ("MAF samples (flowjax)", inverse(prep, maf_w)),
        ("Gaussian samples", inverse(prep, jnp.asarray(gauss_w, DTYPE))),
    ]
    fig, axes = new_figure(len(panels), size=3.2)
    for ax, (title, x) in zip(axes, panels, strict=True):
        ax.imshow(_mosaic(np.asarray(x)), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, directory / "samples.png")
