"""neuralode: neural ordinary differential equations in JAX."""

import importlib.metadata

from . import cnf as cnf, datasets as datasets, nn as nn, parallel as parallel
from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    BacksolveAdjoint as BacksolveAdjoint,
    ForwardMode as ForwardMode,
)
from ._auto_switch import AutoSwitch as AutoSwitch
from ._checkpoint_adjoint import CheckpointAdjoint as CheckpointAdjoint
from ._controller import (
    AbstractController as AbstractController,
    ConstantStepSize as ConstantStepSize,
    Decision as Decision,
    PIController as PIController,
    StepOutcome as StepOutcome,
)
from ._esdirk import Kvaerno5 as Kvaerno5
from ._event import Event as Event
from ._failure import (
    SolveError as SolveError,
    reraise_failures as reraise_failures,
)
from ._hybrid import HybridSolution as HybridSolution, solve_hybrid as solve_hybrid
from ._interpolating_adjoint import InterpolatingAdjoint as InterpolatingAdjoint
from ._neural_ode import NeuralODE as NeuralODE
from ._reversible_adjoint import ReversibleAdjoint as ReversibleAdjoint
from ._rosenbrock import Rodas5P as Rodas5P
from ._solution import RESULTS as RESULTS, Solution as Solution
from ._solve import (
    backward_stats as backward_stats,
    odeint as odeint,
    solve as solve,
)
from ._solvers import (
    RK4 as RK4,
    AbstractSolver as AbstractSolver,
    Bosh3 as Bosh3,
    Dopri5 as Dopri5,
    Euler as Euler,
    Fehlberg45 as Fehlberg45,
    Midpoint as Midpoint,
    Tsit5 as Tsit5,
)
from ._tableaus import ButcherTableau as ButcherTableau
from .cnf import CNF as CNF


def _source_version() -> str:
    """The version in the pyproject.toml of a source checkout that is not
    installed (only on `sys.path`), or "0+unknown" without one."""
    import re
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    project = re.search(r"^\[project\]$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if project is None or not re.search(r'^name = "neuralode"$', project[1], re.M):
        return "0+unknown"
    version = re.search(r'^version = "([^"]+)"$', project[1], re.M)
    return version[1] if version else "0+unknown"


try:
    __version__ = importlib.metadata.version("neuralode")
except importlib.metadata.PackageNotFoundError:  # a source checkout, not installed
    __version__ = _source_version()
