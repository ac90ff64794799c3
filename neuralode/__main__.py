"""`python -m neuralode`: the command line (a demo until the experiments land)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import neuralode as no

    def van_der_pol(t, y, mu):
        return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    ts = jnp.linspace(0.0, 20.0, 5)
    sol = jax.jit(lambda y0: no.solve(van_der_pol, y0, ts, 1.0, rtol=1e-8, atol=1e-10))(
        jnp.array([2.0, 0.0])
    )
    print("Van der Pol (mu=1) with Dopri5, rtol=1e-8:")
    for t, y in zip(ts, sol.ys, strict=True):
        print(f"  t={float(t):5.1f}  x={float(y[0]): .8f}  v={float(y[1]): .8f}")
    stats = {k: int(v) for k, v in sol.stats.items()}
    print(f"  stats: {stats}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="neuralode", description="neuralode experiments and demos"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="solve Van der Pol and print the result")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
