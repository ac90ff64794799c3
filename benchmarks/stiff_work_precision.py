"""Stiff work–precision: ``python -m benchmarks.stiff_work_precision``.

Robertson, Van der Pol (μ = 10³) and HIRES, as `neuralode.datasets.stiff_system`
defines them (field, y0, span), in float64, solved by the implicit solvers of
neuralode (Rodas5P, Kvaerno5, AutoSwitch), diffrax (Kvaerno5, KenCarp5) and
SciPy (Radau, BDF, LSODA) at ``rtol = 1e-4 … 1e-10`` with
``atol = rtol·ATOL_FACTOR[problem]``; and the gradient of a Robertson
observable with respect to the log rate constants through each library's
adjoints.

- *error*: ``max over output times t > t0 and components i of
  |y_i(t) − y_i^ref(t)| / max_t |y_i^ref(t)|`` (each component scaled by its own
  size, so Robertson's y2 ~ 1e-5 counts), against SciPy Radau at
  ``rtol=1e-13, atol=1e-15`` (cached in ``benchmarks/_out/refs``; its own error
  estimated by a second solve at 10× those tolerances). *error_final*: the
  componentwise relative error at t1.
- *time*: median of repeated calls after a warm-up call, on one thread (XLA
  and BLAS pinned as in `benchmarks.run`). JAX solves are ``jax.jit``-compiled
  once per tolerance (neuralode takes tolerances as Python numbers; diffrax
  gets the same constants).
- *first call*: trace + compile + first run. Each (problem, library, solver)
  runs in its own subprocess, so the loosest tolerance's first call is that of
  a fresh process (``first_call_fresh``); the tighter ones reuse its caches.
- *fevals*, *jevals*, *steps*: neuralode's own ``sol.stats`` (``num_fevals``,
  ``num_jacobians``, ``num_steps`` = accepted + rejected), cross-checked once
  per solver by counting (``counted``); diffrax's field evaluations and
  Jacobians counted in a separate run (a `custom_jvp` wrapper whose primal and
  JVP rules each bump a host counter; ``jax.jacfwd`` calls the JVP rule once
  per Jacobian), and its ``num_steps``; SciPy's ``nfev``, ``njev``, ``nlu`` and
  its accepted steps (it does not report rejected ones).
- SciPy's ``fun`` and ``jac`` are the JAX field and ``jax.jacfwd`` of it, each
  ``jax.jit``-compiled (before the timings) and called on NumPy arrays, ~6 µs
  a call: no finite-difference Jacobians.
- diffrax's KenCarp5 is an IMEX method; it gets ``MultiTerm(zero, f)`` (all of
  f implicit). With its default root finder (``VeryChord``) it rejects nearly
  every step here (diffrax 0.7.2, jax 0.10.2; with a fixed step it diverges
  from the third step on, even on y' = −y), so that variant runs at the
  loosest tolerance only, and both diffrax solvers also run with
  ``optimistix.Newton`` (``-newton``): Kvaerno5's default takes several times
  more steps than with Newton.
- A (problem, solver) that fails at two consecutive tolerances is not run at
  the tighter ones (rows marked so).

Writes ``benchmarks/_out/stiff.json``, ``benchmarks/_out/stiff.md`` and
``benchmarks/stiff_work_precision.png``; never ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .run import environment_info, load_average, single_thread_env
from .timing import QUICK_TIMING, TimingSettings

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "_out"
REF_DIR = OUT_DIR / "refs"

PROBLEMS = ("robertson", "van_der_pol", "hires")
QUICK_PROBLEM = "hires"
RTOLS = tuple(10.0**-k for k in range(4, 11))
QUICK_RTOLS = (1e-5, 1e-7)

#: atol = rtol·factor: Robertson's y2 is ~1e-5 at its peak and ~1e-7 at t1.
ATOL_FACTOR = {"robertson": 1e-6, "van_der_pol": 1e-3, "hires": 1e-3}

#: Output times between t0 and the system's t1 (both added). Van der Pol's stay
#: clear of its jumps at t ≈ 807, 1614 and 2421.
INTERIOR_TIMES = {
    "robertson": (1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4),
    "van_der_pol": (400.0, 1200.0, 2000.0, 2800.0),
    "hires": (1.0, 5.0, 20.0, 100.0),
}

SOLVERS = {
    "neuralode": ("Rodas5P", "Kvaerno5", "AutoSwitch"),
    "diffrax": ("Kvaerno5", "Kvaerno5-newton", "KenCarp5", "KenCarp5-newton"),
    "scipy": ("Radau", "BDF", "LSODA"),
}
LIBRARIES = tuple(SOLVERS)

#: Run at the loosest tolerance only, uncounted (see the module docstring).
LOOSEST_ONLY = frozenset({("diffrax", "KenCarp5")})

REF_RTOL, REF_ATOL = 1e-13, 1e-15
MAX_STEPS = 200_000

#: The pairs compared at equal error: (library, solver) of neuralode, then of the
#: rival. The first is the target's.
RATIO_PAIRS = (
    (("neuralode", "Rodas5P"), ("diffrax", "Kvaerno5")),
    (("neuralode", "Kvaerno5"), ("diffrax", "Kvaerno5")),
    (("neuralode", "AutoSwitch"), ("diffrax", "Kvaerno5")),
    (("neuralode", "Rodas5P"), ("diffrax", "Kvaerno5-newton")),
    (("neuralode", "Rodas5P"), ("scipy", "Radau")),
)
TARGET_RATIO = 0.5

# The gradient: d/d(log k) of Σ_t [y3(t) + 1e4·y2(t)] over GRAD_TS on Robertson.
GRAD_TS = (0.0, 1e-2, 1e-1, 1.0, 10.0, 100.0)
GRAD_RTOL, GRAD_ATOL = 1e-8, 1e-14
GRAD_MAX_STEPS = 20_000
GRAD_FD_STEPS = (4e-3, 2e-3, 1e-3)
GRAD_UNITS = (
    ("neuralode", "Rodas5P", "checkpoint"),
    ("neuralode", "Rodas5P", "backsolve"),
    ("diffrax", "Kvaerno5", "recursive-checkpoint"),
    ("diffrax", "Kvaerno5", "backsolve"),
    ("diffrax", "Kvaerno5-newton", "recursive-checkpoint"),
)
GRAD_PAIRS = (
    (GRAD_UNITS[0], GRAD_UNITS[2]),
    (GRAD_UNITS[1], GRAD_UNITS[3]),
    (GRAD_UNITS[0], GRAD_UNITS[4]),
)


#: Repeats: about 1 s of them, 3 to 20, at least 2 when one call takes over 2 s.
TIMING = TimingSettings(
    target_s=1.0, min_repeats=3, max_repeats=20, max_total_s=4.0, floor_repeats=2
)


class Unit(NamedTuple):
    """One subprocess: a (problem, library, solver) over all tolerances."""

    problem: str
    library: str
    solver: str


# --------------------------------------------------------------------------
# Problems and references
# --------------------------------------------------------------------------


def _system(name: str) -> Any:
    from neuralode.datasets import stiff_system

    return stiff_system(name)


def _jax_args(system: Any) -> Any:
    import jax.numpy as jnp

    return None if system.args is None else jnp.asarray(system.args, jnp.float64)


def numpy_field(field: Callable, args: Any) -> tuple[Callable, Callable]:
    """SciPy's ``fun(t, y)`` and ``jac(t, y)``: the jitted JAX field and its
    ``jax.jacfwd``, on NumPy arrays."""
    import jax

    f = jax.jit(field)
    jac = jax.jit(jax.jacfwd(field, argnums=1))

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        return np.asarray(f(t, y, args))

    def jac_fun(t: float, y: np.ndarray) -> np.ndarray:
        return np.asarray(jac(t, y, args))

    return fun, jac_fun


def _radau(fun: Callable, jac: Callable, y0: Any, ts: Any, rtol: float, atol: float):
    from scipy.integrate import solve_ivp

    sol = solve_ivp(
        fun, (ts[0], ts[-1]), y0, "Radau", t_eval=ts, rtol=rtol, atol=atol, jac=jac
    )
    if sol.status != 0:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    return sol.y.T


def output_times(problem: str) -> np.ndarray:
    """t0, the problem's interior output times before t1, and t1."""
    system = _system(problem)
    inside = [t for t in INTERIOR_TIMES[problem] if system.t0 < t < system.t1]
    return np.array([system.t0, *inside, system.t1])


