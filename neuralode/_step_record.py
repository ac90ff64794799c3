"""The record of a solve's accepted steps that `CheckpointAdjoint` replays:
every step's times, and the start states of every stride-th step."""

from __future__ import annotations

from typing import NamedTuple, Protocol, TypeVar

import jax.numpy as jnp
from jaxtyping import Array

from ._packed_loop import LoopState, packed_while_loop
from ._state import State


class StepRecord(NamedTuple):
    """The accepted steps of a solve: step k runs from `times[k]` to
    `times[k + 1]`, measured from the first output time (as the loop measures
    them: replaying a step reproduces its size exactly); `count` steps are
    valid.

    `y_starts[·][j]` is the start state of step j·`stride`, for j·stride <
    count. With B slots the stride starts at 1 and doubles whenever the solve
    reaches step B·stride, keeping every other state (see `thinned_stride`);
    a thinning record has one more slot, where the steps not kept are written.
    """

    y_starts: tuple[Array, ...]
    stride: Array
    times: Array
    count: Array
    # The carry each step was taken with, for a method whose replay needs it
    # (`AbstractSolver.replays_carry`: AutoSwitch's method in use), else None.
    carries: Array | None = None


def kept_slots(requested: int | None, max_steps: int) -> int:
    """How many start states a `StepRecord` keeps: `requested`, at most (and
    by default) `max_steps`, where it keeps every step."""
    return min(requested or max_steps, max_steps)


def thinned_stride(slots: int, max_steps: int) -> int:
    """The largest stride a record of `slots` (>= 2) slots reaches in
    `max_steps` steps: it doubles from S to 2S at step `slots·S` (1 when the
    slots hold every step)."""
    stride = 1
    while slots * stride <= max_steps - 1:
        stride *= 2
    return stride


class RecordingState(LoopState, Protocol):
    """A loop state that records its accepted steps (None where it does not)."""

    @property
    def step_starts(self) -> State | None: ...

    @property
    def stride(self) -> Array | None: ...


R = TypeVar("R", bound=RecordingState)


def thinning_loop(running, body, init: R, slots: int) -> R:
    """The step loop, stopping whenever step k = slots·stride is due to be
    kept: then the record keeps every other state and the stride doubles."""

    def outer_body(state: R) -> R:
        room = lambda s: running(s) & (s.num_accepted < slots * s.stride)
        state = packed_while_loop(room, body, state)
        full = running(state)
        half = (slots + 1) // 2
        # A thinning loop records its steps: both are set.
        assert state.step_starts is not None and state.stride is not None
        starts = tuple(
            jnp.where(full, buffer.at[:half].set(buffer[: 2 * half : 2]), buffer)
            for buffer in state.step_starts
        )
        stride = jnp.where(full, 2 * state.stride, state.stride)
        return state._replace(step_starts=starts, stride=stride)

    return packed_while_loop(running, outer_body, init)
