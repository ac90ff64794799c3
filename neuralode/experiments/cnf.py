"""`cnf`: an FFJORD-style continuous normalizing flow on a 2-D toy density.

Samples are $x = z(1)$ with $z(0) \\sim \\mathcal{N}(0, I)$ and
$\\dot z = f_\\theta(t, z)$ (a concat-squash MLP); by the instantaneous change
of variables $\\log p(x) = \\log \\mathcal{N}(z(0)) - \\int_0^1
\\mathrm{Tr}\\,\\partial f/\\partial z\\,dt$, integrated backward from the data
with the exact trace (cheap in 2-D). Training minimises the negative
log-likelihood of fresh samples each step. With `--reg kinetic,jacobian` the
RNODE penalties $\\lambda_K\\int\\lVert f\\rVert^2 dt$ and
$\\lambda_J\\int\\lVert\\partial f/\\partial z\\rVert_F^2 dt$ (Finlay et al.
2020) are added, which straighten the flow and cut the solver's function
evaluations. The run reports the test NLL and, for datasets with a known
density, its gap to the data's entropy (the lowest NLL any model can reach).

`--data digits` trains a CNF on scikit-learn's 8×8 digit images instead, with
baselines, in bits per dimension and with defaults of its own
(`neuralode.experiments.digits_density`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray

import neuralode as no

from . import digits_density
from ._checkpoint import TrainState
from ._output import METRICS, UsageError, read_run_json
from ._plotting import new_figure, plot_loss, save_figure
from ._run import (
    Run,
    add_common_arguments,
    add_tolerance_arguments,
    positive_float,
    positive_int,
)
from ._training import mean_of_history

NAME = "cnf"
HELP = "FFJORD continuous normalizing flow on a 2-D toy density"
DTYPE = jnp.float32
STEPS = 3000
QUICK = {"steps": 3, "width": 16, "depth": 1, "batch_size": 64, "num_test": 576}
REGULARIZERS = ("kinetic", "jacobian")
LIMIT = 4.5  # half-width of the plotted square


@eqx.filter_jit
def _log_prob(flow: no.CNF, x: Array) -> Array:
    return flow.log_prob(x)


def _grid_size(quick: bool) -> int:
    """Points per side of the density plot; test NLL uses chunks of its square."""
    return 24 if quick else 100


def regularizer_list(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated subset of kinetic,jacobian (or none)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names == ("none",):
        return ()
    bad = [n for n in names if n not in REGULARIZERS]
    if bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(REGULARIZERS)}, "
            f"got {text!r}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the cnf experiment."""
    parser.add_argument(
        "--data",
        default="8gaussians",
        choices=(*no.datasets.TOY_2D_NAMES, "digits"),
        help="the toy density, or digits: 64-dim images with their own defaults",
    )
    parser.add_argument(
        "--reg",
        type=regularizer_list,
        default=(),
        metavar="NAMES",
        help="RNODE regularizers: kinetic, jacobian or kinetic,jacobian "
        "(default: none)",
    )
    parser.add_argument(
        "--reg-weight",
        type=positive_float,
        default=0.01,
        help="weight of each regularizer in the loss",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="RUN",
        help="an unregularized cnf run whose function evaluations --reg is "
        "compared with (default: none)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=512,
        help="fresh samples per training step",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=2e-3, help="peak learning rate"
    )
    parser.add_argument(
        "--width", type=positive_int, default=64, help="width of the vector field"
    )
    parser.add_argument(
        "--depth",
        type=positive_int,
        default=3,
        help="hidden layers of the vector field",
    )
    add_tolerance_arguments(parser, rtol=1e-4, atol=1e-4)
    parser.add_argument(
        "--eval-tol",
        type=positive_float,
        default=1e-5,
        help="rtol = atol of the test-NLL solve",
    )
    parser.add_argument(
        "--num-test",
        type=positive_int,
        default=20000,
        help="test samples (rounded to whole chunks of the density grid; with "
        "--data digits, to whole dequantised copies of the test images)",
    )
    add_common_arguments(parser, steps=STEPS, quick_steps=QUICK["steps"])
    digits_density.add_arguments(parser)


def variant(args: argparse.Namespace) -> ModuleType:
    """The module that runs these options: this one, or `digits_density`."""
    return digits_density if args.data == "digits" else sys.modules[__name__]


