"""Events: the first impact of 1024 falling balls, neuralode against diffrax.

Each ball starts at rest at its own height h_i ∈ [1, 10] (float64, g = 9.81);
the event is its height crossing zero downwards, at t* = √(2 h_i / g). Both
libraries solve the balls under `jax.vmap` with Tsit5 at the same tolerances
and return every impact time; the gradient is that of Σ t*_i with respect to
the heights and g (closed form: dt*/dh = 1/(g t*), dt*/dg = -t*/(2g)), through
neuralode's `CheckpointAdjoint` and `BacksolveAdjoint` and diffrax's default
(`RecursiveCheckpointAdjoint`). diffrax locates its event with optimistix's
Newton root finder at rtol = atol = 1e-13.

Every (library, program) runs in a fresh process, so that each first call
(trace + compile + first run) is measured cold, with XLA on one thread. The
report gives first call, median time, the ratio to diffrax and the largest
event-time and gradient errors against the closed form.

    python -m benchmarks.events [--json PATH] [--md PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
GRAVITY = 9.81
NUM_BALLS = 1024
RTOL, ATOL = 1e-8, 1e-8
TARGET_RATIO = 0.5
TARGET_ERROR = 1e-10
SINGLE_THREAD_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
#: (library, program): what each worker process measures.
VARIANTS = (
    ("neuralode", "time"),
    ("neuralode", "grad-checkpoint"),
    ("neuralode", "grad-backsolve"),
    ("diffrax", "time"),
    ("diffrax", "grad"),
)


def heights(n: int) -> np.ndarray:
    return np.linspace(1.0, 10.0, n)


def _neuralode(program: str):
    import jax
    import jax.numpy as jnp

    import neuralode as no

    ts = jnp.array([0.0, 5.0])
    event = no.Event(lambda t, y, g: y[0], direction=-1)
    adjoint = {
        "time": no.CheckpointAdjoint(),
        "grad-checkpoint": no.CheckpointAdjoint(),
        "grad-backsolve": no.BacksolveAdjoint(),
    }[program]

    def impact(h, g):
        sol = no.solve(
            lambda t, y, g: jnp.stack([y[1], -g]),
            jnp.stack([h, jnp.zeros_like(h)]),
            ts,
            g,
            solver=no.Tsit5(),
            rtol=RTOL,
            atol=ATOL,
            event=event,
            adjoint=adjoint,
        )
        return sol.event_time

    return jax.vmap(impact, in_axes=(0, None))


def _diffrax(program: str):
    import diffrax
    import jax
    import jax.numpy as jnp
    import optimistix as optx

    term = diffrax.ODETerm(lambda t, y, g: jnp.stack([y[1], -g]))
    event = diffrax.Event(
        lambda t, y, args, **kwargs: y[0],
        root_finder=optx.Newton(rtol=1e-13, atol=1e-13),
    )

    def impact(h, g):
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            t0=0.0,
            t1=5.0,
            dt0=None,
            y0=jnp.stack([h, jnp.zeros_like(h)]),
            args=g,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            event=event,
        )
        return sol.ts[-1]

    return jax.vmap(impact, in_axes=(0, None))


def worker(library: str, program: str, quick: bool) -> dict[str, Any]:
    """Measure one variant in this process; returns its row."""
    import jax
    import jax.numpy as jnp

    from .timing import QUICK_TIMING, TimingSettings, jax_sync, time_call

    jax.config.update("jax_enable_x64", True)
    n = 64 if quick else NUM_BALLS
    h = jnp.asarray(heights(n))
    g = jnp.asarray(GRAVITY)
    impact = (_neuralode if library == "neuralode" else _diffrax)(program)
    if program == "time":
        fn = jax.jit(impact)
    else:
        fn = jax.jit(jax.grad(lambda h, g: jnp.sum(impact(h, g)), argnums=(0, 1)))
    settings = QUICK_TIMING if quick else TimingSettings()
    timing, out = time_call(lambda: fn(h, g), jax_sync, settings)
    exact = np.sqrt(2 * np.asarray(h) / GRAVITY)
    if program == "time":
        error = float(np.max(np.abs(np.asarray(out) - exact)))
    else:
        dh, dg = out
        exact_dh = 1 / (GRAVITY * exact)
        exact_dg = float(np.sum(-exact / (2 * GRAVITY)))
        error = max(
            float(np.max(np.abs(np.asarray(dh) - exact_dh) / exact_dh)),
            abs(float(dg) - exact_dg) / abs(exact_dg),
        )
    return {
        "library": library,
        "program": program,
        "balls": n,
        "first_call_s": timing.first_call_s,
        "median_s": timing.median_s,
        "repeats": timing.repeats,
        "error": error,
    }


def run_all(quick: bool) -> list[dict[str, Any]]:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_FLAGS}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    for name in ("JAX_COMPILATION_CACHE_DIR", "NEURALODE_CACHE_DIR"):
        env.pop(name, None)
    rows = []
    for library, program in VARIANTS:
        command = [sys.executable, "-m", "benchmarks.events", "--worker", library]
        command += [program] + (["--quick"] if quick else [])
        done = subprocess.run(
            command, env=env, cwd=HERE.parent, capture_output=True, text=True
        )
        if done.returncode != 0:
            rows.append(
                {"library": library, "program": program, "failed": done.stderr[-2000:]}
            )
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    by = {(r["library"], r["program"]): r for r in rows}
    reference = {
        "time": by.get(("diffrax", "time")),
        "grad": by.get(("diffrax", "grad")),
    }
    lines = [
        "| library | program | balls | first call (s) | median (s) | "
        "÷ diffrax (median) | ÷ diffrax (first call) | max error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['library']} | {row['program']} | failed | | | | | |")
            continue
        ref = reference["time" if row["program"] == "time" else "grad"]
        ratio = first = "—"
        if ref is not None and "failed" not in ref and row["library"] != "diffrax":
            ratio = f"{row['median_s'] / ref['median_s']:.2f}"
            first = f"{row['first_call_s'] / ref['first_call_s']:.2f}"
        lines.append(
            f"| {row['library']} | {row['program']} | {row['balls']} | "
            f"{row['first_call_s']:.2f} | {row['median_s'] * 1e3:.2f} ms | {ratio} | "
            f"{first} | {row['error']:.1e} |"
        )
    lines.append("")
    lines.append(
        f"Target: ≤ {TARGET_RATIO}× diffrax's time and first call, event-time "
        f"error ≤ {TARGET_ERROR:g} (float64). Errors: the impact time's absolute "
        "error for `time`, the gradient's largest relative error for `grad`."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("LIBRARY", "PROGRAM"))
    parser.add_argument("--quick", action="store_true", help="64 balls, few repeats")
    parser.add_argument("--json", type=Path, default=HERE / "_out" / "events.json")
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, quick=args.quick)))
        return 0
    rows = run_all(args.quick)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    print(table)
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
