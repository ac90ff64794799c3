"""Entry point: ``python -m benchmarks.run [--quick] [--problems ...] [--libs ...]``.

The parent process checks the device (``--device cpu``, the default, or
``gpu``), computes (or loads cached) float64 references, then runs every
(library, problem, variant) in its own subprocess
(``python -m benchmarks.run --one LIB PROBLEM --variant V --json-out FILE``),
single-threaded on the CPU, problem by problem with the libraries interleaved,
and writes ``benchmarks/results.json`` and ``benchmarks/RESULTS.md``.

For a JAX library a second fresh subprocess then times the first call again
with JAX's persistent compilation cache holding what the first one compiled
("first call (warm cache)", see `benchmarks.cache`; ``--no-warm-cache`` to
skip). ``--deadline-s`` starts no unit after that many seconds and runs the
units by priority (neuralode and diffrax, then jax.experimental.ode, then
torchdiffeq), so that a cut run still has whole libraries.

``--quick`` uses tiny sizes and few repeats, one subprocess per library, no
warm-cache runs unless ``--warm-cache``, and writes to ``benchmarks/_out/`` so
the real results are not overwritten.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import cache, syncs
from .device import DEVICES, DeviceError, probe
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


#: ``JAX_PLATFORMS`` of the subprocesses per ``--device``; a worker checks
#: that JAX's first device is really of that kind.
JAX_PLATFORMS = {"cpu": "cpu", "gpu": "cuda,cpu"}


def single_thread_env(device: str = "cpu") -> dict[str, str]:
    """The environment of every measuring subprocess.

    On the CPU, XLA and BLAS are pinned to one thread; on a GPU the XLA CPU
    thread flags are left out (they would only slow the host side). Any
    compilation-cache setting of the user's is removed, so that a first call
    always compiles (`benchmarks.cache`).
    """
    env = cache.without_cache_settings(os.environ)
    if device == "cpu":
        flags = f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAGS}"
        env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = JAX_PLATFORMS[device]
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


def _configure_jax(problem: Problem, args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_enable_x64", problem.dtype == "float64")
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    jax.block_until_ready(jax.jit(lambda x: x + 1)(1.0))  # backend start-up, untimed


def chosen_variants(
    library: str, problem: Problem, quick: bool, only: list[str] | None
) -> list[str]:
    """The variants run for `library` on `problem` (``--variants`` filters)."""
    from .runners import variants

    chosen = [v for v in variants(library, problem) if only is None or v in only]
    return chosen[:1] if quick else chosen


def _populate(directory: str, programs: list[tuple[Any, tuple]]) -> None:
    """Write `programs` to the cache; a failure costs the warm run, not the rows."""
    try:
        cache.write_programs(directory, programs)
    except Exception as exc:
        print(f"warning: cache not written: {exc!r}"[:300], file=sys.stderr)


def _worker(args: argparse.Namespace) -> int:
    from .device import describe, require
    from .reference import load_reference
    from .runners import RunSettings, run_unit
    from .timing import QUICK_TIMING, TimingSettings

    library, names = args.one
    names = PROBLEM_NAMES if names == "all" else tuple(names.split(","))
    if args.cache_dir:  # the warm-cache worker: on before anything compiles
        cache.enable(args.cache_dir)
    require(describe(), args.device)
    timing = (
        QUICK_TIMING
        if args.quick
        else TimingSettings(target_s=args.target_s, max_total_s=args.max_total_s)
    )
    kept: list[tuple[Any, tuple]] = []  # timed programs, for --populate-cache

    def keep(program: Any, program_args: tuple) -> None:
        kept.append((program, program_args))

    # --quick skips the (compile-heavy) evaluation counting of gradient programs.
    settings = RunSettings(
        timing=timing,
        count_grad_evals=not (args.quick or args.no_grad_evals),
        verbose=args.verbose,
        device=args.device,
        first_call_only=args.first_call_only,
        keep_program=keep if args.populate_cache else None,
        count_syncs=args.syncs,
    )
    rows: list[dict] = []
    for name in names:
        problem = get_problem(name, args.quick)
        _configure_jax(problem, args)
        ref = load_reference(reference_path(problem, args.quick))
        chosen = [args.variant] if args.variant else None
        chosen = chosen or chosen_variants(library, problem, args.quick, args.variants)
        for variant in chosen:
            rows += run_unit(library, problem, variant, ref, settings)
            if kept:  # after the unit's measurements, under the same JAX config
                _populate(args.populate_cache, kept)
                kept.clear()
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
    cmd: list[str],
    timeout_s: float,
    fallback: list[dict],
    json_out: Path,
    env: dict[str, str],
) -> list[dict]:
    """Run a worker; on a crash or timeout return `fallback` marked failed."""
    try:
        proc = subprocess.run(
            cmd,
            env=env,
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


def _placeholder_rows(
    library: str,
    problems: list[Problem],
    quick: bool,
    only: list[str] | None = None,
) -> list[dict]:
    from .runners.common import new_row, tasks

    return [
        new_row(p, library, v, t, status="failed")
        for p in problems
        for v in chosen_variants(library, p, quick, only)
        for t in tasks(p)
    ]


def _worker_cmd(
    library: str, names: str, json_out: Path, args: argparse.Namespace
) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.run", "--one", library, names]
    cmd += ["--json-out", str(json_out), "--target-s", str(args.target_s)]
    cmd += ["--max-total-s", str(args.max_total_s), "--device", args.device]
    cmd += ["--matmul-precision", args.matmul_precision]
    if args.variants:
        cmd += ["--variants", ",".join(args.variants)]
    for flag in ("quick", "verbose", "no_grad_evals"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    return cmd


def _ensure_references(
    problems: list[Problem], quick: bool, timeout_s: float, jobs: int
) -> None:
    """Compute the missing references, one CPU subprocess per problem."""
    missing = [p.name for p in problems if not reference_path(p, quick).exists()]
    if not missing:
        return
    print(f"computing float64 references: {', '.join(missing)}", file=sys.stderr)

    def compute(name: str) -> int:
        cmd = [sys.executable, "-m", "benchmarks.run", "--reference", name]
        if quick:
            cmd.append("--quick")
        return subprocess.run(
            cmd, env=single_thread_env(), cwd=HERE.parent, timeout=timeout_s
        ).returncode

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        failed = [
            n for n, rc in zip(missing, pool.map(compute, missing), strict=True) if rc
        ]
    if failed:
        print(
            f"warning: reference computation failed for {', '.join(failed)}; "
            "their errors will be missing",
            file=sys.stderr,
        )


def _summary(row: dict, warm: bool = False) -> str:
    unit = f"{row['problem']:<10} {row['library']:<12} {row['variant']:<21}"
    if warm:  # a warm-cache worker's row: its first call, or why there is none
        first = row.get("first_call_s")
        shown = f"first call {first:.3f} s" if first is not None else row["status"]
        note = f" ({row['message']})" if row.get("message") else ""
        return f"  {unit} {row['task']:<5} {shown}{note}"
    time_s = row.get("time_median_s")
    shown = f"{time_s * 1e3:9.2f} ms" if time_s is not None else f"{row['status']:>12}"
    ratio = row.get("time_over_limit")
    shown += f"  {ratio:7.2f}x limit" if ratio else ""
    return f"  {unit} {row['task']:<5}{shown}"


@dataclasses.dataclass
class Unit:
    """One worker's measurements: a library on problems (one variant or all).

    `cache_dir` is set when a warm-cache run follows: the measuring worker
    writes its timed programs there (``--populate-cache``) and the warm one
    reads them (``--cache-dir``).
    """

    library: str
    names: str
    variant: str | None
    fallback: list[dict]
    out: Path
    cache_dir: Path | None = None

    def cold_cmd(self, args: argparse.Namespace) -> list[str]:
        """The measuring worker: no cache while it measures."""
        cmd = _worker_cmd(self.library, self.names, self.out, args)
        if self.variant:
            cmd += ["--variant", self.variant]
        if self.cache_dir is not None:
            cmd += ["--populate-cache", str(self.cache_dir)]
        elif args.syncs:
            cmd.append("--syncs")
        return cmd

    def warm_cmd(self, args: argparse.Namespace) -> list[str]:
        """The warm-cache worker: first calls only, the cache on from the start."""
        assert self.cache_dir is not None
        cmd = _worker_cmd(self.library, self.names, self.warm_out, args)
        if self.variant:
            cmd += ["--variant", self.variant]
        if args.syncs:  # here a failing profiler costs no timed row
            cmd.append("--syncs")
        return cmd + ["--first-call-only", "--cache-dir", str(self.cache_dir)]

    @property
    def warm_out(self) -> Path:
        return self.out.with_name(self.out.stem + "-warm.json")


#: Libraries whose programs JAX compiles (and so can cache).
JAX_LIBRARIES = frozenset({"neuralode", "diffrax", "jaxode"})


def plan_units(
    args: argparse.Namespace, problems: list[Problem], tmp: Path, r: int
) -> list[Unit]:
    """The units of round `r`, problem by problem, libraries interleaved."""
    from .runners import LIBRARIES

    libraries = [lib for lib in LIBRARIES if lib in args.libs]
    units: list[Unit] = []
    if args.quick:  # one process per library keeps the start-up cost down
        names = ",".join(p.name for p in problems)
        for lib in libraries:
            fallback = _placeholder_rows(lib, problems, True, args.variants)
            units.append(Unit(lib, names, None, fallback, tmp / f"r{r}-{lib}.json"))
    else:
        for problem in problems:
            for lib in libraries:
                for variant in chosen_variants(lib, problem, False, args.variants):
                    fallback = [
                        row
                        for row in _placeholder_rows(lib, [problem], False)
                        if row["variant"] == variant
                    ]
                    out = tmp / f"r{r}-{lib}-{problem.name}-{variant}.json"
                    units.append(Unit(lib, problem.name, variant, fallback, out))
    for unit in units:
        if args.warm_cache and unit.library in JAX_LIBRARIES and unit.fallback:
            unit.cache_dir = unit.out.with_name(unit.out.stem + "-cache")
            unit.cache_dir.mkdir()
    return units


def merge_warm(rows: list[dict], warm: list[dict] | None, reason: str) -> list[dict]:
    """`rows` with the warm-cache first calls (and their notes) of `warm`.

    Without `warm` (the run failed or was not made), measured rows get
    `reason` as a note.
    """
    from .runners.common import join_notes

    found = {(w["problem"], w["variant"], w["task"]): w for w in warm or []}
    merged = []
    for row in rows:
        row = dict(row)
        match = found.get((row["problem"], row["variant"], row["task"]))
        if match is not None and match.get("syncs"):
            row["syncs"] = syncs.per_step(match["syncs"], row.get("nfe_fwd"))
        if match is not None and match.get("first_call_s") is not None:
            row["first_call_warm_s"] = match["first_call_s"]
            row["message"] = join_notes(row.get("message"), match.get("message"))
        elif row.get("time_median_s") is not None and reason:
            detail = match.get("message") if match else None
            row["message"] = join_notes(row.get("message"), reason, detail)
        merged.append(row)
    return merged


class Clock:
    """Seconds since the run started, and the ``--deadline-s`` budget."""

    def __init__(self, deadline_s: float | None) -> None:
        self.start = time.perf_counter()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        """Whether no new unit may start."""
        return self.deadline_s is not None and self.elapsed() >= self.deadline_s

    def timeout(self, limit_s: float) -> float:
        """A unit's timeout: `limit_s`, cut to the budget left plus 30 s."""
        if self.deadline_s is None:
            return limit_s
        return min(limit_s, max(self.deadline_s - self.elapsed(), 0.0) + 30.0)