def configure(args: argparse.Namespace) -> None:
    """Check that --baseline names a finished cnf run."""
    if args.baseline is not None:
        read_baseline(args.baseline)


def _split(key: PRNGKeyArray) -> Array:
    """The model, training, test and plot keys of a run."""
    return jr.split(key, 4)


def build(
    args: argparse.Namespace, key: PRNGKeyArray
) -> tuple[no.CNF, optax.GradientTransformation]:
    """The flow and its optimiser (Adam, warmup and cosine decay)."""
    steps = args.steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(100, max(1, steps // 10)), steps, args.lr / 20
    )
    return make_flow(args, _split(key)[0]), optax.adam(schedule)


def make_flow(args: argparse.Namespace, key: PRNGKeyArray) -> no.CNF:
    """The flow: a concat-squash MLP field (tanh) inside `neuralode.CNF`."""
    field = no.nn.ConcatSquashMLP(
        2, args.width, args.depth, key=key, activation=jnp.tanh, dtype=DTYPE
    )
    return no.CNF(field, rtol=args.rtol, atol=args.atol)


def _flow_fevals(flow: no.CNF, z0: Array) -> tuple[Array, Array]:
    """Function evaluations of the sampling ODE dz/dt = f and of its adjoint."""
    ts = jnp.asarray([flow.t0, flow.t1], DTYPE)
    kw: dict[str, Any] = dict(solver=flow.solver, rtol=flow.rtol, atol=flow.atol)
    fwd = no.solve(flow.field, z0, ts, **kw).stats["num_fevals"]
    adjoint = flow.adjoint  # the experiment's flows use the default backsolve
    assert isinstance(adjoint, no.BacksolveAdjoint | no.InterpolatingAdjoint)
    bwd = no.backward_stats(flow.field, z0, ts, adjoint=adjoint, **kw)
    return fwd, bwd["num_fevals"]


def run(ctx: Run) -> dict[str, Any]:
    """Train the flow by maximum likelihood and evaluate it."""
    args = ctx.args
    _, train_key, test_key, plot_key = _split(ctx.key)
    optimiser = ctx.optimiser
    state = ctx.parallel.replicate(ctx.state)
    regs, weight = tuple(args.reg), args.reg_weight

    @eqx.filter_jit
    def step(state: TrainState, x, key):
        del key

        def loss_fn(flow):
            if not regs:
                nll = -jnp.mean(flow.log_prob(x))
                return nll, {"nll": nll}
            logp, penalties = flow.log_prob(x, regularize=True)
            nll = -jnp.mean(logp)
            logs = {"nll": nll} | {r: jnp.mean(penalties[r]) for r in regs}
            return nll + weight * sum(logs[r] for r in regs), logs

        (loss, logs), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            state.model
        )
        params = eqx.filter(state.model, eqx.is_array)
        updates, opt_state = optimiser.update(grads, state.opt_state, params)
        flow = eqx.apply_updates(state.model, updates)
        return TrainState(flow, opt_state, state.step + 1), {"loss": loss, **logs}

    def batch_fn(i: int):
        x = no.datasets.toy_2d(args.data, args.batch_size, key=jr.fold_in(train_key, i))
        return ctx.parallel.shard(x)

    state, summary = ctx.train(state, step, batch_fn, train_key)
    flow = state.model
    metrics = {
        "data": args.data,
        "reg": list(regs),
        "steps": int(state.step),
        "train_seconds": summary["train_seconds"],
        "compile_seconds": summary["compile_seconds"],
        "steps_per_second": summary["steps_per_second"],
        "devices": ctx.parallel.num_devices,
        "train_nll_final": mean_of_history(summary["history"], "nll", 0.05),
    }
    metrics |= _evaluate(flow, args, test_key)
    metrics |= baseline_savings(metrics, args.baseline)
    metrics["history"] = summary["history"][-200:]
    if summary["history"]:
        plot_loss(summary["history"], ctx.directory / "loss.png", "loss")
    _plot(flow, args.data, plot_key, ctx.directory / "density.png", args.quick)
    return metrics