def _fingerprint(*parts: Any) -> str:
    """A short hash of everything a cached reference depends on."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            part = part.tobytes()
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return digest.hexdigest()[:12]


def reference_path(problem: str) -> Path:
    """Cache file of `problem`'s reference: keyed by the field's source, the
    initial value, the span, the arguments, the output times and tolerances."""
    system = _system(problem)
    key = _fingerprint(
        inspect.getsource(system.field),
        np.asarray(system.y0, np.float64),
        np.asarray(system.args, np.float64) if system.args is not None else None,
        output_times(problem),
        REF_RTOL,
        REF_ATOL,
    )
    return REF_DIR / f"stiff-{problem}-{key}.npz"


def ensure_reference(problem: str) -> dict[str, Any]:
    """The cached reference at the output times (computed when missing)."""
    path = reference_path(problem)
    if not path.exists():
        system = _system(problem)
        fun, jac = numpy_field(system.field, _jax_args(system))
        ts = output_times(problem)
        start = time.perf_counter()
        ys = _radau(fun, jac, system.y0, ts, REF_RTOL, REF_ATOL)
        seconds = time.perf_counter() - start
        coarser = _radau(fun, jac, system.y0, ts, 10 * REF_RTOL, 10 * REF_ATOL)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            ts=ts,
            ys=ys,
            own_error=scaled_error(coarser, ys),
            seconds=seconds,
        )
        print(f"reference {problem}: {seconds:.1f} s", file=sys.stderr)
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def scaled_error(ys: np.ndarray, ref: np.ndarray) -> float:
    """Max over output times after t0 of |y − ref| / (each component's max |ref|)."""
    scale = np.max(np.abs(ref[1:]), axis=0)
    return float(np.max(np.abs(ys[1:] - ref[1:]) / scale))


def final_error(ys: np.ndarray, ref: np.ndarray) -> float:
    """Componentwise relative error at the last output time."""
    return float(np.max(np.abs(ys[-1] - ref[-1]) / np.abs(ref[-1])))


def grad_reference_path() -> Path:
    """Cache file of the gradient reference (keyed like `reference_path`)."""
    system = _system("robertson")
    key = _fingerprint(
        inspect.getsource(system.field),
        np.asarray(system.args, np.float64),
        GRAD_TS,
        REF_RTOL,
        GRAD_FD_STEPS,
    )
    return REF_DIR / f"stiff-grad-robertson-{key}.npz"


def _log_rate_field(t: Any, y: Any, log_k: Any) -> Any:
    import jax.numpy as jnp

    return _system("robertson").field(t, y, jnp.exp(log_k))


def _observable(ys: Any) -> Any:
    return (ys[1:, 2] + 1e4 * ys[1:, 1]).sum()


def _log_rates() -> np.ndarray:
    return np.log(np.asarray(_system("robertson").args, np.float64))


def ensure_grad_reference() -> dict[str, Any]:
    """Richardson-extrapolated central differences of a Radau solve, and the
    difference between two step pairs as the reference's own error."""
    path = grad_reference_path()
    if not path.exists():
        ts = np.array(GRAD_TS)
        log_k0 = _log_rates()
        y0 = np.array([1.0, 0.0, 0.0])
        start = time.perf_counter()

        def loss(log_k: np.ndarray) -> float:
            fun, jac = numpy_field(_log_rate_field, log_k)
            return float(_observable(_radau(fun, jac, y0, ts, REF_RTOL, 1e-18)))

        def central(h: float) -> np.ndarray:
            rows = []
            for i in range(log_k0.size):
                e = np.zeros_like(log_k0)
                e[i] = h
                rows.append((loss(log_k0 + e) - loss(log_k0 - e)) / (2 * h))
            return np.array(rows)

        d = [central(h) for h in GRAD_FD_STEPS]
        coarse = (4 * d[1] - d[0]) / 3
        fine = (4 * d[2] - d[1]) / 3
        np.savez(
            path,
            grad=coarse,
            own_error=np.linalg.norm(coarse - fine) / np.linalg.norm(coarse),
            value=loss(log_k0),
            seconds=time.perf_counter() - start,
        )
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


# --------------------------------------------------------------------------
# Measuring (inside a worker)
# --------------------------------------------------------------------------


class FieldCounter:
    """Counts field evaluations and JVPs (Jacobians) through host callbacks.

    The wrapped field is a `jax.custom_jvp`: its primal rule bumps `fevals`, its
    JVP rule `jvps`. ``jax.jacfwd`` vmaps the JVP over the basis, and a callback
    without batched operands runs once, so one Jacobian counts once.
    """

    def __init__(self) -> None:
        self.fevals = 0
        self.jvps = 0

    def _bump_f(self) -> None:
        self.fevals += 1

    def _bump_j(self) -> None:
        self.jvps += 1

    def wrap(self, field: Callable) -> Callable:
        import jax

        @jax.custom_jvp
        def counted(t: Any, y: Any, args: Any) -> Any:
            jax.debug.callback(self._bump_f)
            return field(t, y, args)

        @counted.defjvp
        def counted_jvp(primals: Any, tangents: Any) -> Any:
            jax.debug.callback(self._bump_j)
            return jax.jvp(field, primals, tangents)

        return counted

    def measure(self, fn: Callable[[], Any]) -> tuple[int, int]:
        import jax

        self.fevals = self.jvps = 0
        jax.block_until_ready(fn())
        jax.effects_barrier()
        return self.fevals, self.jvps


def _time(
    call: Callable[[], Any],
    sync: Callable,
    timing: TimingSettings,
    succeeded: Callable[[Any], bool] = lambda out: True,
) -> tuple[dict, Any]:
    """First call, then (if it `succeeded`) the median of repeats; returns the
    row fields and the first call's output."""
    from .timing import first_call, repeat

    first_s, out = first_call(call, sync)
    if not succeeded(out):
        return {"first_call_s": first_s}, out
    measured = repeat(call, sync, timing, first_s)
    fields = {
        "first_call_s": first_s,
        "time_median_s": measured.median_s,
        "time_min_s": measured.min_s,
        "time_max_s": measured.max_s,
        "repeats": measured.repeats,
    }
    return fields, out


def _diffrax_solver(name: str) -> Any:
    import diffrax
    import optimistix as optx

    base, _, root = name.partition("-")
    if not root:
        return getattr(diffrax, base)()
    # diffrax fills in a root finder's tolerances from the step-size controller
    # when they are left unset; this is how its default VeryChord gets them.
    from diffrax._root_finder import with_stepsize_controller_tols

    return getattr(diffrax, base)(
        root_finder=with_stepsize_controller_tols(optx.Newton)()
    )


def _jax_program(library: str, solver: str, field: Callable, rtol: float, atol: float):
    """A jitted ``(y0, ts, args) -> (ys, stats, ok, code)`` for one tolerance."""
    import jax
    import jax.numpy as jnp

    if library == "neuralode":
        import neuralode

        method = getattr(neuralode, solver)()

        def run(y0: Any, ts: Any, args: Any) -> Any:
            sol = neuralode.solve(
                field,
                y0,
                ts,
                args,
                solver=method,
                rtol=rtol,
                atol=atol,
                max_steps=MAX_STEPS,
                throw=False,
            )
            return sol.ys, sol.stats, sol.result == 0, sol.result

        return jax.jit(run)

    import diffrax

    method = _diffrax_solver(solver)
    if solver.startswith("KenCarp"):
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, args: jnp.zeros_like(y)),
            diffrax.ODETerm(field),
        )
    else:
        terms = diffrax.ODETerm(field)

    def run(y0: Any, ts: Any, args: Any) -> Any:
        sol = diffrax.diffeqsolve(
            terms,
            method,
            t0=ts[0],
            t1=ts[-1],
            dt0=None,
            y0=y0,
            args=args,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=MAX_STEPS,
            throw=False,
        )
        ok = sol.result == diffrax.RESULTS.successful
        return sol.ys, sol.stats, ok, sol.result

    return jax.jit(run)


