"""Batch-MLP work–precision: ``python -m benchmarks.fwd_work_precision``.

``mlp-fwd`` (batch (256, 2), MLP 3→64→64→2) and ``big-fwd`` (batch (1024, 32),
MLP 33→256→256→32), taken from `benchmarks.problems` and `benchmarks.fields`
so that weights, y0, span and field are those of the benchmark harness, solved
by neuralode's ``solve(..., solver=Dopri5())`` (default controller) and
diffrax's ``Dopri5`` with ``PIDController`` (default coefficients) at
``rtol = 1e-3 … 1e-8`` and ``atol = rtol · 1e-2``, the relation of the
problems' own ``rtol=1e-6, atol=1e-8``.

- *dtype*: the problems' float32, and the same problems in float64 (weights
  and y0 cast from the same float64 arrays), which shows what float32 hides at
  the tight end, where rounding (of the inputs and of every step) rather than
  the tolerance sets the error. neuralode refuses an rtol below the state's
  machine epsilon (1.19e-7 in float32) when it traces the solve; such rows
  are kept as ``refused``, and float32 also runs rtol = 2e-7.
- *error*: relative 2-norm error of y(t1) against the harness's float64
  reference (SciPy DOP853 at ``rtol=1e-12, atol=1e-14`` on the float64 field,
  cached in ``benchmarks/_out/refs`` and shared with ``benchmarks.run``).
- *time*: minimum of repeated jitted calls after a warm-up call (at least
  `--repeats`, more until they add up to `--target-s`), XLA on one thread (as
  in `benchmarks.run`). The calls go in rounds over all the tolerances of a
  sweep, the two libraries alternating call by call, so that both see the
  same load and a burst of other work hits a few calls of several tolerances
  rather than every call of one. The first call (trace, compile and run) is
  recorded too.
- *steps*: accepted and rejected steps from each library's stats; *nfe*:
  vector-field evaluations counted by a host callback in a separately compiled
  copy of the program (never the timed one).
- *time at equal error*: per library, the Pareto front of (error, time) over
  its sweep, log(time) interpolated linearly in log(error); the ratio
  neuralode / diffrax at every measured error of either front inside the error
  range both fronts cover.

Writes ``benchmarks/fwd_work_precision.png`` and
``benchmarks/_out/fwd_work_precision.json`` and prints a Markdown table;
``--quick`` uses the harness's tiny problem sizes and two tolerances.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .run import SINGLE_THREAD_FLAGS, environment_info, load_average, reference_path
from .stiff_work_precision import pareto_front

HERE = Path(__file__).resolve().parent
PROBLEMS = ("mlp-fwd", "big-fwd")
DTYPES = ("float32", "float64")
RTOLS = tuple(10.0**-k for k in range(3, 9))
#: neuralode refuses an rtol below the state's machine epsilon (1.19e-7 in
#: float32) at trace time, so float32 also runs the tightest rtol it accepts.
FLOAT32_EXTRA_RTOLS = (2e-7,)
QUICK_RTOLS = (1e-3, 1e-5)
#: atol = rtol · ATOL_FACTOR, as in the problems (rtol 1e-6, atol 1e-8).
ATOL_FACTOR = 1e-2
#: The target of issue 17: neuralode's time at equal error ≤ diffrax's.
TARGET_RATIO = 1.0
DEFAULT_JSON = HERE / "_out" / "fwd_work_precision.json"
DEFAULT_PLOT = HERE / "fwd_work_precision.png"


def _single_thread() -> None:
    """Pin XLA to one thread (must run before JAX is imported)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_FLAGS}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# --------------------------------------------------------------------------
# The two solves
# --------------------------------------------------------------------------


def _neuralode_program(field: Callable, rtol: float, atol: float, max_steps: int):
    import neuralode as no

    def solve(y0: Any, params: Any, ts: Any) -> dict[str, Any]:
        sol = no.solve(
            field,
            y0,
            ts,
            params,
            solver=no.Dopri5(),
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            throw=False,
        )
        return {
            "y1": sol.ys[-1],
            "ok": sol.result == no.RESULTS.successful,
            "accepted": sol.stats["num_accepted"],
            "rejected": sol.stats["num_rejected"],
            "reported_nfe": sol.stats["num_fevals"],
        }

    return solve


