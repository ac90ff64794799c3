"""jax.experimental.ode: Dormand–Prince ``odeint`` with its own adjoint."""

from __future__ import annotations

from typing import Any

from ..problems import Problem
from .common import RunSettings, Skipped
from .jax_common import run_jax


def run(
    problem: Problem, variant: str, ref: dict | None, settings: RunSettings
) -> list[dict]:
    """Measure ``jax.experimental.ode.odeint`` on `problem`.

    ``mxstep`` (a cap per output interval; exceeding it is silent) is set to the
    problem's ``max_steps``.
    """
    import jax
    from jax.experimental.ode import odeint

    if variant not in ("dopri5", "own-adjoint"):
        raise Skipped(f"unknown jax.experimental.ode variant {variant!r}")

    def make_solve(field: Any) -> Any:
        def solve(y0: Any, params: Any, ts: Any) -> tuple[Any, Any]:
            options = dict(
                rtol=problem.rtol, atol=problem.atol, mxstep=problem.max_steps
            )
            if params is None:
                ys = odeint(lambda y, t: field(t, y, None), y0, ts, **options)
            else:
                ys = odeint(lambda y, t, p: field(t, y, p), y0, ts, params, **options)
            return ys, None

        return solve

    return run_jax(
        problem,
        variant,
        ref,
        settings,
        library="jaxode",
        version=f"jax {jax.__version__}",
        make_solve=make_solve,
    )