def _failure_message(library: str, code: Any) -> str:
    if library == "neuralode":
        import neuralode

        return neuralode.RESULTS.message(int(code))
    import diffrax

    return str(diffrax.RESULTS[code])


def _available(library: str, solver: str) -> str | None:
    """None when the solver can run here, else why not."""
    if library == "neuralode":
        import neuralode

        if not hasattr(neuralode, solver):
            return f"neuralode.{solver} does not exist (yet) in this checkout"
    return None


def _new_row(unit: Unit, rtol: float, atol: float, status: str, **extra: Any) -> dict:
    row = {
        "problem": unit.problem,
        "library": unit.library,
        "solver": unit.solver,
        "rtol": rtol,
        "atol": atol,
        "status": status,
        "message": "",
        "error": None,
        "error_final": None,
        "time_median_s": None,
        "time_min_s": None,
        "time_max_s": None,
        "repeats": 0,
        "first_call_s": None,
        "first_call_fresh": False,
        "fevals": None,
        "jevals": None,
        "steps": None,
        "lu": None,
        "stats": {},
        "counted": None,
    }
    row.update(extra)
    return row


def _measure_jax(
    unit: Unit, rtol: float, atol: float, ref: dict, timing: TimingSettings, count: bool
) -> dict:
    import jax
    import jax.numpy as jnp

    system = _system(unit.problem)
    y0 = jnp.asarray(system.y0, jnp.float64)
    ts = jnp.asarray(ref["ts"], jnp.float64)
    args = _jax_args(system)
    program = _jax_program(unit.library, unit.solver, system.field, rtol, atol)
    fields, (ys, stats, ok, code) = _time(
        lambda: program(y0, ts, args),
        jax.block_until_ready,
        timing,
        succeeded=lambda out: bool(out[2]),
    )
    stats = {k: int(v) for k, v in stats.items() if jnp.ndim(v) == 0}
    row = _new_row(unit, rtol, atol, "ok", **fields, stats=stats)
    row["steps"] = stats.get("num_steps")
    if unit.library == "neuralode":
        row["fevals"] = stats.get("num_fevals")
        row["jevals"] = stats.get("num_jacobians")
    if count and bool(ok):
        counter = FieldCounter()
        counted = _jax_program(
            unit.library, unit.solver, counter.wrap(system.field), rtol, atol
        )
        fevals, jvps = counter.measure(lambda: counted(y0, ts, args))
        row["counted"] = {"fevals": fevals, "jvps": jvps}
        if unit.library == "diffrax":
            row["fevals"], row["jevals"] = fevals, jvps
    if not bool(ok):
        row.update(status="failed", message=_failure_message(unit.library, code))
        return row
    ys = np.asarray(ys)
    row["error"] = scaled_error(ys, ref["ys"])
    row["error_final"] = final_error(ys, ref["ys"])
    return row


