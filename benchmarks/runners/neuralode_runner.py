"""neuralode: ``neuralode.solve`` with Dopri5 and the adjoint of the variant."""

from __future__ import annotations

from typing import Any

from ..fields import FIELDS
from ..problems import Problem
from .common import (
    LOOSE_BACKSOLVE,
    LOOSE_INTERPOLATING,
    REVERSIBLE_HALF,
    RunSettings,
    Skipped,
)
from .jax_common import run_jax

_ADJOINTS = {
    "backsolve": "BacksolveAdjoint",
    "checkpoint": "CheckpointAdjoint",
    "reversible": "ReversibleAdjoint",
    "interpolating": "InterpolatingAdjoint",
}


def _cnf_class(no: Any) -> Any:
    """``neuralode.CNF`` (or ``neuralode.cnf.CNF``), or raise `Skipped`."""
    cnf = getattr(no, "CNF", None)
    if cnf is None:
        try:
            from neuralode.cnf import CNF as cnf
        except ImportError:
            raise Skipped("neuralode.CNF not available yet") from None
    return cnf


def _run_cnf_class(
    no: Any, problem: Problem, ref: dict | None, settings: RunSettings
) -> list[dict]:
    """The CNF problem through ``neuralode.CNF(...).log_prob`` (its defaults).

    ``CNF`` puts the data at ``t1`` and integrates ``dz/dt = f`` backward to
    ``t0``; with ``f(t, z) = -g(t0 + t1 - t, z)`` that is exactly the forward
    flow of the benchmark field ``g`` from the data, so the log-densities and
    gradients are comparable with the other rows. The evaluation count is of
    ``g`` (one primal per augmented evaluation in neuralode's exact trace).
    """
    cnf_class = _cnf_class(no)
    t0, t1 = float(problem.ts[0]), float(problem.ts[-1])

    def make_output(g: Any) -> Any:
        def output(y0: Any, params: Any, ts: Any) -> tuple[Any, Any]:
            def f(t: Any, z: Any, args: Any) -> Any:
                return -g(t0 + t1 - t, z, params)

            cnf = cnf_class(
                f,
                t0=t0,
                t1=t1,
                rtol=problem.rtol,
                atol=problem.atol,
                max_steps=problem.max_steps,
                dim=problem.y0.shape[-1],
            )
            return cnf.log_prob(y0[0]), None

        return output

    return run_jax(
        problem,
        "CNF",
        ref,
        settings,
        library="neuralode",
        version=no.__version__,
        make_output=make_output,
        field=FIELDS["mlp_t"],
    )


def _adjoint(no: Any, variant: str, problem: Problem) -> Any:
    """The adjoint object of `variant` (None: the library default)."""
    if variant == "dopri5":
        return None
    if variant == LOOSE_BACKSOLVE:
        return no.BacksolveAdjoint(rtol=10 * problem.rtol, atol=10 * problem.atol)
    if variant == LOOSE_INTERPOLATING:
        loose = {"rtol": 10 * problem.rtol, "atol": 10 * problem.atol}
        return no.InterpolatingAdjoint(**loose)
    if variant == REVERSIBLE_HALF:
        return no.ReversibleAdjoint(coupling=0.5)
    if variant not in _ADJOINTS:
        raise Skipped(f"unknown neuralode variant {variant!r}")
    name = _ADJOINTS[variant]
    if not hasattr(no, name):
        raise Skipped(f"neuralode.{name} not available yet")
    return getattr(no, name)()


def run(
    problem: Problem, variant: str, ref: dict | None, settings: RunSettings
) -> list[dict]:
    """Measure neuralode on `problem` with adjoint `variant`."""
    import neuralode as no

    if not hasattr(no, "solve"):
        raise Skipped("neuralode.solve not available yet")
    if variant == "CNF":
        return _run_cnf_class(no, problem, ref, settings)
    adjoint = _adjoint(no, variant, problem)
    extra = {} if adjoint is None else {"adjoint": adjoint}

    def make_solve(field: Any) -> Any:
        def solve(y0: Any, params: Any, ts: Any) -> tuple[Any, Any]:
            sol = no.solve(
                field,
                y0,
                ts,
                params,
                solver=no.Dopri5(),
                rtol=problem.rtol,
                atol=problem.atol,
                max_steps=problem.max_steps,
                **extra,
            )
            return sol.ys, sol.stats.get("num_steps")

        return solve

    return run_jax(
        problem,
        variant,
        ref,
        settings,
        library="neuralode",
        version=no.__version__,
        make_solve=make_solve,
    )
