"""`python -m neuralode` (or `neuralode`): run the paper's experiments.

    python -m neuralode digits                 # ODE-Net on 8x8 digits
    python -m neuralode cnf --reg kinetic,jacobian
    python -m neuralode cnf --data digits      # CNF on 8x8 images, bits/dim
    python -m neuralode spiral --steps 3000
    python -m neuralode stiff --solver kvaerno5   # Robertson's rate constants
    python -m neuralode digits --resume runs/digits-20250101-120000 --steps 2000
    python -m neuralode demo                   # solve Van der Pol and print it

Every experiment writes metrics.json, history.json, PNG plots, config.json
and an equinox checkpoint into --out (default runs/<experiment>-<timestamp>/).
Nothing is written until the options, the output directory and any checkpoint
to resume from have been checked: an --out that holds another run needs
--overwrite, and a checkpoint that does not fit is refused with a usage error.

Every command keeps JAX's compiled programs in a persistent cache, for the
next run to load instead of compiling (which directory and which programs:
`neuralode.experiments._compilation_cache`); --no-cache turns that off.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import neuralode as no

    def van_der_pol(t, y, mu):
        return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    ts = jnp.linspace(0.0, 20.0, 5)
    sol = jax.jit(lambda y0: no.solve(van_der_pol, y0, ts, 1.0, rtol=1e-6, atol=1e-8))(
        jnp.array([2.0, 0.0])
    )
    print("Van der Pol (mu=1) with Dopri5, rtol=1e-6:")
    for t, y in zip(ts, sol.ys, strict=True):
        print(f"  t={float(t):5.1f}  x={float(y[0]): .6f}  v={float(y[1]): .6f}")
    print(f"  stats: { {k: int(v) for k, v in sol.stats.items()} }")
    return 0


#: What `python -m neuralode` needs beyond `import neuralode` (the extra
#: `experiments` in pyproject.toml), by import name.
EXPERIMENT_DEPENDENCIES = ("optax", "tqdm", "matplotlib", "sklearn")


def _missing_experiment_dependencies() -> list[str]:
    return [n for n in EXPERIMENT_DEPENDENCIES if importlib.util.find_spec(n) is None]


def _cache_note() -> str:
    from neuralode.experiments._compilation_cache import (
        CACHE_DIR_VARIABLES,
        default_cache_dir,
    )

    return (
        f"Compiled programs are cached in {default_cache_dir()} (set "
        f"{CACHE_DIR_VARIABLES[0]} to move it); --no-cache turns the cache off."
    )


def _add_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="do not read or write the persistent compilation cache (used by default)",
    )


def _build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The top-level parser and each experiment's subparser (by name)."""
    from neuralode.experiments import EXPERIMENTS, HelpFormatter

    cache_note = _cache_note()
    parser = argparse.ArgumentParser(
        prog="neuralode",
        description="Reproduce the neural ODE paper's demonstrations.",
        epilog="Run `neuralode <command> --help` for an experiment's options. "
        + cache_note,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    subparsers = {}
    for name, module in EXPERIMENTS.items():
        subparsers[name] = sub.add_parser(
            name,
            help=module.HELP,
            description=(module.__doc__ or "").split("\n\n")[0],
            epilog=cache_note,
            formatter_class=HelpFormatter,
        )
        module.add_arguments(subparsers[name])
        _add_cache_argument(subparsers[name])
    demo = sub.add_parser(
        "demo", help="solve the Van der Pol equation and print it", epilog=cache_note
    )
    _add_cache_argument(demo)
    return parser, subparsers


def _parse(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[argparse.Namespace, bool]:
    """The options, without --no-cache (not a setting of the run, so not saved
    in config.json), and whether to use the compilation cache."""
    args = parser.parse_args(argv)
    return args, vars(args).pop("cache")


def _force_host_devices(num: int | None) -> None:
    """Ask XLA for `num` CPU devices; only effective before JAX initialises."""
    if not num or num < 2:
        return
    flag = f"--xla_force_host_platform_device_count={num}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default `sys.argv[1:]`), run the command, return its status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before the experiments (and so JAX) are imported: --devices on CPU needs
    # XLA_FLAGS set before the backend starts.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", type=int, default=None)
    known, _ = pre.parse_known_args(argv)
    _force_host_devices(known.devices)

    missing = _missing_experiment_dependencies()
    if missing:
        print(
            "neuralode: the experiments command needs the 'experiments' extra "
            f"(missing: {', '.join(missing)}): pip install 'neuralode[experiments]'",
            file=sys.stderr,
        )
        return 2
    parser, subparsers = _build_parser()
    args, cache = _parse(parser, argv)
    from neuralode.experiments._compilation_cache import persistent_cache

    # Before anything is compiled; JAX's settings are restored afterwards for
    # callers that go on compiling in the same process.
    with persistent_cache() if cache else contextlib.nullcontext():
        return _run_command(parser, subparsers, args, argv)


def _run_command(
    parser: argparse.ArgumentParser,
    subparsers: dict,
    args: argparse.Namespace,
    argv: list[str],
) -> int:
    """Run the parsed command; `argv` is parsed again with the run's defaults."""
    if args.command == "demo":
        return _demo(args)

    from neuralode.experiments import (
        EXPERIMENTS,
        UsageError,
        option_defaults,
        prepare_run,
    )

    module, subparser = EXPERIMENTS[args.command], subparsers[args.command]
    try:
        # --quick's and a resumed run's settings become the defaults; options
        # given explicitly win. Everything is checked before anything is written.
        subparser.set_defaults(**option_defaults(module, args))
        args, _ = _parse(parser, argv)
        # An experiment may hand some options to another module with defaults
        # of its own (cnf --data digits): those come before --quick's.
        chosen = module.variant(args) if hasattr(module, "variant") else module
        if chosen is not module:
            module = chosen
            subparser.set_defaults(**module.DEFAULTS)
            subparser.set_defaults(**option_defaults(module, args))
            args, _ = _parse(parser, argv)
        ctx = prepare_run(module, args)
    except UsageError as e:
        subparser.error(str(e))
    ctx.start()
    ctx.finish(module.run(ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