def _measure_scipy(
    unit: Unit, rtol: float, atol: float, ref: dict, timing: TimingSettings
):
    from scipy.integrate import solve_ivp

    system = _system(unit.problem)
    fun, jac = numpy_field(system.field, _jax_args(system))
    fun(0.0, system.y0)  # compile both outside the timings
    jac(0.0, system.y0)
    ts = ref["ts"]

    def call(t_eval: Any = ts) -> Any:
        return solve_ivp(
            fun,
            (ts[0], ts[-1]),
            system.y0,
            unit.solver,
            t_eval=t_eval,
            rtol=rtol,
            atol=atol,
            jac=jac,
        )

    fields, sol = _time(call, lambda out: out, timing, lambda out: out.status == 0)
    row = _new_row(unit, rtol, atol, "ok", **fields)
    row.update(fevals=int(sol.nfev), jevals=int(sol.njev), lu=int(sol.nlu))
    row["steps"] = len(call(None).t) - 1  # accepted steps; SciPy hides rejections
    if sol.status != 0:
        row.update(status="failed", message=str(sol.message))
        return row
    ys = sol.y.T
    row["error"] = scaled_error(ys, ref["ys"])
    row["error_final"] = final_error(ys, ref["ys"])
    return row


def measure_unit(
    unit: Unit,
    rtols: tuple[float, ...],
    timing: TimingSettings,
    count: bool,
    fresh: bool,
):
    """Rows of one (problem, library, solver), loosest tolerance first; `fresh`
    when this process has run nothing else (its first call is a fresh one)."""
    ref = ensure_reference(unit.problem)
    rtols = tuple(sorted(rtols, reverse=True))
    if (unit.library, unit.solver) in LOOSEST_ONLY:
        rtols, count = rtols[:1], False
    rows: list[dict] = []
    missing = _available(unit.library, unit.solver)
    failures = 0
    for i, rtol in enumerate(rtols):
        atol = rtol * ATOL_FACTOR[unit.problem]
        if missing:
            rows.append(_new_row(unit, rtol, atol, "missing", message=missing))
            continue
        if failures >= 2:
            message = "not run: failed at the two looser tolerances"
            rows.append(_new_row(unit, rtol, atol, "skipped", message=message))
            continue
        # One counting run per neuralode solver cross-checks its own stats.
        count_here = count and (unit.library == "diffrax" or i == len(rtols) // 2)
        try:
            if unit.library == "scipy":
                row = _measure_scipy(unit, rtol, atol, ref, timing)
            else:
                row = _measure_jax(unit, rtol, atol, ref, timing, count_here)
        except Exception as error:  # a crash is a result too
            row = _new_row(unit, rtol, atol, "failed", message=error_text(error))
        row["first_call_fresh"] = fresh and i == 0
        failures = failures + 1 if row["status"] == "failed" else 0
        print(_row_summary(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _grad_loss(library: str, solver: str, adjoint: str) -> Callable:
    import jax.numpy as jnp

    ts = jnp.asarray(GRAD_TS, jnp.float64)
    y0 = jnp.asarray([1.0, 0.0, 0.0], jnp.float64)
    if library == "neuralode":
        import neuralode

        method = getattr(neuralode, solver)()
        adj = {
            "checkpoint": neuralode.CheckpointAdjoint(),
            "backsolve": neuralode.BacksolveAdjoint(),
        }[adjoint]

        def loss(log_k: Any) -> Any:
            sol = neuralode.solve(
                _log_rate_field,
                y0,
                ts,
                log_k,
                solver=method,
                rtol=GRAD_RTOL,
                atol=GRAD_ATOL,
                max_steps=GRAD_MAX_STEPS,
                adjoint=adj,
            )
            return _observable(sol.ys)

        return loss

    import diffrax

    method = _diffrax_solver(solver)
    adj = {
        "recursive-checkpoint": diffrax.RecursiveCheckpointAdjoint(),
        "backsolve": diffrax.BacksolveAdjoint(),
    }[adjoint]

    def loss(log_k: Any) -> Any:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_log_rate_field),
            method,
            t0=ts[0],
            t1=ts[-1],
            dt0=None,
            y0=y0,
            args=log_k,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=GRAD_RTOL, atol=GRAD_ATOL),
            max_steps=GRAD_MAX_STEPS,
            adjoint=adj,
        )
        return _observable(sol.ys)

    return loss


def measure_grad(
    library: str, solver: str, adjoint: str, timing: TimingSettings
) -> dict:
    """One gradient row; a neuralode `SolveError` is recorded as refused."""
    import jax
    import jax.numpy as jnp

    ref = ensure_grad_reference()
    row = {
        "library": library,
        "solver": solver,
        "adjoint": adjoint,
        "rtol": GRAD_RTOL,
        "atol": GRAD_ATOL,
        "status": "ok",
        "message": "",
        "error": None,
        "grad": None,
        "time_median_s": None,
        "time_min_s": None,
        "time_max_s": None,
        "repeats": 0,
        "first_call_s": None,
    }
    missing = _available(library, solver)
    if missing:
        return dict(row, status="missing", message=missing)
    log_k = jnp.asarray(_log_rates())
    grad = jax.jit(jax.grad(_grad_loss(library, solver, adjoint)))
    try:
        if library == "neuralode":
            import neuralode

            with neuralode.reraise_failures():
                fields, g = _time(lambda: grad(log_k), jax.block_until_ready, timing)
        else:
            fields, g = _time(lambda: grad(log_k), jax.block_until_ready, timing)
    except Exception as error:
        refused = type(error).__name__ == "SolveError"
        status = "refused" if refused else "failed"
        return dict(row, status=status, message=error_text(error))
    g = np.asarray(g)
    error = float(np.linalg.norm(g - ref["grad"]) / np.linalg.norm(ref["grad"]))
    return dict(row, **fields, grad=g.tolist(), error=error)