def _diffrax_program(field: Callable, rtol: float, atol: float, max_steps: int):
    import diffrax

    term = diffrax.ODETerm(field)

    def solve(y0: Any, params: Any, ts: Any) -> dict[str, Any]:
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Dopri5(),
            t0=ts[0],
            t1=ts[-1],
            dt0=None,
            y0=y0,
            args=params,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps,
            throw=False,
        )
        return {
            "y1": sol.ys[-1],
            "ok": sol.result == diffrax.RESULTS.successful,
            "accepted": sol.stats["num_accepted_steps"],
            "rejected": sol.stats["num_rejected_steps"],
        }

    return solve


PROGRAMS = {"neuralode": _neuralode_program, "diffrax": _diffrax_program}


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


def _timed(program: Callable, inputs: tuple) -> float:
    from .timing import jax_sync

    start = time.perf_counter()
    jax_sync(program(*inputs))
    return time.perf_counter() - start


def reference(problem: Any, quick: bool) -> np.ndarray:
    """y(t1) of the float64 reference, loaded from (or added to) the harness cache."""
    import jax

    from .reference import compute_reference, load_reference, save_reference

    path = reference_path(problem, quick)
    ref = load_reference(path)
    if ref is None:
        print(f"computing the float64 reference of {problem.name} …", file=sys.stderr)
        start = time.perf_counter()
        x64 = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        try:
            ref = compute_reference(problem)
        finally:
            jax.config.update("jax_enable_x64", x64)
        save_reference(path, ref)
        print(f"  {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return np.asarray(ref["ys"][-1], np.float64)


class Sampling(NamedTuple):
    """How often each solve is timed: at least `repeats` calls per library, and
    more (up to `max_repeats`) until one library's calls add up to `target_s`."""

    repeats: int = 5
    target_s: float = 1.0
    max_repeats: int = 200

    def count(self, one_call_s: float) -> int:
        """Repeats for a solve whose call takes about `one_call_s` seconds."""
        wanted = math.ceil(self.target_s / max(one_call_s, 1e-9))
        return max(self.repeats, min(wanted, self.max_repeats))


QUICK_SAMPLING = Sampling(repeats=1, target_s=0.0)


def measure_problem(
    problem: Any,
    dtype: str,
    rtols: tuple[float, ...],
    ref: np.ndarray,
    sampling: Sampling,
    count_evals: bool = True,
) -> list[dict]:
    """Rows (one per library and tolerance) of `problem` solved in `dtype`.

    Sets ``jax_enable_x64`` to match `dtype` for the measurement and restores
    it afterwards. Without `count_evals` the rows' `nfe` is None (the counting
    programs are half of the compilations).
    """
    import jax

    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", dtype == "float64")
    try:
        return _measure(problem, dtype, rtols, ref, sampling, count_evals)
    finally:
        jax.config.update("jax_enable_x64", x64)


class _Point(NamedTuple):
    """One tolerance of a sweep: each library's compiled solve, the output and
    time of its first call, or why it refused the tolerance; the timed calls."""

    rtol: float
    programs: dict[str, Callable]
    outs: dict[str, Any]
    first_s: dict[str, float]
    refused: dict[str, str]
    samples: dict[str, list[float]]


def _compile(field: Callable, inputs: tuple, max_steps: int, rtol: float) -> _Point:
    import jax

    from .timing import jax_sync

    point = _Point(rtol, {}, {}, {}, {}, {})
    for lib, make in PROGRAMS.items():
        program = jax.jit(make(field, rtol, rtol * ATOL_FACTOR, max_steps))
        start = time.perf_counter()
        try:
            point.outs[lib] = jax_sync(program(*inputs))
        except ValueError as error:  # a tolerance the library refuses
            point.refused[lib] = str(error).splitlines()[0]
            continue
        point.first_s[lib] = time.perf_counter() - start
        point.programs[lib] = program
        point.samples[lib] = []
    return point


def _time_round(point: _Point, inputs: tuple) -> float:
    """One timed call of each library's solve; the slowest call's seconds."""
    slowest = 0.0
    for lib, program in point.programs.items():
        point.samples[lib].append(_timed(program, inputs))
        slowest = max(slowest, point.samples[lib][-1])
    return slowest


def _measure(
    problem: Any,
    dtype: str,
    rtols: tuple[float, ...],
    ref: np.ndarray,
    sampling: Sampling,
    count_evals: bool,
) -> list[dict]:
    from .fields import FIELDS, jax_inputs

    field = FIELDS[problem.field]
    inputs = jax_inputs(problem, dtype)
    points = [_compile(field, inputs, problem.max_steps, rtol) for rtol in rtols]
    # Timed in rounds over the whole sweep, the libraries alternating call by
    # call: a burst of other work on the machine then lands on a few calls of
    # several tolerances rather than on every call of one.
    wanted = [sampling.count(_time_round(point, inputs)) for point in points]
    for round_ in range(1, max(wanted, default=0)):
        for point, repeats in zip(points, wanted, strict=True):
            if round_ < repeats:
                _time_round(point, inputs)
    rows = []
    for point in points:
        rows += _point_rows(problem, dtype, point, field, inputs, ref, count_evals)
    return rows


def _point_rows(
    problem: Any,
    dtype: str,
    point: _Point,
    field: Callable,
    inputs: tuple,
    ref: np.ndarray,
    count_evals: bool,
) -> list[dict]:
    import jax

    from .fields import rel_error
    from .timing import EvalCounter

    rtol, atol = point.rtol, point.rtol * ATOL_FACTOR
    base = {"problem": problem.name, "dtype": dtype, "rtol": rtol, "atol": atol}
    rows = []
    for lib, make in PROGRAMS.items():
        if lib in point.refused:
            row = dict(base, library=lib, status="refused", message=point.refused[lib])
            row.update(dict.fromkeys(MEASURED))
            print(_row_summary(row), file=sys.stderr, flush=True)
            rows.append(row)
            continue
        nfe = None
        if count_evals:
            counter = EvalCounter()
            counted = jax.jit(make(counter.wrap(field), rtol, atol, problem.max_steps))
            nfe = counter.measure(lambda c=counted: c(*inputs))
        out, samples = point.outs[lib], point.samples[lib]
        row = dict(
            base,
            library=lib,
            status="ok" if bool(out["ok"]) else "failed",
            message="",
            error=rel_error(out["y1"], ref),
            accepted=int(out["accepted"]),
            rejected=int(out["rejected"]),
            nfe=nfe,
            reported_nfe=int(out["reported_nfe"]) if "reported_nfe" in out else None,
            time_s=min(samples),
            time_median_s=statistics.median(samples),
            first_call_s=point.first_s[lib],
            repeats=len(samples),
        )
        print(_row_summary(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


#: The measured fields of a row (None where a library refused the tolerance).
MEASURED = (
    "error",
    "accepted",
    "rejected",
    "nfe",
    "reported_nfe",
    "time_s",
    "time_median_s",
    "first_call_s",
    "repeats",
)


def _row_summary(row: dict) -> str:
    head = f"{row['problem']:8s} {row['dtype']} {row['library']:9s} "
    head += f"rtol={row['rtol']:.0e} "
    if row["status"] == "refused":
        return head + f"refused: {row['message']}"
    return head + (
        f"err={row['error']:.2e} "
        f"steps={row['accepted']}+{row['rejected']} nfe={row['nfe']} "
        f"t={row['time_s'] * 1e3:.1f} ms {row['status']}"
    )


# --------------------------------------------------------------------------
# Time at equal error
# --------------------------------------------------------------------------


def _front(rows: list[dict], key: str) -> list[tuple[float, float]]:
    points = [
        (r["error"], r[key])
        for r in rows
        if r["status"] == "ok" and r["error"] > 0 and (r[key] or 0) > 0
    ]
    return pareto_front(points)


def _log_time_at(front: list[tuple[float, float]], error: float) -> float:
    log_e = [math.log(e) for e, _ in front]
    log_t = [math.log(t) for _, t in front]
    return float(np.interp(math.log(error), log_e, log_t))


def ratio_at_equal_error(
    mine: list[dict], rival: list[dict], key: str = "time_s"
) -> dict[str, Any]:
    """Cost ratio mine / rival at equal error, over the error range both cover.

    The cost is `key` of each row (time, or ``"nfe"``). Each library's (error,
    cost) Pareto front is interpolated linearly in log–log; the ratio is taken
    at every measured error of either front that lies in the common range, so
    every ratio has one measured end.

    **Returns:** a dict with `range` ([low, high] or None), `errors` and
    `ratios` (ascending error), `max`, `min`, `geomean` (None without overlap)
    and `note`.
    """
    a, b = _front(mine, key), _front(rival, key)
    result: dict[str, Any] = {
        "range": None,
        "errors": [],
        "ratios": [],
        "max": None,
        "min": None,
        "geomean": None,
        "note": "",
    }
    if len(a) < 2 or len(b) < 2:
        result["note"] = "fewer than two successful tolerances on a front"
        return result
    low, high = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    if low >= high:
        result["note"] = (
            f"no common error range (neuralode {a[0][0]:.1e}–{a[-1][0]:.1e}, "
            f"diffrax {b[0][0]:.1e}–{b[-1][0]:.1e})"
        )
        return result
    errors = sorted({e for e, _ in a + b if low <= e <= high})
    ratios = [math.exp(_log_time_at(a, e) - _log_time_at(b, e)) for e in errors]
    result.update(
        range=[low, high],
        errors=errors,
        ratios=ratios,
        max=max(ratios),
        min=min(ratios),
        geomean=math.exp(statistics.fmean(map(math.log, ratios))),
        note=f"{len(ratios)} matched errors in {low:.1e}–{high:.1e}",
    )
    return result


def summarise(rows: list[dict], key: str = "time_s") -> dict[str, dict[str, Any]]:
    """`ratio_at_equal_error` of neuralode against diffrax per problem and dtype,
    with `target_met` (whether the ratio is at most `TARGET_RATIO` throughout)."""
    out: dict[str, dict[str, Any]] = {}
    for problem in dict.fromkeys(r["problem"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):

            def pick(lib: str, p: str = problem, d: str = dtype) -> list[dict]:
                return [
                    r
                    for r in rows
                    if (r["problem"], r["dtype"], r["library"]) == (p, d, lib)
                ]

            if not pick("neuralode"):
                continue
            ratio = ratio_at_equal_error(pick("neuralode"), pick("diffrax"), key)
            ratio["target_met"] = (
                None if ratio["max"] is None else ratio["max"] <= TARGET_RATIO
            )
            out.setdefault(problem, {})[dtype] = ratio
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def markdown(results: dict) -> str:
    """The per-tolerance table and the equal-error ratios, as Markdown."""
    rows = results["rows"]
    lines = [
        "| problem | dtype | rtol | steps no / dx | NFE no / dx | error no / dx "
        "| time no / dx [ms] | time ratio at same rtol |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["problem"], r["dtype"], r["rtol"], r["library"]): r for r in rows}
    for (problem, dtype, rtol, lib), a in by_key.items():
        b = by_key.get((problem, dtype, rtol, "diffrax"))
        if lib != "neuralode" or b is None:
            continue
        lines.append(
            f"| {problem} | {dtype} | {rtol:.0e} | {_steps(a)} / {_steps(b)} "
            f"| {_cell(a, 'nfe', 'd')} / {_cell(b, 'nfe', 'd')} "
            f"| {_cell(a, 'error', '.2e')} / {_cell(b, 'error', '.2e')} "
            f"| {_ms(a)} / {_ms(b)} | {_same_rtol_ratio(a, b)} |"
        )
    lines += [
        "",
        "| problem | dtype | error range both cover | neuralode / diffrax time at "
        "equal error: min – max (geomean) | ≤ 1 everywhere | NFE at equal error |",
        "|---|---|---|---|---|---|",
    ]
    nfe = results.get("equal_error_nfe", {})
    for problem, by_dtype in results["equal_error"].items():
        for dtype, r in by_dtype.items():
            if r["max"] is None:
                lines.append(f"| {problem} | {dtype} | – | {r['note']} | – | – |")
                continue
            low, high = r["range"]
            met = "yes" if r["target_met"] else "**no**"
            lines.append(
                f"| {problem} | {dtype} | {low:.1e} – {high:.1e} | "
                f"{_span(r)} | {met} | {_span(nfe.get(problem, {}).get(dtype))} |"
            )
    return "\n".join(lines)


def _span(ratio: dict | None) -> str:
    if not ratio or ratio["max"] is None:
        return "–"
    return f"{ratio['min']:.2f} – {ratio['max']:.2f} ({ratio['geomean']:.2f})"


def _steps(row: dict) -> str:
    if row["status"] == "refused":
        return "refused"
    rejected = f"+{row['rejected']}" if row["rejected"] else ""
    failed = "" if row["status"] == "ok" else f" ({row['status']})"
    return f"{row['accepted']}{rejected}{failed}"


def _cell(row: dict, key: str, spec: str) -> str:
    return "–" if row[key] is None else format(row[key], spec)


def _ms(row: dict) -> str:
    return "–" if row["time_s"] is None else f"{row['time_s'] * 1e3:.3g}"


def _same_rtol_ratio(a: dict, b: dict) -> str:
    if a["time_s"] is None or b["time_s"] is None:
        return "–"
    return f"{a['time_s'] / b['time_s']:.2f}"


def plot(results: dict, path: Path) -> None:
    """Error against time, one panel per problem, float32 solid, float64 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = results["rows"]
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(
        1, len(problems), figsize=(5.5 * len(problems), 4.6), constrained_layout=True
    )
    axes = np.atleast_1d(axes)
    colours = {"neuralode": "C0", "diffrax": "C1"}
    styles = {"float32": ("-", "o"), "float64": (":", "s")}
    for ax, problem in zip(axes, problems, strict=True):
        for (lib, dtype), group in _groups(rows, problem).items():
            line, marker = styles[dtype]
            ax.loglog(
                [r["time_s"] for r in group],
                [r["error"] for r in group],
                linestyle=line,
                marker=marker,
                color=colours[lib],
                alpha=1.0 if dtype == "float32" else 0.6,
                label=f"{lib} {dtype}",
            )
            if dtype == "float32":
                for r in group:
                    ax.annotate(
                        f"{r['rtol']:.0e}",
                        (r["time_s"], r["error"]),
                        textcoords="offset points",
                        xytext=(4, 2),
                        fontsize=6,
                        color=colours[lib],
                    )
        ratio = results["equal_error"].get(problem, {}).get("float32", {})
        title = f"{problem} ({results['problems'][problem]})"
        if ratio.get("max") is not None:
            title += (
                f"\nfloat32: neuralode/diffrax time at equal error "
                f"{ratio['min']:.2f}–{ratio['max']:.2f}"
            )
        ax.set_title(title, fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("time per solve [s] (one thread, min of repeats)")
        ax.set_ylabel("relative error of y(t1) vs float64 reference")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    rtols = results["settings"]["rtols"]
    fig.suptitle(
        f"Forward work–precision, Dopri5, rtol {max(rtols):.0e}…{min(rtols):.0e}, "
        f"atol = rtol·{ATOL_FACTOR:g} (labels: rtol)",
        fontsize=10,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _groups(rows: list[dict], problem: str) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["problem"] == problem and r["status"] == "ok":
            groups.setdefault((r["library"], r["dtype"]), []).append(r)
    return groups


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def rtols_for(dtype: str, quick: bool) -> tuple[float, ...]:
    """The tolerances of a sweep in `dtype`, loosest first."""
    if quick:
        return QUICK_RTOLS
    extra = FLOAT32_EXTRA_RTOLS if dtype == "float32" else ()
    return tuple(sorted(RTOLS + extra, reverse=True))


def run(
    quick: bool,
    problems: tuple[str, ...] = PROBLEMS,
    dtypes: tuple[str, ...] = DTYPES,
    sampling: Sampling = Sampling(),
    count_evals: bool = True,
) -> dict:
    """Measure every problem, dtype, library and tolerance; summarise."""
    from .problems import get_problem

    base_rtols = QUICK_RTOLS if quick else RTOLS
    start = time.perf_counter()
    load_before = load_average()
    rows: list[dict] = []
    descriptions = {}
    for name in problems:
        problem = get_problem(name, quick)
        descriptions[name] = problem.description.removesuffix(", float32")
        ref = reference(problem, quick)
        for dtype in dtypes:
            rtols = rtols_for(dtype, quick)
            rows += measure_problem(problem, dtype, rtols, ref, sampling, count_evals)
    return {
        "settings": {
            "quick": quick,
            "rtols": list(base_rtols),
            "float32_extra_rtols": [] if quick else list(FLOAT32_EXTRA_RTOLS),
            "atol_factor": ATOL_FACTOR,
            "dtypes": list(dtypes),
            "sampling": sampling._asdict(),
            "timing": "min of repeats, libraries interleaved, XLA on one thread",
            "reference": "SciPy DOP853 rtol=1e-12 atol=1e-14, float64 "
            "(benchmarks.reference, cached in benchmarks/_out/refs)",
            "target_ratio": TARGET_RATIO,
        },
        "problems": descriptions,
        "rows": rows,
        "equal_error": summarise(rows),
        "equal_error_nfe": summarise(rows, "nfe"),
        "wall_s": time.perf_counter() - start,
        "load_average": {"before": load_before, "after": load_average()},
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        **environment_info(),
    }


def _names(
    text: str | None, default: tuple[str, ...], known: tuple[str, ...], what: str
) -> tuple[str, ...]:
    if not text:
        return default
    names = tuple(text.split(","))
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Measure, write the JSON and the plot, print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fwd_work_precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, 2 rtols, float32, 1 repeat"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="fewest timed calls (default 5)"
    )
    parser.add_argument(
        "--target-s",
        type=float,
        default=None,
        help="time calls until they add up to this (default 1 s)",
    )
    parser.add_argument("--problems", default=None, help="default mlp-fwd,big-fwd")
    parser.add_argument("--dtypes", default=None, help="default float32,float64")
    parser.add_argument("--json-out", default=str(DEFAULT_JSON))
    parser.add_argument("--plot-out", default=str(DEFAULT_PLOT))
    parser.add_argument(
        "--replot", action="store_true", help="plot and tabulate --json-out again"
    )
    args = parser.parse_args(argv)
    if args.replot:
        results = json.loads(Path(args.json_out).read_text())
        plot(results, Path(args.plot_out))
        print(markdown(results))
        return 0
    sampling = QUICK_SAMPLING if args.quick else Sampling()
    if args.repeats is not None:
        sampling = sampling._replace(repeats=args.repeats)
    if args.target_s is not None:
        sampling = sampling._replace(target_s=args.target_s)
    problems = _names(args.problems, PROBLEMS, PROBLEMS, "problems")
    default_dtypes = ("float32",) if args.quick else DTYPES
    dtypes = _names(args.dtypes, default_dtypes, DTYPES, "dtypes")
    _single_thread()
    results = run(args.quick, problems, dtypes, sampling)
    json_path = Path(args.json_out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    plot(results, Path(args.plot_out))
    print(markdown(results))
    print(
        f"wrote {args.plot_out} and {json_path} ({results['wall_s']:.0f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
