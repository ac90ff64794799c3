"""Where the dense and the matrix-free linear solves of the implicit methods
cross over.

A batch of N independent Robertson systems solved as one ODE of 3N unknowns
(its Jacobian is block diagonal): Rodas5P with `linear_solver="dense"` (jacfwd
+ LU of the 3N × 3N matrix: O(N³)) against `"matrix_free"` (JVPs + GMRES:
O(N) per product), and the batch solved with `jax.vmap` over N solves of 3
unknowns (each with its own 3 × 3 LU and its own steps). Float64, single
thread, median wall time of jitted calls after a warm-up.

Run: ``python -m benchmarks.stiff_linear_solve [--sizes 1 4 16 64 256]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .run import single_thread_env

HERE = Path(__file__).resolve().parent


def _median_time(fn, *args, repeats: int = 5) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(sizes: list[int], t1: float, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import neuralode as no
    from neuralode.datasets._stiff_systems import ROBERTSON_RATES, robertson

    rates = jnp.asarray(ROBERTSON_RATES)
    ts = jnp.array([0.0, t1])
    rows = []
    for n in sizes:
        # Each system gets slightly different rates, so their steps differ.
        scales = jnp.asarray(np.linspace(0.5, 2.0, n))
        y0 = jnp.tile(jnp.array([1.0, 0.0, 0.0]), n)

        def batch_field(t, y, scales):
            y = y.reshape(n, 3)
            field = jax.vmap(lambda yi, s: robertson(t, yi, rates * s))
            return field(y, scales).ravel()

        row = {"systems": n, "unknowns": 3 * n}
        for method in ("dense", "matrix_free"):
            solve = jax.jit(
                lambda y0, s, method=method: no.solve(
                    batch_field, y0, ts, s, solver=no.Rodas5P(linear_solver=method),
                    rtol=1e-6, atol=1e-10, max_steps=20000,
                ).ys[-1]
            )  # fmt: skip
            row[method] = _median_time(solve, y0, scales, repeats=repeats)

        one = lambda y0, s: no.solve(
            robertson, y0, ts, rates * s, solver=no.Rodas5P(), rtol=1e-6,
            atol=1e-10, max_steps=20000,
        ).ys[-1]  # fmt: skip
        vmapped = jax.jit(jax.vmap(one))
        row["vmap"] = _median_time(vmapped, y0.reshape(n, 3), scales, repeats=repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--t1", type=float, default=1e3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--json-out", type=Path, default=HERE / "_out" / "stiff_linear_solve.json"
    )
    args = parser.parse_args(argv)
    import os

    os.environ.update(single_thread_env())
    rows = measure(args.sizes, args.t1, args.repeats)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(rows, indent=1))
    print("| systems | unknowns | dense (s) | matrix-free (s) | vmap (s) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['systems']} | {r['unknowns']} | {r['dense']:.4f} | "
            f"{r['matrix_free']:.4f} | {r['vmap']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
