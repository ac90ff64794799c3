"""Checkpoints: the model, the optimiser state and the step, via equinox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree

CHECKPOINT = "checkpoint.eqx"
CONFIG = "config.json"


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
    tmp = path.with_suffix(".tmp")
    eqx.tree_serialise_leaves(tmp, state)
    tmp.replace(path)
    return path


def checkpoint_path(resume: str) -> Path:
    """The checkpoint file named by `--resume` (a run directory or the file)."""
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    return path


def load_checkpoint(path: Path, template: TrainState) -> TrainState:
    """Load a checkpoint into a freshly built `template` of the same structure.

    The template fixes the architecture (it is built from the run's saved
    configuration), the file supplies every array.
    """
    return eqx.tree_deserialise_leaves(path, template)


def saved_config(resume: str) -> dict[str, Any]:
    """The configuration saved next to the checkpoint named by `--resume`."""
    from ._output import read_json

    path = checkpoint_path(resume).parent / CONFIG
    return read_json(path) if path.is_file() else {}
