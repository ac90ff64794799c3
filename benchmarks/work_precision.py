"""Work–precision diagram: ``python -m benchmarks.work_precision``.

Van der Pol (μ = 1, t ∈ [0, 20], 200 output times, float64) solved by the
Dopri5, Tsit5 and Bosh3 solvers of neuralode and diffrax at tolerances
``rtol = atol = 1e-3 … 1e-10``. Error is the relative 2-norm error over the
output times against SciPy's DOP853 at ``rtol=1e-13``; time is the fastest of
a few jitted calls on one thread (the minimum is the least disturbed by other
work on the machine). Writes ``benchmarks/work_precision.png`` and
the numbers to ``benchmarks/_out/work_precision.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SOLVERS = ("Dopri5", "Tsit5", "Bosh3")
TOLERANCES = tuple(10.0**-k for k in range(3, 11))
T1, N_OUT, MAX_STEPS = 20.0, 200, 200_000


def _single_thread() -> None:
    """Pin XLA to one thread (must run before JAX is imported)."""
    from .run import SINGLE_THREAD_FLAGS

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_FLAGS}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _reference(ts: np.ndarray, y0: np.ndarray) -> np.ndarray:
    from scipy.integrate import solve_ivp

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        return np.array([y[1], (1 - y[0] ** 2) * y[1] - y[0]])

    sol = solve_ivp(
        rhs, (ts[0], ts[-1]), y0, "DOP853", t_eval=ts, rtol=1e-13, atol=1e-13
    )
    return sol.y.T


def _neuralode_solver(name: str) -> Callable | None:
    try:
        import neuralode as no
    except ImportError:
        return None
    if not (hasattr(no, "solve") and hasattr(no, name)):
        return None

    def make(field: Callable, tol: float) -> Callable:
        def solve(y0: Any, ts: Any) -> Any:
            sol = no.solve(
                field,
                y0,
                ts,
                solver=getattr(no, name)(),
                rtol=tol,
                atol=tol,
                max_steps=MAX_STEPS,
            )
            return sol.ys

        return solve

    return make


def _diffrax_solver(name: str) -> Callable | None:
    try:
        import diffrax
    except ImportError:
        return None

    def make(field: Callable, tol: float) -> Callable:
        def solve(y0: Any, ts: Any) -> Any:
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field),
                getattr(diffrax, name)(),
                t0=ts[0],
                t1=ts[-1],
                dt0=None,
                y0=y0,
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                max_steps=MAX_STEPS,
            )
            return sol.ys

        return solve

    return make


def measure(repeats: int = 5) -> list[dict]:
    """Time, evaluation count and error of every (library, solver, tolerance)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from .fields import rel_error, vdp_field
    from .timing import EvalCounter, jax_sync

    ts_np = np.linspace(0.0, T1, N_OUT)
    y0_np = np.array([2.0, 0.0])
    reference = _reference(ts_np, y0_np)
    ts, y0 = jnp.asarray(ts_np), jnp.asarray(y0_np)
    makers = {"neuralode": _neuralode_solver, "diffrax": _diffrax_solver}
    points = []
    for library, maker in makers.items():
        for solver in SOLVERS:
            make = maker(solver)
            if make is None:
                print(f"skipping {library} {solver}: not available", file=sys.stderr)
                continue
            for tol in TOLERANCES:
                program = jax.jit(make(vdp_field, tol))
                ys = jax_sync(program(y0, ts))
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    jax_sync(program(y0, ts))
                    samples.append(time.perf_counter() - start)
                counter = EvalCounter()
                counted = jax.jit(make(counter.wrap(vdp_field), tol))
                nfe = counter.measure(lambda c=counted: c(y0, ts))
                point = {
                    "library": library,
                    "solver": solver,
                    "tol": tol,
                    "time_s": min(samples),
                    "nfe": nfe,
                    "error": rel_error(ys, reference),
                }
                print(point, file=sys.stderr, flush=True)
                points.append(point)
    return points


def plot(points: list[dict], path: Path) -> None:
    """Error against time and against evaluations, one line per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    colours = dict(zip(SOLVERS, ("C0", "C1", "C2"), strict=True))
    styles = {"neuralode": ("-", "o"), "diffrax": ("--", "s")}
    for (library, solver), rows in _group(points).items():
        line, marker = styles[library]
        for ax, key in zip(axes, ("time_s", "nfe"), strict=True):
            ax.loglog(
                [r[key] for r in rows],
                [r["error"] for r in rows],
                linestyle=line,
                marker=marker,
                color=colours[solver],
                label=f"{library} {solver}",
            )
    axes[0].set_xlabel("time per solve [s] (one thread)")
    axes[1].set_xlabel("vector-field evaluations")
    for ax in axes:
        ax.set_ylabel("relative error vs float64 reference")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"Work–precision, Van der Pol μ=1, t∈[0,{T1:g}], float64, tolerances 1e-3…1e-10"
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _group(points: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for point in points:
        groups.setdefault((point["library"], point["solver"]), []).append(point)
    return groups


def main(argv: list[str] | None = None) -> int:
    """Measure and plot."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.work_precision")
    parser.add_argument("--out", default=str(HERE / "work_precision.png"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    _single_thread()
    points = measure(args.repeats)
    data_path = HERE / "_out" / "work_precision.json"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_text(json.dumps(points, indent=1))
    plot(points, Path(args.out))
    print(f"wrote {args.out} and {data_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
