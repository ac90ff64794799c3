"""`digits`: an ODE-Net classifier on scikit-learn's 8×8 digits (Chen et al. §3).

The model is encoder → `NeuralODE` → linear head: a 64-pixel image is mapped to
a hidden state $h(0) = \\tanh(W_e x + b_e)$, evolved by
$\\dot h = f_\\theta(t, h)$ from $t = 0$ to $1$, and classified by a linear map
of $h(1)$. The whole batch is integrated as one ODE (one adaptive step size),
trained with Adam on the cross-entropy; gradients come from the continuous
adjoint. The run reports test accuracy and the mean number of function
evaluations of the forward and the backward (adjoint) solve per batch.
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
from jaxtyping import Array, Float, Int, PRNGKeyArray

import neuralode as no

from ._checkpoint import TrainState
from ._plotting import new_figure, plot_loss, save_figure
from ._run import (
    Run,
    add_common_arguments,
    add_tolerance_arguments,
    positive_float,
    positive_int,
)
from ._training import batch_indices, mean_of_history

NAME = "digits"
HELP = "ODE-Net classifier on scikit-learn's 8x8 digits"
DTYPE = jnp.float32
STEPS = 1500
QUICK = {"steps": 5, "hidden": 8, "width": 16, "batch_size": 32}


class ODENet(eqx.Module):
    """Encoder → `NeuralODE` → linear head, acting on a batch of flat images."""

    encoder: eqx.nn.Linear
    ode: no.NeuralODE
    head: eqx.nn.Linear

    def __init__(
        self,
        hidden: int,
        width: int,
        depth: int,
        *,
        rtol: float,
        atol: float,
        key: PRNGKeyArray,
    ):
        k1, k2, k3 = jr.split(key, 3)
        self.encoder = eqx.nn.Linear(64, hidden, key=k1, dtype=DTYPE)
        field = no.nn.MLPField(hidden, width, depth, key=k2, dtype=DTYPE)
        self.ode = no.NeuralODE(field, t0=0.0, t1=1.0, rtol=rtol, atol=atol)
        self.head = eqx.nn.Linear(hidden, 10, key=k3, dtype=DTYPE)

    def encode(self, x: Float[Array, "B 64"]) -> Float[Array, "B h"]:
        """The initial state h(0) of the ODE block."""
        return jnp.tanh(jax.vmap(self.encoder)(x))

    def classify(self, h1: Float[Array, "B h"]) -> Float[Array, "B 10"]:
        """The logits from the final state h(1)."""
        return jax.vmap(self.head)(h1)

    def __call__(self, x: Float[Array, "B 64"]) -> tuple[Array, Array]:
        """Logits and the forward solve's number of function evaluations."""
        sol = self.ode.solve(self.encode(x))
        return self.classify(sol.ys[-1]), sol.stats["num_fevals"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the digits experiment."""
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=128,
        help="images per training step (at most the training set)",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=3e-3, help="peak learning rate"
    )
    parser.add_argument(
        "--weight-decay", type=float, default=1e-2, help="AdamW weight decay"
    )
    parser.add_argument(
        "--hidden", type=positive_int, default=64, help="size of the ODE state"
    )
    parser.add_argument(
        "--width", type=positive_int, default=64, help="width of the vector field"
    )
    parser.add_argument(
        "--depth",
        type=positive_int,
        default=1,
        help="hidden layers of the vector field",
    )
    add_tolerance_arguments(parser, rtol=1e-3, atol=1e-4)
    add_common_arguments(parser, steps=STEPS, quick_steps=QUICK["steps"])


def configure(args: argparse.Namespace) -> None:
    """Clip --batch-size to the training set, the batch size actually used."""
    num_train = len(no.datasets.digits(seed=args.seed).x_train)
    args.batch_size = min(args.batch_size, num_train)


def _split(key: PRNGKeyArray) -> Array:
    """The model, data-order and training keys of a run."""
    return jr.split(key, 3)


def build(
    args: argparse.Namespace, key: PRNGKeyArray
) -> tuple[ODENet, optax.GradientTransformation]:
    """The ODE-Net and its optimiser (AdamW, warmup and cosine decay)."""
    model = ODENet(
        args.hidden,
        args.width,
        args.depth,
        rtol=args.rtol,
        atol=args.atol,
        key=_split(key)[0],
    )
    steps = args.steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(100, max(1, steps // 10)), steps, args.lr / 100
    )
    return model, optax.adamw(schedule, weight_decay=args.weight_decay)


def _cross_entropy(logits: Array, labels: Int[Array, " B"]) -> Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _backward_fevals(model: ODENet, x: Array, y: Array) -> Array:
    """Function evaluations of the adjoint solve for the batch loss."""
    h0 = model.encode(x)
    ts = jnp.asarray([model.ode.t0, model.ode.t1], h0.dtype)
    adjoint = model.ode.adjoint  # the ODE-Net uses the default backsolve
    assert isinstance(adjoint, no.BacksolveAdjoint | no.InterpolatingAdjoint)
    stats = no.backward_stats(
        model.ode.field,
        h0,
        ts,
        loss=lambda ys: _cross_entropy(model.classify(ys[-1]), y),
        solver=model.ode.solver,
        rtol=model.ode.rtol,
        atol=model.ode.atol,
        adjoint=adjoint,
    )
    return stats["num_fevals"]


def run(ctx: Run) -> dict[str, Any]:
    """Train and evaluate the ODE-Net; returns the metrics."""
    args = ctx.args
    data = no.datasets.digits(seed=args.seed)
    x_train, y_train = data.x_train, data.y_train
    batch_size = args.batch_size
    _, data_key, train_key = _split(ctx.key)
    optimiser = ctx.optimiser
    state = ctx.parallel.replicate(ctx.state)

    @eqx.filter_jit
    def step(state: TrainState, batch, key):
        del key
        x, y = batch

        def loss_fn(model):
            logits, nfe = model(x)
            return _cross_entropy(logits, y), (logits, nfe)

        (loss, (logits, nfe)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            state.model
        )
        params = eqx.filter(state.model, eqx.is_array)
        updates, opt_state = optimiser.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        logs = {"loss": loss, "train_accuracy": acc, "nfe_forward": nfe}
        return TrainState(model, opt_state, state.step + 1), logs

    def batch_fn(i: int):
        idx = batch_indices(data_key, i, len(x_train), batch_size)
        return ctx.parallel.shard((x_train[idx], y_train[idx]))

    state, summary = ctx.train(state, step, batch_fn, train_key)
    pred, metrics = _evaluate(state.model, data, batch_size)
    if summary["history"]:
        plot_loss(summary["history"], ctx.directory / "loss.png", "cross-entropy")
        metrics["train_nfe_forward_mean"] = mean_of_history(
            summary["history"], "nfe_forward", 1.0
        )
    _plot_examples(pred, data, ctx.directory / "predictions.png")
    return {
        "steps": int(state.step),
        "train_seconds": summary["train_seconds"],
        "compile_seconds": summary["compile_seconds"],
        "steps_per_second": summary["steps_per_second"],
        "devices": ctx.parallel.num_devices,
        **metrics,
        "history": summary["history"][-200:],
    }


def _evaluate(
    model: ODENet, data: no.datasets.Digits, batch_size: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Test predictions, accuracy and mean forward/backward evaluations per batch.

    The last batch is padded with copies of test images (ignored when scoring)
    so that every batch has the same shape and one compilation serves all.
    """

    @eqx.filter_jit
    def evaluate(model, x, y):
        logits, nfe = model(x)
        return jnp.argmax(logits, -1), nfe, _backward_fevals(model, x, y)

    n = len(data.x_test)
    batch_size = min(batch_size, n)
    preds, nfe_fwd, nfe_bwd = [], [], []
    tic = time.perf_counter()
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        pred, nfe, nfe_b = evaluate(model, data.x_test[idx], data.y_test[idx])
        preds.append(np.asarray(pred)[: min(batch_size, n - start)])
        nfe_fwd.append(int(nfe))
        nfe_bwd.append(int(nfe_b))
    pred = np.concatenate(preds)
    correct = int(np.sum(pred == data.y_test))
    return pred, {
        "test_accuracy": correct / n,
        "test_error": 1 - correct / n,
        "nfe_forward_per_batch": float(np.mean(nfe_fwd)),
        "nfe_backward_per_batch": float(np.mean(nfe_bwd)),
        "eval_batch_size": batch_size,
        "eval_seconds": time.perf_counter() - tic,
    }


def _plot_examples(pred: np.ndarray, data: no.datasets.Digits, path: Path) -> None:
    """A grid of test digits titled with the predicted (and true) label."""
    num, cols = 24, 8
    x, y, pred = data.x_test[:num], data.y_test[:num], pred[:num]
    fig, axes = new_figure(cols, nrows=math.ceil(num / cols), size=1.2)
    for ax, image, p, t in zip(axes, x, pred, y, strict=True):
        ax.imshow(image.reshape(8, 8), cmap="gray_r")
        ok = p == t
        title = f"{p}" if ok else f"{p} (true {t})"
        ax.set_title(title, fontsize=8, color="black" if ok else "red")
        ax.axis("off")
    save_figure(fig, path)
