"""Dense output: reading the outputs off the slots that the step loop fills
with each step's interpolation data, and the chunked loop for small states."""

from __future__ import annotations

from typing import Protocol, TypeVar

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from . import _interpolation as interp
from ._packed_loop import LoopState, packed_while_loop
from ._state import State

Slots = tuple[tuple[Array, ...], ...]
"""Each leaf's slot buffers: its value and interpolation coefficients."""

Buffers = tuple[Slots, Array, "Array | None"]
"""The slots, slot times and (if recorded) output steps of a loop."""


class OutputState(LoopState, Protocol):
    """What the dense output reads of a loop state, besides its buffers."""

    @property
    def out_index(self) -> Array: ...


class ChunkedState(OutputState, Protocol):
    """A loop state with slot buffers, as `chunked_loop` steps it."""

    @property
    def slots(self) -> Slots: ...

    @property
    def slot_times(self) -> Array: ...

    @property
    def out_steps(self) -> Array | None: ...


C = TypeVar("C", bound=ChunkedState)


def read_outputs(
    final: OutputState,
    slots: Slots,
    slot_times: Array,
    out_steps: Array | None,
    tau_out: Array,
    t0: Array,
    y0: State,
) -> tuple[State, Array | None]:
    """Evaluate each output from the slot of the step that covered it.

    Output times equal to t0 are y0 exactly, the last one (when reached) is the
    final state exactly, and outputs the solve never reached are NaN.
    """
    n_out = tau_out.shape[0]
    index = jnp.arange(n_out, dtype=jnp.int32)
    owner = lax.cummax(jnp.where(slot_times[:, 1] != 0, index, 0))
    start, h = slot_times[owner, 0], slot_times[owner, 1]
    theta = ((tau_out - start) / jnp.where(h != 0, h, 1)).astype(jnp.real(y0[0]).dtype)
    reached = index < final.out_index
    last = (index == n_out - 1)[:, None] & reached[-1]
    at_start = (tau_out == t0)[:, None]
    ys = []
    # Without slots (no output inside the span) every output is at t0 or the end.
    slots_or_none = slots or (None,) * len(y0)
    for coeffs, y_final, y_first in zip(slots_or_none, final.y, y0, strict=True):
        if coeffs is None:
            leaf = jnp.full((n_out,) + y_final.shape, jnp.nan, y_final.dtype)
        else:
            data = [c[owner] for c in coeffs]
            leaf = jax.vmap(interp.evaluate)(data[0], jnp.stack(data[1:], 1), theta)
            leaf = jnp.where(reached[:, None], leaf, jnp.nan)
        leaf = jnp.where(last, y_final, leaf)
        ys.append(jnp.where(at_start, y_first, leaf))
    ys = tuple(ys)
    return ys, None if out_steps is None else out_steps[owner]


#: XLA:CPU runs a loop body's kernels one after another, without building a
#: dependency graph, only when every buffer they touch is at most this many
#: bytes (its ThunkExecutor's default threshold; benchmarks/BOUNDS.md measures
#: what crossing it costs a small state's step).
SMALL_BUFFER_BYTES = 512


def output_chunk(y0: State, n_out: int, dense_output: bool, record_steps: bool):
    """How many output slots the step loop keeps at a time, or None for all.

    A small state with many outputs steps in an inner loop whose slot buffers
    stay under `SMALL_BUFFER_BYTES`; an outer loop copies each finished chunk
    of slots into the full buffers. Large states, or few outputs, gain nothing.
    """
    if not dense_output or record_steps:
        return None
    leaf_bytes = max(leaf.size * leaf.dtype.itemsize for leaf in y0)
    # Slot times hold (start, size) pairs of up to 16 bytes.
    chunk = min(SMALL_BUFFER_BYTES // max(leaf_bytes, 1), SMALL_BUFFER_BYTES // 16)
    if chunk < 8 or n_out - 1 <= chunk:
        return None
    return chunk


def chunked_loop(
    running, body, init: C, tau_out: Array, chunk: int
) -> tuple[C, Buffers]:
    """The step loop in chunks of `chunk` outputs: an inner loop steps until
    every slot of its chunk is covered, an outer one stores each chunk.

    `init` holds one chunk's zeroed slot buffers. Full buffers get `chunk`
    slots of padding, so a chunk written at any base fits without clamping.
    """
    n_out = tau_out.shape[0]
    pad = lambda buffer: jnp.zeros((n_out + chunk,) + buffer.shape[1:], buffer.dtype)
    local = (init.slots, init.slot_times, init.out_steps)
    full = jax.tree.map(pad, local)
    padded_times = jnp.concatenate([tau_out, jnp.full(chunk, jnp.inf, tau_out.dtype)])

    def inner_running(state) -> Array:
        return running(state) & (state.out_index < state.base + chunk)

    def outer_body(carry):
        state, full = carry
        base = state.out_index
        state = state._replace(
            window=lax.dynamic_slice_in_dim(padded_times, base, chunk),
            base=base,
            slot_times=jnp.zeros_like(state.slot_times),
        )
        state = packed_while_loop(inner_running, body, state)
        local = (state.slots, state.slot_times, state.out_steps)
        full = jax.tree.map(
            lambda buffer, part: lax.dynamic_update_slice_in_dim(buffer, part, base, 0),
            full,
            local,
        )
        # A step past the chunk's last output covers outputs beyond the window.
        out_index = jnp.searchsorted(
            tau_out, state.t, side="right", method="compare_all"
        )
        return state._replace(out_index=out_index.astype(jnp.int32)), full

    init = init._replace(window=padded_times[:chunk])
    state, full = lax.while_loop(
        lambda carry: running(carry[0]), outer_body, (init, full)
    )
    return state, jax.tree.map(lambda buffer: buffer[:n_out], full)