def _evaluate(flow: no.CNF, args: argparse.Namespace, key: PRNGKeyArray) -> dict:
    """Test NLL (at a tight tolerance), entropy gap and function evaluations."""
    k_test, k_z = jr.split(key)
    # Chunks of the plot grid's size: one compilation serves both.
    chunk = _grid_size(args.quick) ** 2
    num_test = chunk * max(1, round(args.num_test / chunk))
    x = no.datasets.toy_2d(args.data, num_test, key=k_test).reshape(-1, chunk, 2)
    tight = eqx.tree_at(lambda f: (f.rtol, f.atol), flow, (args.eval_tol,) * 2)
    logp = jnp.concatenate([_log_prob(tight, xi) for xi in x])
    nll = -float(jnp.mean(logp))
    out: dict[str, Any] = {
        "test_nll": nll,
        "test_nll_stderr": float(jnp.std(logp) / np.sqrt(num_test)),
        "num_test": num_test,
        "eval_tol": args.eval_tol,
    }
    try:
        entropy = no.datasets.toy_2d_entropy(args.data)
    except NotImplementedError:
        entropy = None
    if entropy is not None:
        out["data_entropy"] = entropy
        out["nll_gap_to_entropy"] = nll - entropy
    z0 = jr.normal(k_z, (args.batch_size, 2), DTYPE)
    fwd, bwd = eqx.filter_jit(_flow_fevals)(flow, z0)
    out["nfe_forward"] = int(fwd)
    out["nfe_backward"] = int(bwd)
    return out


def baseline_savings(metrics: dict[str, Any], baseline: str | None) -> dict:
    """Function evaluations saved relative to an (unregularized) baseline run."""
    if baseline is None:
        return {}
    base = read_baseline(baseline)
    return {
        "baseline": str(baseline),
        "baseline_nfe_forward": base["nfe_forward"],
        "baseline_nfe_backward": base["nfe_backward"],
        "nfe_forward_saved": base["nfe_forward"] - metrics["nfe_forward"],
        "nfe_backward_saved": base["nfe_backward"] - metrics["nfe_backward"],
        "baseline_test_nll": base["test_nll"],
    }


def read_baseline(baseline: str) -> dict[str, Any]:
    """The metrics of the --baseline run, or a `UsageError` saying what is amiss."""
    path = Path(baseline)
    path = (path if path.is_dir() else path.parent) / METRICS
    if not path.is_file():
        raise UsageError(f"--baseline {baseline}: no finished run ({path} is missing)")
    metrics = read_run_json(path)
    missing = {"nfe_forward", "nfe_backward", "test_nll"} - set(metrics)
    if metrics.get("experiment") != NAME or missing:
        raise UsageError(f"--baseline {baseline}: {path} is not a cnf run's metrics")
    return metrics


def _plot(flow: no.CNF, data: str, key: PRNGKeyArray, path: Path, quick: bool) -> None:
    """Data, samples and the learned (and, if known, the true) density."""
    n = _grid_size(quick)
    axis = np.linspace(-LIMIT, LIMIT, n, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, indexing="xy"), axis=-1).reshape(-1, 2)
    k_data, k_sample = jr.split(key)
    num = 256 if quick else 2000
    x = np.asarray(no.datasets.toy_2d(data, num, key=k_data))
    samples = np.asarray(eqx.filter_jit(lambda f, k: f.sample(k, num))(flow, k_sample))
    logp = _log_prob(flow, jnp.asarray(grid))
    density = np.exp(np.asarray(logp)).reshape(n, n)
    panels = [("data", x), ("samples", samples), ("learned density", density)]
    try:
        true = np.exp(np.asarray(no.datasets.toy_2d_log_density(data, grid)))
        panels.append(("true density", true.reshape(n, n)))
    except NotImplementedError:
        pass
    fig, axes = new_figure(len(panels), size=3.0)
    extent = (-LIMIT, LIMIT, -LIMIT, LIMIT)
    for ax, (title, values) in zip(axes, panels, strict=True):
        if values.ndim == 2 and values.shape[1] == 2:
            ax.scatter(*values.T, s=1, alpha=0.5)
        else:
            ax.imshow(values, origin="lower", extent=extent, cmap="magma")
        ax.set_xlim(-LIMIT, LIMIT)
        ax.set_ylim(-LIMIT, LIMIT)
        ax.set_aspect("equal")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)