def error_text(error: BaseException) -> str:
    """One line saying why: the library's own message when JAX wraps it."""
    text = f"{type(error).__name__}: {error}"
    found = re.search(r"\w*(?:EquinoxRuntimeError|SolveError): [^\n]*", text)
    return (found.group(0) if found else text.splitlines()[0])[:300]


def _row_summary(row: dict) -> str:
    time_s = row.get("time_median_s")
    shown = f"{time_s * 1e3:10.2f} ms" if time_s is not None else f"{row['status']:>13}"
    error = row.get("error")
    shown += f"  err {error:.1e}" if error is not None else ""
    what = row.get("problem") or "grad"
    variant = row.get("rtol") if "problem" in row else row.get("adjoint")
    return f"  {what:<12} {row['library']:<10} {row['solver']:<16} {variant}{shown}"


# --------------------------------------------------------------------------
# Summary: time at equal error
# --------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (error, time) points no other point beats in both, error ascending."""
    front: list[tuple[float, float]] = []
    for error, seconds in sorted(points):
        if not front or seconds < front[-1][1]:
            front.append((error, seconds))
    return front


def _log_time_at(front: list[tuple[float, float]], error: float) -> float:
    log_e = [math.log(e) for e, _ in front]
    log_t = [math.log(t) for _, t in front]
    return float(np.interp(math.log(error), log_e, log_t))


def ratio_at_equal_error(mine: list[dict], rival: list[dict]) -> dict[str, Any]:
    """Time ratio mine / rival along both Pareto fronts (log–log interpolation),
    at every decade of error both cover (or their overlap's middle)."""

    def front(rows: list[dict]) -> list[tuple[float, float]]:
        points = [
            (r["error"], r["time_median_s"])
            for r in rows
            if r["status"] == "ok" and r["error"] and r["time_median_s"]
        ]
        return pareto_front(points)

    a, b = front(mine), front(rival)
    result: dict[str, Any] = {"levels": [], "ratios": [], "geomean": None}
    if len(a) < 2 or len(b) < 2:
        result["note"] = "fewer than two successful tolerances"
        return result
    low, high = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    result["range"] = [low, high]
    if low > high:
        result["note"] = (
            f"no common error range (neuralode {a[0][0]:.1e}–{a[-1][0]:.1e}, "
            f"rival {b[0][0]:.1e}–{b[-1][0]:.1e})"
        )
        return result
    levels = [
        10.0**k
        for k in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)
    ]
    if not levels:
        levels = [math.sqrt(low * high)]
    ratios = [math.exp(_log_time_at(a, e) - _log_time_at(b, e)) for e in levels]
    result.update(
        levels=levels,
        ratios=ratios,
        geomean=math.exp(sum(map(math.log, ratios)) / len(ratios)),
    )
    return result


def _first_call(rows: list[dict], extra: list[float]) -> tuple[float | None, bool]:
    """The median first call at the loosest tolerance (the unit's own and the
    `extra` fresh-process samples), and whether fresh processes made them all."""
    loosest = max(rows, key=lambda r: r["rtol"])
    if loosest["first_call_s"] is None:
        return None, False
    samples = [loosest["first_call_s"], *extra]
    return statistics.median(samples), loosest["first_call_fresh"]


def summarise(
    rows: list[dict], grad_rows: list[dict], first_calls: dict[str, list[float]]
) -> dict[str, Any]:
    """Equal-error time ratios and first-call ratios per problem and pair, and
    the gradient ratios."""

    def select(problem: str, library: str, solver: str) -> list[dict]:
        return [
            r
            for r in rows
            if (r["problem"], r["library"], r["solver"]) == (problem, library, solver)
        ]

    pairs = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for mine, rival in RATIO_PAIRS:
            a, b = select(problem, *mine), select(problem, *rival)
            if not a or not b:
                continue
            extra_a = first_calls.get("/".join((problem, *mine)), [])
            extra_b = first_calls.get("/".join((problem, *rival)), [])
            first_a, fresh_a = _first_call(a, extra_a)
            first_b, fresh_b = _first_call(b, extra_b)
            pairs.append(
                {
                    "problem": problem,
                    "mine": list(mine),
                    "rival": list(rival),
                    "equal_error": ratio_at_equal_error(a, b),
                    "first_call_ratio": (
                        first_a / first_b if first_a and first_b else None
                    ),
                    "first_calls_fresh": fresh_a and fresh_b,
                    "first_call_samples": 1 + min(len(extra_a), len(extra_b)),
                }
            )
    grads = []
    by_unit = {(g["library"], g["solver"], g["adjoint"]): g for g in grad_rows}
    for mine, rival in GRAD_PAIRS:
        a, b = by_unit.get(mine), by_unit.get(rival)
        if a and b and a["time_median_s"] and b["time_median_s"]:
            grads.append(
                {
                    "mine": list(mine),
                    "rival": list(rival),
                    "time_ratio": a["time_median_s"] / b["time_median_s"],
                    "first_call_ratio": a["first_call_s"] / b["first_call_s"],
                }
            )
    return {"pairs": pairs, "grad": grads}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def _ratio_cell(value: float | None, fresh: bool = False) -> str:
    return "—" if value is None else f"{value:.2f}×" + (" †" if fresh else "")


def _table_row(row: dict) -> str:
    from .report import fmt_time

    if row["time_median_s"] is None:
        timing = f"**{row['status']}**"
    else:
        timing = fmt_time(row["time_median_s"])
        if row["status"] != "ok":
            timing = f"**{row['status']}** {timing}"
    first = fmt_time(row["first_call_s"])
    if row["first_call_fresh"] and row["first_call_s"] is not None:
        first += " †"
    cells = [
        row["library"],
        row["solver"],
        f"{row['rtol']:.0e}",
        _fmt(row["error"], ".2e"),
        _fmt(row["error_final"], ".1e"),
        timing,
        first,
        _fmt(row["fevals"]),
        _fmt(row["jevals"]),
        _fmt(row["steps"]),
        (row["message"] or "").replace("|", "/")[:160],
    ]
    return "| " + " | ".join(cells) + " |"


def _pair_label(pair: dict) -> str:
    return f"{' '.join(pair['mine'])} / {' '.join(pair['rival'])}"


