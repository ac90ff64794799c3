"""Measurement shared by the JAX libraries (neuralode, diffrax, jax.experimental.ode).

A JAX runner only supplies ``make_solve(field) -> solve`` with
``solve(y0, params, ts) -> (ys, steps)``: ``ys`` stacked over the output times
``ts`` (``ts[0]`` the initial time) and ``steps`` the number of solver steps or
None. (A runner with its own high-level API, such as ``neuralode.CNF``, may
instead supply ``make_output(field) -> output`` returning the compared output
directly.) Everything else — jitting, timing, evaluation counts, the limit,
errors and compiled memory — is done here identically for every library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import cache, syncs
from ..fields import (
    FIELDS,
    cnf_log_density,
    flat,
    jax_inputs,
    rel_error,
    sum_squares_loss,
)
from ..problems import Problem
from ..timing import (
    EvalCounter,
    compiled_temp_bytes,
    first_call,
    jax_sync,
    limit_callable,
    repeat,
)
from .common import (
    RunSettings,
    join_notes,
    limit_vjps,
    new_row,
    shorten_error,
    step_cap_note,
    timing_values,
)

SolveFn = Callable[[Any, Any, Any], tuple[Any, Any]]
MakeSolve = Callable[[Callable], SolveFn]
#: ``make_output(field)(y0, params, ts) -> (output, steps)``
MakeOutput = Callable[[Callable], SolveFn]


def _final(ys: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a[-1], ys)


def _forward_output(problem: Problem, ys: Any) -> Any:
    """What the forward program returns and is compared with the reference."""
    if problem.kind == "cnf":
        return cnf_log_density(_final(ys))
    if problem.kind == "grad":
        return _final(ys)
    return ys


def _reference_output(problem: Problem, ref: dict | None) -> np.ndarray | None:
    if ref is None:
        return None
    return {"fwd": ref.get("ys"), "grad": ref.get("y_final"), "cnf": ref.get("logp")}[
        problem.kind
    ]


def _loss(problem: Problem, output: Any) -> Any:
    """The differentiated loss, from the forward output."""
    if problem.kind == "cnf":
        return jnp.mean(output)
    return sum_squares_loss(output)


def output_from_solve(problem: Problem, make_solve: MakeSolve) -> MakeOutput:
    """Turn a ``make_solve`` into a ``make_output`` for `problem`."""

    def make_output(field: Callable) -> SolveFn:
        solve = make_solve(field)

        def output(y0: Any, params: Any, ts: Any) -> tuple[Any, Any]:
            ys, steps = solve(y0, params, ts)
            return _forward_output(problem, ys), steps

        return output

    return make_output


def _all_finite(tree: Any) -> bool:
    return bool(np.all(np.isfinite(flat(tree))))


class _JaxProblem:
    """Programs and inputs of one problem for one library variant."""

    def __init__(
        self, problem: Problem, make_output: MakeOutput, field: Callable
    ) -> None:
        self.problem = problem
        self.make_output = make_output
        self.field = field
        self.limit_field = FIELDS[problem.field]
        self.y0, self.params, self.ts = jax_inputs(problem)
        self.t_limit = self.ts[0]

    def forward_program(self, field: Callable) -> Callable:
        return jax.jit(self.make_output(field))

    def grad_program(self, field: Callable) -> Callable:
        output = self.make_output(field)

        def loss(params: Any, y0: Any, ts: Any) -> Any:
            return _loss(self.problem, output(y0, params, ts)[0])

        return jax.jit(jax.grad(loss))

    def count_forward(self) -> tuple[int, Any]:
        """Forward evaluations and steps, from a separate counting run."""
        counter = EvalCounter()
        program = self.forward_program(counter.wrap(self.field))
        holder: dict[str, Any] = {}

        def call() -> Any:
            holder["out"] = program(self.y0, self.params, self.ts)
            return holder["out"]

        nfe = counter.measure(call)
        steps = holder["out"][1]
        return nfe, None if steps is None else int(steps)

    def limit(self, n_fwd: int, n_bwd: int) -> Callable[[], Any]:
        """The limit program for these evaluation counts."""
        return limit_callable(
            self.limit_field, self.y0, self.params, self.t_limit, n_fwd, n_bwd
        )

    def count_grad(self) -> int:
        """Total evaluations of one gradient call, from a separate counting run."""
        counter = EvalCounter()
        program = self.grad_program(counter.wrap(self.field))
        return counter.measure(lambda: program(self.params, self.y0, self.ts))


def _warm_first_call(
    program: Any, args: tuple, settings: RunSettings, forward: bool
) -> dict[str, Any]:
    """The first call alone (the warm-cache worker), with a note on cache misses;
    then, for a forward program, its synchronisations if asked for."""
    events = cache.events()
    looked_up, hits = events.snapshot()
    first_s, _ = first_call(lambda: program(*args), jax_sync)
    after = events.snapshot()
    looked_up, hits = after[0] - looked_up, after[1] - hits
    callbacks: set[str] = set()
    if hits < looked_up:
        callbacks = cache.callback_targets(program.lower(*args).as_text())
    values = {"first_call_s": first_s}
    values["message"] = cache.warm_note(looked_up, hits, callbacks)
    if forward and settings.count_syncs:
        values["syncs"] = syncs.measure(program, args, settings.device)
    return values


def _measured(
    program: Any, args: tuple, settings: RunSettings, values: dict[str, Any]
) -> dict[str, Any]:
    """Hand a measured program to `settings.keep_program`; returns `values`."""
    if settings.keep_program is not None:
        settings.keep_program(program, args)
    return values


def _forward_row(
    jp: _JaxProblem, task: str, ref: dict | None, settings: RunSettings
) -> dict[str, Any]:
    problem = jp.problem
    program = jp.forward_program(jp.field)
    args = (jp.y0, jp.params, jp.ts)
    if settings.first_call_only:
        return _warm_first_call(program, args, settings, forward=True)
    first_s, (out, _) = first_call(lambda: program(*args), jax_sync)
    values: dict[str, Any] = {"temp_bytes": compiled_temp_bytes(program, *args)}
    notes = []
    if not _all_finite(out):
        values["status"] = "failed"
        notes.append("non-finite result")
    reference = _reference_output(problem, ref)
    if reference is not None:
        got = out[1:] if problem.kind == "fwd" else out
        want = reference[1:] if problem.kind == "fwd" else reference
        values["error"] = rel_error(got, want)
    limit = None
    if settings.count_evals:
        nfe, steps = jp.count_forward()
        values.update(nfe_fwd=nfe, steps=steps)
        notes.append(step_cap_note(problem, nfe))
        if settings.measure_limit and nfe:
            limit = jp.limit(nfe, 0)
    timing = repeat(lambda: program(*args), jax_sync, settings.timing, first_s, limit)
    values.update(timing_values(timing))
    values["message"] = join_notes(*notes)
    if settings.count_syncs:
        measured = syncs.measure(program, args, settings.device)
        values["syncs"] = syncs.per_step(measured, values.get("nfe_fwd"))
    return _measured(program, args, settings, values)


def _grad_row(
    jp: _JaxProblem, variant: str, ref: dict | None, settings: RunSettings
) -> dict[str, Any]:
    problem = jp.problem
    program = jp.grad_program(jp.field)
    args = (jp.params, jp.y0, jp.ts)
    if settings.first_call_only:
        return _warm_first_call(program, args, settings, forward=False)
    first_s, grads = first_call(lambda: program(*args), jax_sync)
    values: dict[str, Any] = {"temp_bytes": compiled_temp_bytes(program, *args)}
    notes = []
    if not _all_finite(grads):
        values["status"] = "failed"
        notes.append("non-finite gradient")
    if ref is not None and "grad" in ref:
        values["error"] = rel_error(flat(grads), ref["grad"])
    limit = None
    if settings.count_evals and settings.count_grad_evals:
        nfe_fwd, steps = jp.count_forward()
        nfe_bwd = jp.count_grad() - nfe_fwd
        values.update(nfe_fwd=nfe_fwd, nfe_bwd=nfe_bwd, steps=steps)
        notes += [step_cap_note(problem, nfe_fwd), step_cap_note(problem, nfe_bwd)]
        if settings.measure_limit and nfe_fwd:
            limit = jp.limit(nfe_fwd, limit_vjps(variant, nfe_fwd, nfe_bwd))
    timing = repeat(lambda: program(*args), jax_sync, settings.timing, first_s, limit)
    values.update(timing_values(timing))
    values["message"] = join_notes(*notes)
    return _measured(program, args, settings, values)


def run_jax(
    problem: Problem,
    variant: str,
    ref: dict | None,
    settings: RunSettings,
    *,
    library: str,
    version: str,
    make_solve: MakeSolve | None = None,
    make_output: MakeOutput | None = None,
    field: Callable | None = None,
) -> list[dict]:
    """Measure every task of `problem` with the solver of `make_solve`.

    `make_output` replaces `make_solve` for runners that produce the compared
    output themselves; `field` then replaces the problem's vector field as the
    function handed to it (the limit always uses the problem's field).
    """
    if make_output is None:
        if make_solve is None:
            raise ValueError("need make_solve or make_output")
        make_output = output_from_solve(problem, make_solve)
    jp = _JaxProblem(problem, make_output, field or FIELDS[problem.field])
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]]
    if problem.kind == "fwd":
        jobs = [("fwd", lambda: _forward_row(jp, "fwd", ref, settings))]
    elif problem.kind == "grad":
        jobs = [("grad", lambda: _grad_row(jp, variant, ref, settings))]
    else:
        jobs = [
            ("logp", lambda: _forward_row(jp, "logp", ref, settings)),
            ("grad", lambda: _grad_row(jp, variant, ref, settings)),
        ]
    rows = []
    for task, job in jobs:
        try:
            values = job()
        except Exception as exc:
            if settings.verbose:
                import traceback

                traceback.print_exc()
            values = {"status": "failed", "message": shorten_error(exc)}
        rows.append(new_row(problem, library, variant, task, version=version, **values))
    return rows
