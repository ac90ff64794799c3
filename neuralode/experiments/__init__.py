"""The paper's demonstrations as command-line experiments.

Each experiment module (`spiral`, `digits`, `cnf`) has a `NAME`, a `HELP`
line, `add_arguments(parser)` and `run(ctx) -> metrics`; `python -m neuralode
<name>` trains it with optax under `eqx.filter_jit`, shows a progress bar and
writes `metrics.json`, PNG plots and a checkpoint into the run directory.
"""

from types import ModuleType

from . import cnf as cnf, digits as digits, spiral as spiral
from ._run import Run as Run, start_run as start_run

EXPERIMENTS: dict[str, ModuleType] = {m.NAME: m for m in (spiral, digits, cnf)}