#: Under ``--deadline-s`` the units run in these groups, in this order (within
#: a group, problem by problem, each warm-cache run right after its unit).
DEADLINE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("neuralode", "diffrax"),
    ("jaxode",),
    ("torchdiffeq",),
)


def _skipped(rows: list[dict], clock: Clock) -> list[dict]:
    message = f"not run: the run's --deadline-s {clock.deadline_s:g} s was spent"
    return [dict(r, status="skipped", message=message) for r in rows]


def _run_round(args: argparse.Namespace, units: list[Unit], clock: Clock) -> list[dict]:
    """Measure `units` (cold, then warm where planned); rows in unit order."""
    env = single_thread_env(args.device)
    lock = threading.Lock()

    def report(unit: Unit, kind: str, started: float, rows: list[dict]) -> None:
        with lock:
            took = time.perf_counter() - started
            label = f"{unit.library} {unit.names} {unit.variant or ''}".strip()
            print(
                f"[{clock.elapsed():6.1f} s] {label} ({kind}, {took:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            for row in rows:
                print(
                    _summary(row, warm=kind != "measure"), file=sys.stderr, flush=True
                )

    def cold(unit: Unit) -> list[dict]:
        if clock.spent():
            return _skipped(unit.fallback, clock)
        started = time.perf_counter()
        timeout = clock.timeout(args.timeout)
        rows = _subprocess_rows(
            unit.cold_cmd(args), timeout, unit.fallback, unit.out, env
        )
        report(unit, "measure", started, rows)
        return rows

    def warm(unit: Unit, measured: concurrent.futures.Future) -> list[dict]:
        rows = measured.result()
        if not any(r.get("time_median_s") is not None for r in rows):
            return rows
        if clock.spent():
            return merge_warm(rows, None, "warm cache: not run (--deadline-s)")
        started = time.perf_counter()
        fallback = [dict(r, first_call_s=None) for r in rows]
        warm_rows = _subprocess_rows(
            unit.warm_cmd(args),
            clock.timeout(args.timeout),
            fallback,
            unit.warm_out,
            env,
        )
        report(unit, "warm cache", started, warm_rows)
        return merge_warm(rows, warm_rows, "warm-cache run failed")

    if clock.deadline_s is None:
        order = units
    else:  # by priority, so that a cut run keeps whole libraries
        order = [u for group in DEADLINE_GROUPS for u in units if u.library in group]
    futures: dict[int, concurrent.futures.Future] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for unit in order:
            measured = pool.submit(cold, unit)
            # Submitted right after its measuring job, so a warm job never
            # waits on a job queued behind it.
            futures[id(unit)] = (
                pool.submit(warm, unit, measured) if unit.cache_dir else measured
            )
    return [row for unit in units for row in futures[id(unit)].result()]


def _run_units(
    args: argparse.Namespace, problems: list[Problem], tmp: Path, clock: Clock
) -> list[list[dict]]:
    """All measurements, one list of rows per round."""
    return [
        _run_round(args, plan_units(args, problems, tmp, r), clock)
        for r in range(args.rounds)
    ]


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
            warm = [r["first_call_warm_s"] for r in ok if r.get("first_call_warm_s")]
            first["first_call_warm_s"] = statistics.median(warm) if warm else None
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
    if versions["neuralode"] is None:  # run from a checkout without installing
        found = re.search(
            r'^version = "([^"]+)"', (HERE.parent / "pyproject.toml").read_text(), re.M
        )
        versions["neuralode"] = f"{found.group(1)} (source)" if found else None
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
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--problems", default=None, help="comma-separated names")
    parser.add_argument("--libs", default="neuralode,diffrax,jaxode,torchdiffeq")
    parser.add_argument(
        "--variants", default=None, help="comma-separated variants to run (all)"
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="cpu (single-threaded) or gpu (JAX on CUDA, torch on CUDA if it "
        "can; fails at once if JAX sees no GPU)",
    )
    parser.add_argument(
        "--warm-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time each JAX program's first call again in a fresh process with "
        "a warm persistent compilation cache (default: on, off with --quick)",
    )
    parser.add_argument(
        "--syncs",
        action="store_true",
        help="count loops and conditionals of the compiled forward programs and, "
        "on a GPU, their device-to-host copies per step",
    )
    parser.add_argument(
        "--matmul-precision",
        choices=("default", "highest"),
        default="default",
        help="jax_default_matmul_precision of the workers (highest: no TF32 on "
        "a GPU, as in torch)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat all units")
    parser.add_argument("--jobs", type=int, default=None, help="parallel workers")
    parser.add_argument("--timeout", type=float, default=None, help="per subprocess, s")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="start no unit after this many seconds (the rest are skipped rows); "
        "runs neuralode and diffrax first",
    )
    parser.add_argument("--target-s", type=float, default=2.0, help="repeat time, s")
    parser.add_argument(
        "--max-total-s", type=float, default=10.0, help="cap on one row's repeats, s"
    )
    parser.add_argument(
        "--no-grad-evals",
        action="store_true",
        help="skip counting gradient evaluations (and so their limit)",
    )
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--md-out", default=None)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--one", nargs=2, metavar=("LIB", "PROBLEMS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--first-call-only", action="store_true", help=argparse.SUPPRESS
    )
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--populate-cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.libs = args.libs.split(",")
    args.variants = args.variants.split(",") if args.variants else None
    if args.problems is None:
        args.problems = ",".join(QUICK_PROBLEM_NAMES if args.quick else PROBLEM_NAMES)
    if args.warm_cache is None:
        args.warm_cache = not args.quick
    if args.jobs is None:  # parallel only when timings do not matter
        args.jobs = 2 if args.quick and args.device == "cpu" else 1
    if args.device == "gpu":  # every JAX process takes most of the GPU's memory
        args.jobs = 1
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

    clock = Clock(args.deadline_s)
    try:
        device = probe(
            args.device,
            single_thread_env(args.device),
            with_torch=args.device == "gpu" and "torchdiffeq" in args.libs,
        )
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    load_before = load_average()
    _ensure_references(
        problems,
        args.quick,
        args.timeout,
        max(1, min(len(problems), os.cpu_count() or 1)),
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = merge_rounds(_run_units(args, problems, Path(tmp), clock))
    results = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        **environment_info(),
        "device": device,
        "settings": {
            "quick": args.quick,
            "rounds": args.rounds,
            "target_s": args.target_s,
            "max_total_s": args.max_total_s,
            "device": args.device,
            "jax_platforms": JAX_PLATFORMS[args.device],
            "single_thread": SINGLE_THREAD_FLAGS if args.device == "cpu" else None,
            "matmul_precision": args.matmul_precision,
            "warm_cache": args.warm_cache,
            "grad_evals": not (args.quick or args.no_grad_evals),
            "deadline_s": args.deadline_s,
        },
        "load_average": {"before": load_before, "after": load_average()},
        "problems": {
            p.name: {"group": p.group, "description": p.description, "kind": p.kind}
            for p in problems
        },
        "wall_s": clock.elapsed(),
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
