"""Entry point: ``python -m benchmarks.run [--quick] [--problems ...] [--libs ...]``.

The parent process computes (or loads cached) float64 references, then runs
every (library, problem, variant) in its own single-threaded subprocess
(``python -m benchmarks.run --one LIB PROBLEM --variant V --json-out FILE``),
problem by problem with the libraries interleaved, and writes
``benchmarks/results.json`` and ``benchmarks/RESULTS.md``.

``--quick`` uses tiny sizes and few repeats, one subprocess per library, and
writes to ``benchmarks/_out/`` so the real results are not overwritten.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .problems import PROBLEM_NAMES, QUICK_PROBLEM_NAMES, Problem, get_problem

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "_out"
REF_DIR = OUT_DIR / "refs"

#: Pins JAX/XLA and BLAS to one thread; torch is pinned inside the runner.
SINGLE_THREAD_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

_VERSION_PACKAGES = (
    "neuralode",
    "jax",
    "jaxlib",
    "equinox",
    "diffrax",
    "torch",
    "torchdiffeq",
    "numpy",
    "scipy",
)


def single_thread_env() -> dict[str, str]:
    """The environment of every measuring subprocess."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAGS}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def reference_path(problem: Problem, quick: bool) -> Path:
    """Cache file of the reference of `problem`."""
    size = "quick" if quick else "full"
    return REF_DIR / f"{problem.name}-{size}-{problem.fingerprint()}.npz"


# --------------------------------------------------------------------------
# Subprocess side
# --------------------------------------------------------------------------


def _configure_jax(problem: Problem) -> None:
    import jax

    jax.config.update("jax_enable_x64", problem.dtype == "float64")
    jax.block_until_ready(jax.jit(lambda x: x + 1)(1.0))  # backend start-up, untimed


def _worker(args: argparse.Namespace) -> int:
    from .reference import load_reference
    from .runners import RunSettings, run_unit, variants
    from .timing import QUICK_TIMING, TimingSettings

    library, names = args.one
    names = PROBLEM_NAMES if names == "all" else tuple(names.split(","))
    timing = QUICK_TIMING if args.quick else TimingSettings(target_s=args.target_s)
    # --quick skips the (compile-heavy) evaluation counting of gradient programs.
    settings = RunSettings(
        timing=timing, count_grad_evals=not args.quick, verbose=args.verbose
    )
    rows: list[dict] = []
    for name in names:
        problem = get_problem(name, args.quick)
        _configure_jax(problem)
        ref = load_reference(reference_path(problem, args.quick))
        chosen = [args.variant] if args.variant else variants(library, problem)
        if args.quick and not args.variant:
            chosen = chosen[:1]
        for variant in chosen:
            rows += run_unit(library, problem, variant, ref, settings)
    Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