def markdown(results: dict) -> str:
    """The report: targets, equal-error ratios, per-problem tables, gradients."""
    from .report import fmt_time

    lines = [
        "# Stiff work–precision",
        "",
        f"Produced by `{results['command']}` on {results['date']} in "
        f"{results['wall_s']:.0f} s (load average before / after: "
        f"{results['load_average']['before']} / {results['load_average']['after']}).",
        "",
        f"- Machine: {results['machine']['cpu']}, {results['machine']['cores']} "
        f"cores; one thread (`{results['settings']['xla_flags']}`).",
        f"- Checkout: {_checkout(results['git'])} (neuralode from "
        f"`{results['git']['neuralode_path']}`)"
        + (
            f"; **it changed during the run**, to {_checkout(results['git_after'])}"
            if results["git_after"] != results["git"]
            else ""
        )
        + ".",
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v)
        + ".",
        "- float64. Error: max over output times after t0 of |y − y_ref| scaled "
        "per component by its largest |y_ref| (*at t1*: componentwise relative "
        "error at the last output time); reference SciPy Radau at "
        f"rtol={REF_RTOL:g}, atol={REF_ATOL:g}. Time: median of repeats after a "
        "warm-up call (jitted for JAX). First call: trace + compile + run; † in a "
        "fresh process; the targets' first calls are medians over that and "
        "further fresh processes. fevals / jevals: field evaluations / Jacobians "
        "(neuralode: its stats; diffrax: counted; SciPy: nfev / njev); the "
        "work panel of the plot counts a Jacobian as one. steps: accepted + "
        "rejected (SciPy: accepted). SciPy gets the jitted JAX field and "
        "`jax.jacfwd` Jacobian.",
        "",
    ]
    summary = results["summary"]
    target_pairs = [p for p in summary["pairs"] if p["mine"] == list(RATIO_PAIRS[0][0])]
    target_pairs = [p for p in target_pairs if p["rival"] == list(RATIO_PAIRS[0][1])]
    if target_pairs:
        lines += [
            "## Targets",
            "",
            "| problem | Rodas5P / diffrax Kvaerno5 time at equal error "
            "(geomean [range]) | status | first call ratio (median of n) | status |",
            "|---|---|---|---|---|",
        ]
        for pair in target_pairs:
            eq = pair["equal_error"]
            if eq["ratios"]:
                shown = (
                    f"{eq['geomean']:.2f}× [{min(eq['ratios']):.2f}–"
                    f"{max(eq['ratios']):.2f}×]"
                )
                status = "met" if max(eq["ratios"]) <= TARGET_RATIO else "**missed**"
            else:
                shown, status = eq.get("note", "—"), "—"
            first = pair["first_call_ratio"]
            first_status = (
                "—"
                if first is None
                else ("met" if first <= TARGET_RATIO else "**missed**")
            )
            lines.append(
                f"| {pair['problem']} | {shown} | {status} | "
                f"{_ratio_cell(first, pair['first_calls_fresh'])} "
                f"(n={pair['first_call_samples']}) | {first_status} |"
            )
        lines += ["", f"Target: ≤ {TARGET_RATIO}× at every common error level.", ""]
    lines += [
        "## Time at equal error",
        "",
        "Ratio of times (first / second) along the two Pareto fronts, "
        "interpolated in log–log at each decade of error both reach.",
        "",
        "| problem | pair | error levels | time ratios | geomean | first call |",
        "|---|---|---|---|---|---|",
    ]
    for pair in summary["pairs"]:
        eq = pair["equal_error"]
        levels = ", ".join(f"{e:.0e}" for e in eq["levels"]) or eq.get("note", "—")
        ratios = ", ".join(f"{r:.2f}" for r in eq["ratios"]) or "—"
        lines.append(
            f"| {pair['problem']} | {_pair_label(pair)} | {levels} | {ratios} | "
            f"{_ratio_cell(eq['geomean'])} | "
            f"{_ratio_cell(pair['first_call_ratio'], pair['first_calls_fresh'])} |"
        )
    lines.append("")
    for problem, info in results["problems"].items():
        lines += [
            f"## {problem}",
            "",
            f"{info['description']}; output times {info['ts']}; atol = rtol·"
            f"{info['atol_factor']:g}; reference's own error ≈ "
            f"{info['reference_error']:.1e}.",
            "",
            "| library | solver | rtol | error | at t1 | time | first call | "
            "fevals | jevals | steps | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_table_row(r) for r in results["rows"] if r["problem"] == problem]
        lines.append("")
    if results["grad_rows"]:
        ref = results["grad_reference"]
        lines += [
            "## Gradient",
            "",
            f"d/d(log k) of Σ_t [y3(t) + 1e4·y2(t)], t ∈ {list(GRAD_TS[1:])}, "
            f"Robertson, rtol={GRAD_RTOL:g}, atol={GRAD_ATOL:g}. Reference: "
            "Richardson-extrapolated central differences of SciPy Radau at "
            f"rtol={REF_RTOL:g} (own error ≈ {ref['own_error']:.1e}). A neuralode "
            "refusal (SolveError) is a correct outcome.",
            "",
            "| library | solver | adjoint | time | first call | rel. error | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in results["grad_rows"]:
            timing = (
                fmt_time(g["time_median_s"])
                if g["time_median_s"] is not None
                else f"**{g['status']}**"
            )
            lines.append(
                f"| {g['library']} | {g['solver']} | {g['adjoint']} | {timing} | "
                f"{fmt_time(g['first_call_s'])} | {_fmt(g['error'], '.2e')} | "
                f"{(g['message'] or '').replace('|', '/')[:200]} |"
            )
        for ratio in summary["grad"]:
            lines.append(
                f"\n{' '.join(ratio['mine'])} / {' '.join(ratio['rival'])}: "
                f"time {ratio['time_ratio']:.2f}×, "
                f"first call {ratio['first_call_ratio']:.2f}×."
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], problems: list[str], path: Path) -> None:
    """Error against time and against fevals + jevals, one row per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(problems), 2, figsize=(11, 3.6 * len(problems)), squeeze=False
    )
    styles = {"neuralode": ("-", "o"), "diffrax": ("--", "s"), "scipy": (":", "^")}
    colours = {}
    for p, problem in enumerate(problems):
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            if r["problem"] == problem and r["status"] == "ok" and r["error"]:
                groups.setdefault((r["library"], r["solver"]), []).append(r)
        for (library, solver), group in groups.items():
            key = (library, solver)
            colours.setdefault(key, f"C{len(colours) % 10}")
            line, marker = styles[library]
            work = [(r["fevals"] or 0) + (r["jevals"] or 0) for r in group]
            for ax, xs in zip(
                axes[p], ([r["time_median_s"] for r in group], work), strict=True
            ):
                ax.loglog(
                    xs,
                    [r["error"] for r in group],
                    linestyle=line,
                    marker=marker,
                    color=colours[key],
                    label=f"{library} {solver}",
                )
        axes[p][0].set_title(f"{problem}: error vs time")
        axes[p][1].set_title(f"{problem}: error vs fevals + jevals")
        axes[p][0].set_xlabel("time per solve [s] (one thread)")
        axes[p][1].set_xlabel("field evaluations + Jacobians")
        for ax in axes[p]:
            ax.set_ylabel("scaled max error")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
            labels[label] = label
    fig.legend(list(handles.values()), list(labels), loc="outside lower center", ncol=4)
    fig.set_layout_engine("constrained")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def _configure_jax() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.block_until_ready(jax.jit(lambda x: x + 1)(1.0))  # backend start-up, untimed


def _timing_from(args: argparse.Namespace) -> TimingSettings:
    timing = QUICK_TIMING if args.quick else TIMING
    if args.repeats is not None:
        timing = dataclasses.replace(
            timing, min_repeats=args.repeats, max_repeats=args.repeats
        )
    return timing


def first_call_only(unit: Unit, rtol: float) -> float:
    """Seconds of trace + compile + run of a JAX unit's solve at `rtol`."""
    import jax
    import jax.numpy as jnp

    from .timing import first_call

    system = _system(unit.problem)
    atol = rtol * ATOL_FACTOR[unit.problem]
    program = _jax_program(unit.library, unit.solver, system.field, rtol, atol)
    y0 = jnp.asarray(system.y0, jnp.float64)
    ts = jnp.asarray(output_times(unit.problem), jnp.float64)
    args = _jax_args(system)
    return first_call(lambda: program(y0, ts, args), jax.block_until_ready)[0]


def _worker(args: argparse.Namespace) -> int:
    _configure_jax()
    timing = _timing_from(args)
    if args.one:
        unit = Unit(*args.one)
        rows = measure_unit(unit, tuple(args.rtols), timing, not args.quick, True)
    elif args.first_call:
        rows = [first_call_only(Unit(*args.first_call), max(args.rtols))]
    else:
        rows = [measure_grad(*args.one_grad, timing)]
    Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


def _run_worker(cmd: list[str], json_out: Path, timeout_s: float) -> list[dict] | str:
    """Rows from a worker subprocess, or why there are none."""
    try:
        proc = subprocess.run(
            cmd,
            env=single_thread_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=HERE.parent,
        )
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout_s:.0f} s"
    sys.stderr.write(proc.stderr if proc.returncode else _progress(proc.stderr))
    if proc.returncode == 0 and json_out.exists():
        return json.loads(json_out.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"worker crashed (rc {proc.returncode}): {tail[0][:200]}"


def _progress(stderr: str) -> str:
    """The worker's summary lines (`_row_summary`), without logged tracebacks."""
    names = (*PROBLEMS, "grad")
    lines = [ln for ln in stderr.splitlines() if ln[2:].startswith(names)]
    return "".join(f"{line}\n" for line in lines)


def _base_cmd(args: argparse.Namespace, json_out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.stiff_work_precision"]
    cmd += ["--json-out", str(json_out), "--rtols", *map(str, args.rtols)]
    if args.quick:
        cmd.append("--quick")
    if args.repeats is not None:
        cmd += ["--repeats", str(args.repeats)]
    return cmd


def _units(args: argparse.Namespace) -> list[Unit]:
    return [
        Unit(problem, library, solver)
        for problem in args.problems
        for library in args.libs
        for solver in SOLVERS[library]
        if args.solvers is None or solver in args.solvers
    ]


def _extra_first_calls(
    args: argparse.Namespace, units: list[Unit], tmp: Path
) -> dict[str, list[float]]:
    """More fresh-process first calls of the target pair, interleaved, keyed
    ``problem/library/solver``."""
    samples: dict[str, list[float]] = {}
    pair = [u for u in units if (u.library, u.solver) in RATIO_PAIRS[0]]
    for k in range(args.first_call_runs):
        for unit in pair:
            out = tmp / f"first{k}-{'-'.join(unit)}.json"
            cmd = _base_cmd(args, out) + ["--first-call", *unit]
            got = _run_worker(cmd, out, args.timeout)
            if not isinstance(got, str):
                samples.setdefault("/".join(unit), []).append(got[0])
    return samples


def run_all(args: argparse.Namespace) -> tuple[list[dict], list[dict], dict]:
    """Every unit, each in its own subprocess (or in-process with --in-process),
    the gradient rows and the extra first-call samples."""
    timing = _timing_from(args)
    rows: list[dict] = []
    grad_rows: list[dict] = []
    first_calls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, unit in enumerate(_units(args)):
            if args.in_process:
                rows += measure_unit(
                    unit, tuple(args.rtols), timing, not args.quick, False
                )
                continue
            out = Path(tmp) / f"unit{k}.json"
            cmd = _base_cmd(args, out) + ["--one", *unit]
            got = _run_worker(cmd, out, args.timeout)
            if isinstance(got, str):
                got = [
                    _new_row(
                        unit, r, r * ATOL_FACTOR[unit.problem], "failed", message=got
                    )
                    for r in sorted(args.rtols, reverse=True)
                ]
            rows += got
        if args.grad:
            for k, (library, solver, adjoint) in enumerate(GRAD_UNITS):
                if library not in args.libs:
                    continue
                if args.in_process:
                    grad_rows.append(measure_grad(library, solver, adjoint, timing))
                    continue
                out = Path(tmp) / f"grad{k}.json"
                cmd = _base_cmd(args, out) + ["--one-grad", library, solver, adjoint]
                got = _run_worker(cmd, out, args.timeout)
                if isinstance(got, str):
                    got = [
                        {
                            "library": library,
                            "solver": solver,
                            "adjoint": adjoint,
                            "status": "failed",
                            "message": got,
                            "error": None,
                            "time_median_s": None,
                            "first_call_s": None,
                        }
                    ]
                grad_rows += got
                print(_row_summary(got[0]), file=sys.stderr, flush=True)
        if not args.in_process:
            first_calls = _extra_first_calls(args, _units(args), Path(tmp))
    return rows, grad_rows, first_calls


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stiff_work_precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_PROBLEM} only, rtol {QUICK_RTOLS}, few repeats, no counting "
        "runs, no gradient, in one process",
    )
    parser.add_argument("--problems", default=None, help="comma-separated")
    parser.add_argument("--libs", default=",".join(LIBRARIES), help="comma-separated")
    parser.add_argument("--solvers", default=None, help="only these solver names")
    parser.add_argument("--rtols", type=float, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="fixed repeats")
    parser.add_argument(
        "--grad",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the Robertson gradient rows (default: on unless --quick)",
    )
    parser.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="no subprocesses (default with --quick); first calls then share caches",
    )
    parser.add_argument(
        "--first-call-runs",
        type=int,
        default=None,
        help="extra fresh-process first calls of the target pair (default 2; "
        "0 with --quick)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="per worker, s")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--md-out", default=None)
    parser.add_argument("--plot-out", default=None)
    parser.add_argument(
        "--one", nargs=3, metavar=("PROBLEM", "LIB", "SOLVER"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--one-grad",
        nargs=3,
        metavar=("LIB", "SOLVER", "ADJOINT"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--first-call",
        nargs=3,
        metavar=("PROBLEM", "LIB", "SOLVER"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)
    args.libs = args.libs.split(",")
    unknown = set(args.libs) - set(LIBRARIES)
    if unknown:
        parser.error(f"unknown libraries {sorted(unknown)}; choose from {LIBRARIES}")
    if args.problems is None:
        args.problems = QUICK_PROBLEM if args.quick else ",".join(PROBLEMS)
    args.problems = args.problems.split(",")
    unknown = set(args.problems) - set(PROBLEMS)
    if unknown:
        parser.error(f"unknown problems {sorted(unknown)}; choose from {PROBLEMS}")
    if args.solvers is not None:
        args.solvers = args.solvers.split(",")
    if args.rtols is None:
        args.rtols = list(QUICK_RTOLS if args.quick else RTOLS)
    if args.grad is None:
        args.grad = not args.quick
    if args.in_process is None:
        args.in_process = args.quick
    if args.first_call_runs is None:
        args.first_call_runs = 0 if args.quick else 2
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, then write the JSON, the Markdown report and the plot."""
    os.environ.update(single_thread_env())  # before JAX is first imported
    args = _parse(argv)
    if args.one or args.one_grad or args.first_call:
        return _worker(args)
    json_out = Path(args.json_out or OUT_DIR / "stiff.json")
    md_out = Path(args.md_out or OUT_DIR / "stiff.md")
    plot_out = Path(args.plot_out or HERE / "stiff_work_precision.png")
    command = "python -m benchmarks.stiff_work_precision " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    start = time.perf_counter()
    load_before = load_average()
    git_before = _git_state()
    _configure_jax()
    references = {p: ensure_reference(p) for p in args.problems}
    grad_reference = ensure_grad_reference() if args.grad else None
    rows, grad_rows, first_calls = run_all(args)
    results = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        **environment_info(),
        "git": git_before,
        "git_after": _git_state(),
        "settings": {
            "quick": args.quick,
            "rtols": args.rtols,
            "timing": dataclasses.asdict(_timing_from(args)),
            "in_process": args.in_process,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "max_steps": MAX_STEPS,
        },
        "load_average": {"before": load_before, "after": load_average()},
        "problems": {
            p: {
                "description": _describe(p),
                "ts": output_times(p).tolist(),
                "atol_factor": ATOL_FACTOR[p],
                "reference_error": float(references[p]["own_error"]),
                "reference_final": references[p]["ys"][-1].tolist(),
            }
            for p in args.problems
        },
        "rows": rows,
        "grad_rows": grad_rows,
        "grad_reference": (
            None
            if grad_reference is None
            else {
                "grad": grad_reference["grad"].tolist(),
                "own_error": float(grad_reference["own_error"]),
                "value": float(grad_reference["value"]),
            }
        ),
        "first_call_samples": first_calls,
        "summary": summarise(rows, grad_rows, first_calls),
        "wall_s": time.perf_counter() - start,
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=1))
    md_out.parent.mkdir(parents=True, exist_ok=True)
    md_out.write_text(markdown(results))
    plot(rows, args.problems, plot_out)
    print(
        f"wrote {json_out}, {md_out}, {plot_out} in {results['wall_s']:.0f} s",
        file=sys.stderr,
    )
    return 0


def _checkout(state: dict[str, Any]) -> str:
    dirty = " with local changes in neuralode/" if state["neuralode_dirty"] else ""
    return f"{state['commit']}{dirty}"


def _git_state() -> dict[str, Any]:
    """The checkout measured: HEAD and whether neuralode/ had local changes."""

    def git(*cmd: str) -> str:
        proc = subprocess.run(
            ["git", *cmd], cwd=HERE.parent, capture_output=True, text=True
        )
        return proc.stdout.strip()

    import neuralode

    changes = git("status", "--porcelain", "neuralode")
    changes += git("diff", "HEAD", "--", "neuralode")
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "neuralode_dirty": bool(changes),
        "neuralode_changes": _fingerprint(changes) if changes else None,
        "neuralode_path": str(Path(neuralode.__file__).parent),
    }


def _describe(problem: str) -> str:
    system = _system(problem)
    if problem == "robertson":
        what = f"Robertson's kinetics, k = {tuple(np.asarray(system.args).tolist())}"
    elif problem == "van_der_pol":
        what = f"Van der Pol, μ = {float(np.asarray(system.args)):g}"
    else:
        what = "HIRES, 8 species"
    y0 = tuple(np.asarray(system.y0).tolist())
    return f"{what}, y0 = {y0}, t ∈ [{system.t0:g}, {system.t1:g}]"


if __name__ == "__main__":
    raise SystemExit(main())
