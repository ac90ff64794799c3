"""The paper's demonstrations as command-line experiments.

Each experiment module (`spiral`, `digits`, `cnf`, `stiff`, `latent`) has a
`NAME`, a `HELP` line, the default `STEPS`, the `QUICK` defaults of `--quick`,
`add_arguments(parser)`, `configure(args)` (derived settings and checks),
`build(args, key) -> (model, optimiser)` and `run(ctx) -> metrics`;
`python -m neuralode <name>` trains it with optax under `eqx.filter_jit`,
shows a progress bar and writes `metrics.json`, `history.json`, PNG plots and
a checkpoint into the run directory.

An experiment may also have `variant(args)`, naming the module that runs
these options: `cnf --data digits` is run by `digits_density`, which shares
cnf's options and `NAME` but has `DEFAULTS` (and `QUICK`) of its own.
"""

from types import ModuleType

from . import (
    cnf as cnf,
    digits as digits,
    latent as latent,
    spiral as spiral,
    stiff as stiff,
)
from ._output import UsageError as UsageError
from ._run import (
    HelpFormatter as HelpFormatter,
    Run as Run,
    option_defaults as option_defaults,
    prepare_run as prepare_run,
)

EXPERIMENTS: dict[str, ModuleType] = {
    m.NAME: m for m in (spiral, digits, cnf, stiff, latent)
}