def _reference_worker(args: argparse.Namespace) -> int:
    import jax

    from .reference import compute_reference, save_reference

    jax.config.update("jax_enable_x64", True)
    for name in args.reference.split(","):
        problem = get_problem(name, args.quick)
        start = time.perf_counter()
        save_reference(reference_path(problem, args.quick), compute_reference(problem))
        print(f"reference {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------


def _subprocess_rows(
    cmd: list[str], timeout_s: float, fallback: list[dict], json_out: Path
) -> list[dict]:
    """Run a worker; on a crash or timeout return `fallback` marked failed."""
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
        return [
            dict(r, status="failed", message=f"timeout after {timeout_s:.0f} s")
            for r in fallback
        ]
    if proc.returncode == 0 and json_out.exists():
        return json.loads(json_out.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    message = f"worker crashed (rc {proc.returncode}): {tail[0][:140]}"
    return [dict(r, status="failed", message=message) for r in fallback]


def _placeholder_rows(library: str, problems: list[Problem], quick: bool) -> list[dict]:
    from .runners import variants
    from .runners.common import new_row, tasks

    return [
        new_row(p, library, v, t, status="failed")
        for p in problems
        for v in variants(library, p)[: 1 if quick else None]
        for t in tasks(p)
    ]


def _worker_cmd(
    library: str, names: str, json_out: Path, args: argparse.Namespace
) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.run", "--one", library, names]
    cmd += ["--json-out", str(json_out), "--target-s", str(args.target_s)]
    if args.quick:
        cmd.append("--quick")
    if args.verbose:
        cmd.append("--verbose")
    return cmd


def _ensure_references(problems: list[Problem], quick: bool, timeout_s: float) -> None:
    missing = [p.name for p in problems if not reference_path(p, quick).exists()]
    if not missing:
        return
    print(f"computing float64 references: {', '.join(missing)}", file=sys.stderr)
    cmd = [sys.executable, "-m", "benchmarks.run", "--reference", ",".join(missing)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(
        cmd, env=single_thread_env(), cwd=HERE.parent, timeout=timeout_s
    )
    if proc.returncode != 0:
        print(
            "warning: reference computation failed; errors will be missing",
            file=sys.stderr,
        )


def _summary(row: dict) -> str:
    time_s = row.get("time_median_s")
    shown = f"{time_s * 1e3:9.2f} ms" if time_s is not None else f"{row['status']:>12}"
    ratio = row.get("time_over_limit")
    shown += f"  {ratio:7.2f}x limit" if ratio else ""
    unit = f"{row['problem']:<10} {row['library']:<12} {row['variant']:<21}"
    return f"  {unit} {row['task']:<5}{shown}"


def _run_units(
    args: argparse.Namespace, problems: list[Problem], tmp: Path
) -> list[list[dict]]:
    """All measurements, one list of rows per round."""
    from .runners import LIBRARIES, variants

    libraries = [lib for lib in LIBRARIES if lib in args.libs]
    rounds: list[list[dict]] = []
    for r in range(args.rounds):
        units: list[tuple[list[str], list[dict], Path]] = []
        if args.quick:  # one process per library keeps the start-up cost down
            names = ",".join(p.name for p in problems)
            for lib in libraries:
                out = tmp / f"r{r}-{lib}.json"
                units.append(
                    (
                        _worker_cmd(lib, names, out, args),
                        _placeholder_rows(lib, problems, True),
                        out,
                    )
                )
        else:
            for problem in problems:
                for lib in libraries:
                    for variant in variants(lib, problem):
                        out = tmp / f"r{r}-{lib}-{problem.name}-{variant}.json"
                        cmd = _worker_cmd(lib, problem.name, out, args) + [
                            "--variant",
                            variant,
                        ]
                        fallback = [
                            row
                            for row in _placeholder_rows(lib, [problem], False)
                            if row["variant"] == variant
                        ]
                        units.append((cmd, fallback, out))
        rows: list[dict] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(_subprocess_rows, cmd, args.timeout, fallback, out)
                for cmd, fallback, out in units
            ]
            for future in futures:
                unit_rows = future.result()
                for row in unit_rows:
                    print(_summary(row), file=sys.stderr, flush=True)
                rows += unit_rows
        rounds.append(rows)
    return rounds


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Combine repeated rounds: median of medians, overall min and max."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for rows in zip(*rounds, strict=True):
        first = dict(rows[0])
        ok = [r for r in rows if r.get("time_median_s") is not None]
        if ok:
            first["time_median_s"] = statistics.median(r["time_median_s"] for r in ok)
            first["time_min_s"] = min(r["time_min_s"] for r in ok)
            first["time_max_s"] = max(r["time_max_s"] for r in ok)
            first["first_call_s"] = statistics.median(r["first_call_s"] for r in ok)
            first["repeats"] = sum(r["repeats"] for r in ok)
            if first.get("limit_s"):
                limits = [r["limit_s"] for r in ok if r.get("limit_s")]
                first["limit_s"] = statistics.median(limits)
                first["time_over_limit"] = first["time_median_s"] / first["limit_s"]
        merged.append(first)
    return merged


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (other work on the machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment_info() -> dict[str, Any]:
    """Machine description and installed library versions."""
    versions = {}
    for package in _VERSION_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": versions,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--problems", default=None, help="comma-separated names")
    parser.add_argument("--libs", default="neuralode,diffrax,jaxode,torchdiffeq")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all units")
    parser.add_argument("--jobs", type=int, default=None, help="parallel workers")
    parser.add_argument("--timeout", type=float, default=None, help="per subprocess, s")
    parser.add_argument("--target-s", type=float, default=2.0, help="repeat time, s")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--md-out", default=None)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--one", nargs=2, metavar=("LIB", "PROBLEMS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.libs = args.libs.split(",")
    if args.problems is None:
        args.problems = ",".join(QUICK_PROBLEM_NAMES if args.quick else PROBLEM_NAMES)
    if args.jobs is None:  # parallel only when timings do not matter
        args.jobs = 2 if args.quick else 1
    if args.timeout is None:
        args.timeout = 240.0 if args.quick else 600.0
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks (or, internally, one worker)."""
    args = _parse(argv)
    if args.one:
        return _worker(args)
    if args.reference:
        return _reference_worker(args)

    from .report import write_markdown

    problems = [get_problem(n, args.quick) for n in args.problems.split(",")]
    json_out = Path(
        args.json_out
        or (OUT_DIR / "quick.json" if args.quick else HERE / "results.json")
    )
    md_out = Path(
        args.md_out or (OUT_DIR / "QUICK.md" if args.quick else HERE / "RESULTS.md")
    )
    command = "python -m benchmarks.run " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    start = time.perf_counter()
    load_before = load_average()
    _ensure_references(problems, args.quick, args.timeout)
    with tempfile.TemporaryDirectory() as tmp:
        rows = merge_rounds(_run_units(args, problems, Path(tmp)))
    results = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        **environment_info(),
        "settings": {
            "quick": args.quick,
            "rounds": args.rounds,
            "target_s": args.target_s,
            "single_thread": SINGLE_THREAD_FLAGS,
        },
        "load_average": {"before": load_before, "after": load_average()},
        "problems": {
            p.name: {"group": p.group, "description": p.description, "kind": p.kind}
            for p in problems
        },
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=1))
    write_markdown(results, md_out)
    print(
        f"wrote {json_out} and {md_out} in {results['wall_s']:.0f} s", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
