"""Compiled temporary memory of a gradient through a solve, for every adjoint.

``python -m benchmarks.reversible_memory`` compiles (without running)
``jax.grad`` of ``Σ y(T)²`` through ``neuralode.solve`` with each adjoint and
prints XLA's ``temp_size_in_bytes`` as a Markdown table:

- a large state, a batch of 4096 × 64 through a 64 → 64 → 64 tanh MLP field, at
  T = 10, with adaptive Dopri5 (``max_steps=4096``, the default) and with
  fixed steps of 0.1 (``max_steps`` = the 100 steps taken);
- a small state, a batch of 16 × 2 through a 2 → 64 → 64 → 2 tanh MLP, with
  fixed steps of 0.1 at T = 1, 10 and 40 (``max_steps`` = the 10, 100 and 400
  steps taken, so that buffers sized by it show their growth).

float32 throughout. Nothing is timed: memory only.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import neuralode as no

ADJOINTS = {
    "backsolve": "BacksolveAdjoint",
    "checkpoint": "CheckpointAdjoint",
    "reversible": "ReversibleAdjoint",
    "interpolating": "InterpolatingAdjoint",
}


def mlp_params(sizes: list[int], seed: int) -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(a, b)) / math.sqrt(a), jnp.float32),
            jnp.zeros(b, jnp.float32),
        )
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_field(t: Any, y: jax.Array, params: Any) -> jax.Array:
    for w, b in params[:-1]:
        y = jnp.tanh(y @ w + b)
    w, b = params[-1]
    return y @ w + b


def temp_bytes(adjoint: Any, y0: jax.Array, params: Any, horizon: float,
               dt0: float | None) -> int:  # fmt: skip
    """XLA's temporary bytes for the compiled gradient w.r.t. the parameters."""
    if dt0 is None:
        extra = {}
    else:
        steps = math.ceil(round(horizon / dt0, 6))
        extra = {
            "dt0": dt0,
            "controller": no.ConstantStepSize(),
            "max_steps": steps,
        }
    ts = jnp.array([0.0, horizon], jnp.float32)

    def loss(params):
        ys = no.odeint(mlp_field, y0, ts, params, adjoint=adjoint, **extra)
        return jnp.sum(ys[-1] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 2**10:.3g} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adjoints", default=",".join(ADJOINTS))
    args = parser.parse_args()
    names = [n for n in args.adjoints.split(",") if hasattr(no, ADJOINTS.get(n, "?"))]
    big_y0 = jnp.asarray(np.random.default_rng(0).normal(size=(4096, 64)), jnp.float32)
    big_params = mlp_params([64, 64, 64], seed=1)
    small_y0 = jnp.asarray(np.random.default_rng(2).normal(size=(16, 2)), jnp.float32)
    small_params = mlp_params([2, 64, 64, 2], seed=3)
    columns = [
        ("4096×64, T=10, adaptive", big_y0, big_params, 10.0, None),
        ("4096×64, T=10, 100 steps", big_y0, big_params, 10.0, 0.1),
        ("16×2, T=1, 10 steps", small_y0, small_params, 1.0, 0.1),
        ("16×2, T=10, 100 steps", small_y0, small_params, 10.0, 0.1),
        ("16×2, T=40, 400 steps", small_y0, small_params, 40.0, 0.1),
    ]
    start = time.perf_counter()
    rows = []
    for name in names:
        adjoint = getattr(no, ADJOINTS[name])()
        cells = [mib(temp_bytes(adjoint, *column[1:])) for column in columns]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(f"[{time.perf_counter() - start:6.1f} s] {name}", flush=True)
    print()
    print("| adjoint | " + " | ".join(c[0] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    print("\n".join(rows))
    print(
        f"\njax {jax.__version__}, {jax.default_backend()}, neuralode {no.__version__}"
    )


if __name__ == "__main__":
    main()
