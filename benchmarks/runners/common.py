"""Result rows and helpers shared by all runners."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from ..problems import Problem
from ..timing import Timing, TimingSettings

#: Every row has exactly these keys (None where not applicable or unknown).
ROW_KEYS: tuple[str, ...] = (
    "problem",
    "group",
    "library",
    "version",
    "variant",
    "task",
    "status",
    "message",
    "time_median_s",
    "time_min_s",
    "time_max_s",
    "repeats",
    "first_call_s",
    "first_call_warm_s",
    "nfe_fwd",
    "nfe_bwd",
    "steps",
    "error",
    "limit_s",
    "time_over_limit",
    "temp_bytes",
    "syncs",
)

#: neuralode's BacksolveAdjoint with backward tolerances 10× the forward ones.
LOOSE_BACKSOLVE = "backsolve-loose"

#: neuralode's InterpolatingAdjoint with backward tolerances 10× the forward
#: ones (its z comes from the forward solve, so they bound a's error alone).
LOOSE_INTERPOLATING = "interpolating-loose"

#: neuralode's ReversibleAdjoint with coupling 0.5: stable on a flow whose
#: steps contract by up to half (the default 0.999 is not, and refuses).
REVERSIBLE_HALF = "reversible-0.5"

#: Discretise-then-optimise adjoints: the minimum backward work is one VJP per
#: forward evaluation (their other backward evaluations are recomputation).
#: Continuous adjoints need one VJP per backward evaluation.
DISCRETE_ADJOINTS = frozenset({"checkpoint", "recursive-checkpoint"})


def limit_vjps(variant: str, nfe_fwd: int, nfe_bwd: int) -> int:
    """How many VJPs the gradient limit of `variant` includes."""
    return nfe_fwd if variant in DISCRETE_ADJOINTS else max(nfe_bwd, 0)


#: Dopri5 evaluates the field this many times per step (FSAL).
EVALS_PER_STEP = 6


class Skipped(Exception):
    """Raised by a runner for a variant it cannot run (the message says why)."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a runner measures besides time, and where.

    - `device`: ``"cpu"`` or ``"gpu"`` (torch follows it; JAX follows the
      worker's ``JAX_PLATFORMS``).
    - `first_call_only`: time only the first call of each timed program (the
      warm-cache worker); rows carry just ``first_call_s`` and a note.
    - `keep_program`: called with each timed JAX program and its arguments once
      it has been measured (the worker writes them to the persistent cache).
    - `count_syncs`: for forward programs, count the compiled program's loops
      and conditionals and, on a GPU, its device-to-host copies per call
      (`benchmarks.syncs`; in the warm-cache worker when there is one).
    """

    timing: TimingSettings
    count_evals: bool = True
    count_grad_evals: bool = True
    measure_limit: bool = True
    verbose: bool = False
    device: str = "cpu"
    first_call_only: bool = False
    keep_program: Callable[[Callable, tuple], None] | None = None
    count_syncs: bool = False


def tasks(problem: Problem) -> tuple[str, ...]:
    """The measured tasks: ``fwd``, ``grad``, or for a CNF ``logp`` and ``grad``."""
    return {"fwd": ("fwd",), "grad": ("grad",), "cnf": ("logp", "grad")}[problem.kind]


def new_row(
    problem: Problem, library: str, variant: str, task: str, **values: Any
) -> dict:
    """A row with every key of `ROW_KEYS`, filled from `values`."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(problem=problem.name, group=problem.group, library=library)
    row.update(variant=variant, task=task, status="ok")
    unknown = set(values) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"unknown row keys {sorted(unknown)}")
    row.update(values)
    return row


def skipped_rows(
    problem: Problem, library: str, variant: str, message: str
) -> list[dict]:
    """One skipped row per task."""
    return [
        new_row(problem, library, variant, t, status="skipped", message=message)
        for t in tasks(problem)
    ]


def failed_rows(
    problem: Problem, library: str, variant: str, message: str
) -> list[dict]:
    """One failed row per task."""
    return [
        new_row(problem, library, variant, t, status="failed", message=message)
        for t in tasks(problem)
    ]


_KEY_PHRASES = (
    "lost the forward solution",
    "refused the gradient",
    "max_steps",
    "max_num_steps",
    "maximum number of",
    "nan",
    "step size",
)


def shorten_error(exc: BaseException, limit: int = 160) -> str:
    """The most telling line of an exception message, at most `limit` characters."""
    text = str(exc).strip() or type(exc).__name__
    # A neuralode failure raised from compiled code: its own message, not the
    # callback's traceback around it.
    raised = re.search(r"SolveError: (neuralode: [^\n]*)", text)
    if raised is not None:
        chosen = f"SolveError: {raised.group(1)}"
        return chosen if len(chosen) <= limit else chosen[: limit - 1] + "…"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    chosen = lines[0] if lines else text
    for line in lines:
        if any(p in line.lower() for p in _KEY_PHRASES):
            chosen = line
            break
    chosen = re.sub(r"\s+", " ", f"{type(exc).__name__}: {chosen}")
    return chosen if len(chosen) <= limit else chosen[: limit - 1] + "…"


def timing_values(timing: Timing) -> dict[str, Any]:
    """Row values of a `Timing`."""
    return {
        "time_median_s": timing.median_s,
        "time_min_s": timing.min_s,
        "time_max_s": timing.max_s,
        "repeats": timing.repeats,
        "first_call_s": timing.first_call_s,
        "limit_s": timing.limit_s,
        "time_over_limit": timing.time_over_limit,
    }


def step_cap_note(problem: Problem, nfe: int | None) -> str | None:
    """A note when an evaluation count shows that the step cap was reached."""
    if nfe is None:
        return None
    if nfe >= 0.99 * EVALS_PER_STEP * problem.max_steps:
        return f"{nfe} evaluations: step cap ({problem.max_steps}) reached"
    return None


def join_notes(*notes: str | None) -> str | None:
    """Join the non-empty notes with '; '."""
    kept = [n for n in notes if n]
    return "; ".join(kept) if kept else None
