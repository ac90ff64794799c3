"""Device-to-host synchronisations of a solver's loop.

On a GPU, XLA decides each ``while`` iteration and each ``conditional`` on the
host: it copies the predicate (or branch index) to the host and waits for it,
so every loop iteration costs at least one device-to-host synchronisation, and
every conditional left in the loop body (not turned into a ``select``) one
more (JAX issue #2491). Two measurements:

- `control_flow`: from the optimised HLO of the compiled program (any
  backend), the ``while`` loops and ``conditional`` ops and how deeply each
  sits inside loops;
- `device_to_host_copies`: on a GPU, the device-to-host copies in a profile
  of one call (``jax.profiler``), the measured count.

`measure` runs both on a compiled program (the harness does so in the
warm-cache worker, so that a failing profiler costs no timed row); `per_step`
divides by the number of attempted steps, estimated for every library alike
from the evaluation count (Dopri5: six evaluations per attempted step).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .runners.common import EVALS_PER_STEP

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")
_CALLEES = re.compile(
    r"\b(?:condition|body|calls|to_apply|true_computation|false_computation)"
    r"=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
#: Event names of device-to-host copies in a GPU profile (CUPTI's memcpy kinds).
_D2H = re.compile(r"(?i)(d2h|dtoh|device\s*to\s*host)")


@dataclasses.dataclass
class ControlFlow:
    """Static control flow of a compiled program.

    - `loops`: ``while`` ops reachable from the entry computation.
    - `max_depth`: deepest nesting of loops (1: no loop inside a loop).
    - `conditionals_in_loops`: ``conditional`` ops inside some loop's body or
      condition (each one a synchronisation whenever it runs on a GPU).
    - `loops_in_loops`: ``while`` ops inside another loop.
    """

    loops: int = 0
    max_depth: int = 0
    conditionals_in_loops: int = 0
    loops_in_loops: int = 0


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """Instruction lines per computation name, and the entry's name."""
    comps: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        match = _HEADER.match(line)
        if match and line.rstrip().endswith("{"):
            current = match.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            comps[current].append(line)
    return comps, entry


def control_flow(hlo_text: str) -> ControlFlow:
    """Count loops and conditionals in optimised HLO text (``compiled.as_text()``)."""
    comps, entry = _computations(hlo_text)
    result = ControlFlow()
    if entry is None:
        return result

    def visit(name: str, depth: int, seen: tuple[str, ...]) -> None:
        if name in seen or name not in comps:  # guards against malformed text
            return
        for line in comps[name]:
            is_while = " while(" in line
            is_cond = " conditional(" in line
            inner = depth + 1 if is_while else depth
            if is_while:
                result.loops += 1
                result.max_depth = max(result.max_depth, inner)
                result.loops_in_loops += depth >= 1
            if is_cond:
                result.conditionals_in_loops += depth >= 1
            callees = _CALLEES.findall(line)
            for group in _BRANCHES.findall(line):
                callees += [c.strip().lstrip("%") for c in group.split(",")]
            for callee in callees:
                visit(callee, inner, seen + (name,))

    visit(entry, 0, ())
    return result


def device_to_host_copies(call: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Device-to-host copies in a profile of one ``call()`` (run once before).

    Returns the count and the most frequent ``"line: event"`` names on the
    device planes (so that a reader can check what was counted, and that no
    copy appears on two lines).
    """
    import jax

    jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            jax.block_until_ready(call())
        paths = sorted(Path(tmp).rglob("*.xplane.pb"))
        if not paths:
            raise RuntimeError("the profiler wrote no trace")
        data = jax.profiler.ProfileData.from_file(str(paths[-1]))
        names: collections.Counter[str] = collections.Counter()
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                names.update(f"{line.name}: {event.name}" for event in line.events)
    if not names:
        raise RuntimeError("no device events in the profile (is CUPTI there?)")
    copies = sum(
        n for name, n in names.items() if _D2H.search(name.rsplit(": ", 1)[-1])
    )
    return copies, dict(names.most_common(12))


def measure(program: Any, args: tuple, device: str) -> dict[str, Any]:
    """Control flow and (on a GPU) device-to-host copies of one call.

    Never raises: what failed is in the ``error`` entry.
    """
    out: dict[str, Any] = {}
    try:
        flow = control_flow(program.lower(*args).compile().as_text())
        out.update(dataclasses.asdict(flow))
    except Exception as exc:  # a backend without HLO text
        out["error"] = f"HLO: {type(exc).__name__}: {exc}"[:200]
    if device != "gpu":
        return out
    try:
        copies, names = device_to_host_copies(lambda: program(*args))
    except Exception as exc:
        out["error"] = f"profile: {type(exc).__name__}: {exc}"[:200]
        return out
    out["d2h_copies"] = copies
    out["device_events"] = names
    return out


def per_step(measured: dict[str, Any], nfe: int | None) -> dict[str, Any]:
    """`measured` with the copies per attempted step (NFE / 6 steps)."""
    steps = nfe / EVALS_PER_STEP if nfe else None
    copies = measured.get("d2h_copies")
    per = copies / steps if copies is not None and steps else None
    return {**measured, "steps_estimate": steps, "d2h_per_step": per}
