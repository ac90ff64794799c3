"""The training loop shared by the experiments: jitted steps and a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, PRNGKeyArray
from tqdm.auto import tqdm

from ._checkpoint import History, TrainState, save_progress

StepFn = Callable[[TrainState, Any, PRNGKeyArray], tuple[TrainState, dict[str, Array]]]
BatchFn = Callable[[int], Any]


def train(
    state: TrainState,
    step_fn: StepFn,
    batch_fn: BatchFn,
    *,
    num_steps: int,
    key: PRNGKeyArray,
    desc: str,
    directory: Path,
    progress: bool = True,
    history: History | None = None,
    checkpoint_every: int = 500,
    log_every: int = 10,
) -> tuple[TrainState, dict[str, Any]]:
    """Run `step_fn` from `state.step` up to `num_steps`, with a live loss bar.

    Step `i` gets the batch `batch_fn(i)` and the key `fold_in(key, i)`, so a
    run resumed from a checkpoint sees exactly the batches and keys of an
    uninterrupted one. The checkpoint and the history in `directory` are
    rewritten every `checkpoint_every` steps and at the end.

    **Arguments:**

    - `state`: the initial `TrainState` (possibly loaded from a checkpoint).
    - `step_fn`: `(state, batch, key) -> (state, logs)`, typically wrapped in
      `eqx.filter_jit`; `logs` is a dict of scalars including `"loss"`.
    - `batch_fn`: the batch of step `i` (host arrays, or sharded arrays).
    - `num_steps`: the total number of steps (not the number still to run).
    - `key`: the base PRNG key of the run.
    - `desc`: the label of the progress bar.
    - `directory`: where the checkpoint and `history.json` go.
    - `progress`: show the tqdm bar.
    - `history`: the rows logged before `state.step` (when resuming); the new
      rows are appended to them.
    - `checkpoint_every`, `log_every`: checkpoint and bar-refresh periods.

    **Returns:**

    The final state and a summary: `history` (step, logs) every step since
    the run began, `train_seconds` and `steps_per_second` of this session,
    `first_step`.
    """
    start = int(state.step)
    history = list(history or [])
    pending: list[tuple[int, dict[str, Array]]] = []
    compile_seconds = None
    tic = time.perf_counter()
    with tqdm(
        total=num_steps, initial=start, desc=desc, disable=not progress, leave=True
    ) as bar:
        for i in range(start, num_steps):
            state, logs = step_fn(state, batch_fn(i), jr.fold_in(key, i))
            if compile_seconds is None:
                jax.block_until_ready(logs)
                compile_seconds = time.perf_counter() - tic
            pending.append((i, logs))
            if (i + 1) % checkpoint_every == 0 or (i + 1) % log_every == 0:
                history += _flush(pending)
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if (i + 1) % checkpoint_every == 0:
                save_progress(directory, state, history)
            bar.update(1)
    history += _flush(pending)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - tic
    save_progress(directory, state, history)
    ran = num_steps - start
    return state, {
        "history": history,
        "first_step": start,
        "train_seconds": seconds,
        "compile_seconds": compile_seconds,
        "steps_per_second": ran / seconds if ran and seconds > 0 else None,
    }


def _flush(pending: list[tuple[int, dict[str, Array]]]) -> History:
    """The history rows of the pending `(step index, logs)` pairs; empties it."""
    rows = [{"step": i + 1, **_to_floats(logs)} for i, logs in pending]
    pending.clear()
    return rows


def _to_floats(logs: dict[str, Array]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(logs).items()}


def batch_indices(
    key: PRNGKeyArray, step: int, num_examples: int, batch_size: int
) -> np.ndarray:
    """Indices of the batch of `step`: epochs of shuffled examples, no repeats.

    Epoch `e` is a permutation drawn from `fold_in(key, e)`; a batch that would
    straddle two epochs is taken from the start of the next one, so every batch
    has exactly `batch_size` distinct examples.
    """
    batch_size = min(batch_size, num_examples)
    per_epoch = num_examples // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = np.asarray(jr.permutation(jr.fold_in(key, epoch), num_examples))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def mean_of_history(history: list[dict[str, Any]], name: str, last: float) -> float:
    """The mean of `name` over the last fraction `last` of the logged steps."""
    rows = [row[name] for row in history if name in row]
    if not rows:
        return float("nan")
    tail = rows[-max(1, int(len(rows) * last)) :]
    return float(jnp.mean(jnp.asarray(tail)))
