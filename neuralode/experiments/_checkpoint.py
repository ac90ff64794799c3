"""Checkpoints (model, optimiser state, step, via equinox) and the loss history."""

from __future__ import annotations

import math
from pathlib import Path
from typing import IO, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Int, PyTree

from ._output import (
    CHECKPOINT,
    CONFIG,
    HISTORY,
    METRICS,
    UsageError,
    atomic_open,
    read_run_json,
    write_json,
)

History = list[dict[str, Any]]


class TrainState(eqx.Module):
    """Everything training needs to continue: model, optimiser state, step.

    The random keys of every step are derived from the seed and the step
    number, so no key is stored and a resumed run draws the same batches as an
    uninterrupted one.
    """

    model: PyTree
    opt_state: PyTree
    step: Int[Array, ""]


def initial_state(model: PyTree, opt_state: PyTree) -> TrainState:
    """A `TrainState` at step 0."""
    return TrainState(model, opt_state, jnp.asarray(0, jnp.int32))


def save_checkpoint(directory: Path, state: TrainState) -> Path:
    """Serialise `state` to `directory/checkpoint.eqx` (written atomically)."""
    path = directory / CHECKPOINT
    with atomic_open(path, "wb") as f:
        eqx.tree_serialise_leaves(f, state)
    return path


def save_progress(directory: Path, state: TrainState, history: History) -> None:
    """Write the history, then the checkpoint; each file atomically.

    In this order an interruption in between leaves a history that reaches at
    least the checkpoint's step; `load_history` drops any rows beyond it.
    """
    write_json(directory / HISTORY, {"history": history})
    save_checkpoint(directory, state)


def checkpoint_path(resume: str) -> Path:
    """The checkpoint file named by `--resume` (a run directory or the file)."""
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UsageError(f"No checkpoint at {path}.")
    return path


class _Mismatch(ValueError):
    """An array of the checkpoint has another shape or dtype than the model's."""


def _checked_read(f: IO[bytes], like: Any) -> Any:
    """Equinox's deserialise filter, checking each array's shape and dtype."""
    out = eqx.default_deserialise_filter_spec(f, like)
    if isinstance(like, jax.Array | np.ndarray):
        found, wanted = _describe(out), _describe(like)
        if found != wanted:
            raise _Mismatch(
                f"{found} in the file but {wanted} in the model these options build"
            )
    return out


def _describe(array: Any) -> str:
    return f"{np.dtype(array.dtype).name}{list(array.shape)}"


def _root_cause(e: BaseException) -> tuple[BaseException, str]:
    """The error under equinox's per-leaf wrappers, and the leaf's path."""
    leaf_path = getattr(e, "path", None)
    path = jtu.keystr(leaf_path) if isinstance(leaf_path, tuple) else ""
    while e.__cause__ is not None and isinstance(e, RuntimeError):
        e = e.__cause__
    return e, path


def load_checkpoint(path: Path, template: TrainState, experiment: str) -> TrainState:
    """Load `path` into `template`, checking that it is a checkpoint of that model.

    The template fixes the architecture (built from the run's options), the
    file supplies every array. A file that is truncated, not a checkpoint, or
    of another architecture (an array of another shape or dtype, or arrays
    left over) raises a one-line `UsageError` naming `path`.
    """
    try:
        with open(path, "rb") as f:
            state = eqx.tree_deserialise_leaves(f, template, _checked_read)
            left_over = f.read(1)
    except (OSError, EOFError, ValueError, RuntimeError) as e:
        raise UsageError(_load_error(path, experiment, e)) from None
    if left_over:
        raise UsageError(
            f"cannot resume from {path}: it holds more arrays than the "
            f"{experiment} model these options build (a checkpoint of another "
            "architecture?)"
        )
    return state


def _load_error(path: Path, experiment: str, error: BaseException) -> str:
    """The one-line message of a checkpoint that failed to load."""
    cause, leaf = _root_cause(error)
    at = f" at {leaf}" if leaf else ""
    if isinstance(cause, _Mismatch):
        return (
            f"cannot resume from {path}: it does not fit the {experiment} model "
            f"these options build: the array{at} is {cause}"
        )
    reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return (
        f"cannot resume from {path}: the file is truncated or not a checkpoint "
        f"(reading the array{at}: {reason})"
    )


def saved_config(resume: str) -> dict[str, Any]:
    """The configuration saved next to the checkpoint named by `--resume`."""
    path = checkpoint_path(resume).parent / CONFIG
    return read_run_json(path) if path.is_file() else {}


def load_history(directory: Path, step: int) -> History:
    """The logged rows up to `step` of the run in `directory`.

    Read from `history.json`, or for older runs from `metrics.json`; JSON
    nulls (non-finite values) come back as NaN.
    """
    for name in (HISTORY, METRICS):
        path = directory / name
        if path.is_file():
            rows = read_run_json(path).get("history", [])
            return [_row(r) for r in rows if isinstance(r, dict) and _step(r) <= step]
    return []


def _step(row: dict[str, Any]) -> float:
    step = row.get("step")
    return step if isinstance(step, int | float) else math.inf


def _row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: math.nan if v is None else v for k, v in row.items()}
