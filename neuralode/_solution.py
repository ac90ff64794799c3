"""The result of a solve and its status codes."""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
from jaxtyping import Array, Bool, Int, PyTree, Real


class _Results:
    """Integer status codes carried by `Solution.result`.

    `RESULTS.successful` is 0; every other code is a failure whose meaning is
    `RESULTS.message(code)`.
    """

    successful: ClassVar[int] = 0
    max_steps_reached: ClassVar[int] = 1
    dt_underflow: ClassVar[int] = 2
    nonfinite: ClassVar[int] = 3
    adjoint_drift: ClassVar[int] = 4
    invalid_ts: ClassVar[int] = 5
    implicit_not_converged: ClassVar[int] = 6
    reversible_unstable: ClassVar[int] = 7

    _messages: ClassVar[dict[int, str]] = {
        0: "successful",
        1: "max_steps reached",
        2: "step size underflow",
        3: "non-finite values in the state or vector field",
        4: "the backward solve of BacksolveAdjoint lost the forward solution",
        5: "ts not finite and strictly monotonic (checked at run time)",
        6: "the implicit solver's Newton iterations did not converge",
        7: "the reversible scheme of ReversibleAdjoint was unstable (its two "
        "states drifted apart)",
    }

    def message(self, code: int) -> str:
        return self._messages.get(int(code), f"unknown result code {int(code)}")

    def __repr__(self) -> str:
        codes = ", ".join(f"{k}={v}" for v, k in self._messages.items())
        return f"RESULTS({codes})"


RESULTS = _Results()
"""The status codes of `Solution.result`: `RESULTS.successful` (0),
`max_steps_reached`, `dt_underflow`, `nonfinite`, `adjoint_drift`,
`invalid_ts`, `implicit_not_converged`, `reversible_unstable`;
`RESULTS.message(code)` says what a code means."""


class Solution(eqx.Module):
    """What `neuralode.solve` returns.

    **Fields:**

    - `ts`: the output times, as given.
    - `ys`: the solution at `ts`, a pytree like `y0` with a leading axis `len(ts)`.
    - `stats`: integer arrays `num_steps` (accepted + rejected), `num_accepted`,
      `num_rejected`, `num_fevals` (vector-field evaluations of the forward
      solve), `num_jacobians` (evaluations of ∂f/∂y: implicit methods only).
    - `result`: 0 on success, else a code of `neuralode.RESULTS`.
    - With `event=`: `event_time` (the event's time, `ts[-1]` if none
      happened), `event_state` (the state then, a pytree like `y0`),
      `event_happened` (a boolean) and `event_index` (which condition fired
      first; 0 if none). All four are None for a solve without an event.
    """

    ts: Real[Array, " times"]
    ys: PyTree[Array]
    stats: dict[str, Int[Array, ""]]
    result: Int[Array, ""]
    event_time: Real[Array, ""] | None = None
    event_state: PyTree[Array] | None = None
    event_happened: Bool[Array, ""] | None = None
    event_index: Int[Array, ""] | None = None

    @property
    def successful(self) -> Any:
        return self.result == RESULTS.successful
