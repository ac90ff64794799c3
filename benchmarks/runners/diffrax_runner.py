"""diffrax: ``diffeqsolve`` with Dopri5 and a PID (here: I) step-size controller."""

from __future__ import annotations

from typing import Any

from ..problems import Problem
from .common import RunSettings, Skipped
from .jax_common import run_jax


def run(
    problem: Problem, variant: str, ref: dict | None, settings: RunSettings
) -> list[dict]:
    """Measure diffrax on `problem` with adjoint `variant`."""
    import diffrax

    adjoints = {
        "dopri5": diffrax.RecursiveCheckpointAdjoint,
        "backsolve": diffrax.BacksolveAdjoint,
        "recursive-checkpoint": diffrax.RecursiveCheckpointAdjoint,
    }
    if variant not in adjoints:
        raise Skipped(f"unknown diffrax variant {variant!r}")
    adjoint = adjoints[variant]()

    def make_solve(field: Any) -> Any:
        term = diffrax.ODETerm(field)

        def solve(y0: Any, params: Any, ts: Any) -> tuple[Any, Any]:
            sol = diffrax.diffeqsolve(
                term,
                diffrax.Dopri5(),
                t0=ts[0],
                t1=ts[-1],
                dt0=None,
                y0=y0,
                args=params,
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=diffrax.PIDController(
                    rtol=problem.rtol, atol=problem.atol
                ),
                max_steps=problem.max_steps,
                adjoint=adjoint,
            )
            return sol.ys, sol.stats["num_steps"]

        return solve

    return run_jax(
        problem,
        variant,
        ref,
        settings,
        library="diffrax",
        version=diffrax.__version__,
        make_solve=make_solve,
    )
