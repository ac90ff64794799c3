"""The solver interface, and the explicit Runge–Kutta solvers: one generic step
driven by a Butcher tableau. The implicit methods are in `_rosenbrock`,
`_esdirk` and `_auto_switch`."""

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax.numpy as jnp
from equinox import AbstractClassVar
from jaxtyping import Array

from . import _interpolation as interp, _tableaus as tableaus
from ._linear_solve import LinearSolver
from ._state import FlatField, State, present
from ._tableaus import ButcherTableau


class StepResult(NamedTuple):
    """One trial step from (t, y) to (t + h, y1).

    `y_error` is the local error estimate (zeros for fixed-step methods),
    `f1` = f(t + h, y1), `dense` the interpolation coefficients (see
    `_interpolation.evaluate`), `stiffness_pair` the differences
    (f(y1) - k_p, y1 - Y_p) whose norms' ratio estimates the Lipschitz constant
    (see `AbstractSolver.stiffness_stage`), or None.
    """

    y1: State
    y_error: State
    f1: State
    dense: State | None
    stiffness_pair: tuple[State, State] | None = None
    # Implicit methods: whether the step's nonlinear (Newton) solves converged;
    # a step that did not is rejected and retried smaller.
    converged: Array | None = None
    # Methods of varying cost (see `AbstractSolver.fevals_per_step`): the
    # (vector-field, Jacobian) evaluations this attempt made.
    cost: tuple[Array, Array] | None = None
    # A method that carries state from step to step: its state after this
    # attempt (see `AbstractSolver.init_carry`).
    carry: Any = None


def _combine_leaf(y: Array, h: Array, weights, stages: list[Array]) -> Array:
    terms = [float(w) * k for w, k in zip(weights, stages, strict=False) if w != 0.0]
    if not terms:
        return y
    return y + h * sum(terms[1:], terms[0])


def _combine(y: State, h: Array, weights, stages: list[State]) -> State:
    """y + h Σ_j w_j k_j for every leaf, skipping zero weights so that XLA fuses
    one expression per leaf."""
    return tuple(
        _combine_leaf(leaf, h, weights, [k[i] for k in stages])
        for i, leaf in enumerate(y)
    )


def runge_kutta_step(
    tableau: ButcherTableau, f: FlatField, t: Array, y: State, f0: State, h: Array
) -> tuple[State, State, State, list[State]]:
    """The generic explicit RK step: stages k_i = f(t + c_i h, y + h Σ a_ij k_j).

    `f0 = f(t, y)` is passed in (from the previous step's `f1`), so an FSAL method
    costs s-1 evaluations per step and any other s (its last being f(t+h, y1)).

    **Returns:** `(y1, y_error, f1, stages)`.
    """
    h_y = h.astype(jnp.real(y[0]).dtype)
    stages = [f0]
    stage_input = y
    for i in range(1, tableau.num_stages):
        stage_input = _combine(y, h_y, tableau.a[i, :i], stages)
        stages.append(f(t + float(tableau.c[i]) * h, stage_input))
    if tableau.fsal:
        y1, f1 = stage_input, stages[-1]
    else:
        y1 = _combine(y, h_y, tableau.b, stages)
        f1 = f(t + h, y1)
    zeros = tuple(jnp.zeros_like(leaf) for leaf in y)
    if tableau.b_error is None:
        y_error = zeros
    else:
        y_error = _combine(zeros, h_y, tableau.b_error, stages)
    return y1, y_error, f1, stages


class AbstractSolver(eqx.Module):
    """A one-step method: what the integration loop asks of every solver.

    `step` takes one trial step; the properties tell the loop how to control
    and account for it. Subclasses: `AbstractExplicitRungeKutta` (the explicit
    tableaus), `Rodas5P`, `Kvaerno5`, `AutoSwitch`.
    """

    @property
    @abc.abstractmethod
    def order(self) -> int: ...

    @property
    @abc.abstractmethod
    def adaptive(self) -> bool:
        """Whether the method has an error estimate (else it needs `dt0`)."""

    @property
    @abc.abstractmethod
    def error_exponent(self) -> float:
        """1/q with q = (order of the error estimate) + 1, for step control."""

    @property
    @abc.abstractmethod
    def dense_degree(self) -> int:
        """The number of coefficient vectors of the step's interpolant."""

    @property
    @abc.abstractmethod
    def fevals_per_step(self) -> int | None:
        """Vector-field evaluations per step (not counting Jacobians), or None
        for a method whose steps vary in cost and report it (`StepResult.cost`)."""

    @property
    def jacobians_per_step(self) -> int:
        """Jacobian evaluations ∂f/∂y per step (when `fevals_per_step` is fixed)."""
        return 0

    @property
    def stiffness_stage(self) -> int | None:
        """A stage whose difference from f(y1) estimates h·|λ| (see
        `AbstractExplicitRungeKutta`), or None."""
        return None

    def init_carry(self, y0: State) -> Any:
        """The state the method carries from step to step (a Jacobian to reuse,
        the method in use), or None for a method that carries none. A method
        with a carry receives it as `step(..., carry=...)`."""
        return None

    def next_carry(
        self, carry: Any, result: StepResult, accept: Array, stiffness: Array, h: Array
    ) -> Any:
        """The carry after an attempt (accepted or not) with estimate h·ρ̂ =
        `stiffness` (NaN unless the loop estimates it)."""
        return result.carry

    @property
    def replays_carry(self) -> bool:
        """Whether a replayed step (CheckpointAdjoint) needs the carry it was
        taken with (else it is replayed without one)."""
        return False

    @abc.abstractmethod
    def step(
        self,
        f: FlatField,
        t: Array,
        y: State,
        f0: State,
        h: Array,
        dense: bool = True,
        tolerances: tuple[float, float] = (1e-6, 1e-8),
    ) -> StepResult:
        """Take one trial step of size h from (t, y) with f0 = f(t, y).

        `tolerances` = (rtol, atol) of the solve, for methods that iterate
        (their nonlinear solves converge to a fraction of it).
        """


class AbstractImplicitSolver(AbstractSolver):
    """An implicit method of order 5 with an order-4 error estimate, solving
    with I − hγJ: `Rodas5P`, `Kvaerno5`.

    `linear_solver` chooses the solves (see `_linear_solve`): `"dense"` (jacfwd
    + LU), `"matrix_free"` (JVPs + GMRES), or `"auto"`: dense up to
    `DENSE_LIMIT` unknowns. One Jacobian (at most) per step.
    """

    linear_solver: eqx.AbstractVar[LinearSolver]
    tableau: AbstractClassVar[Any]

    def __check_init__(self):
        if self.linear_solver not in ("auto", "dense", "matrix_free"):
            raise ValueError(
                f"{type(self).__name__}: linear_solver must be 'auto', 'dense' or "
                f"'matrix_free', got {self.linear_solver!r}"
            )

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def adaptive(self) -> bool:
        return True

    @property
    def error_exponent(self) -> float:
        return 1.0 / (min(self.tableau.order, self.tableau.error_order) + 1)

    @property
    def jacobians_per_step(self) -> int:
        return 1


class AbstractExplicitRungeKutta(AbstractSolver):
    """An explicit Runge–Kutta method: a tableau and an interpolant.

    Subclasses set the class variables `tableau` and `interpolation`
    (`"polynomial"` uses the tableau's continuous extension, `"hermite"` the
    cubic Hermite interpolant, `"linear"` straight lines).
    """

    tableau: AbstractClassVar[ButcherTableau]
    interpolation: AbstractClassVar[str]

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def adaptive(self) -> bool:
        return self.tableau.adaptive

    @property
    def error_exponent(self) -> float:
        """1/q with q = (order of the error estimate) + 1, for step control."""
        orders = [self.tableau.order]
        if self.tableau.error_order is not None:
            orders.append(self.tableau.error_order)
        return 1.0 / (min(orders) + 1)

    @property
    def dense_degree(self) -> int:
        """The number of coefficient vectors of the step's interpolant."""
        if self.interpolation == "polynomial":  # its tableau has a dense matrix
            return present(self.tableau.dense).shape[1]
        return 3 if self.interpolation == "hermite" else 1

    @property
    def fevals_per_step(self) -> int:
        return self.tableau.num_stages - 1 + (0 if self.tableau.fsal else 1)

    def step(
        self,
        f: FlatField,
        t: Array,
        y: State,
        f0: State,
        h: Array,
        dense: bool = True,
        tolerances: tuple[float, float] = (1e-6, 1e-8),
    ) -> StepResult:
        """Take one trial step of size h from (t, y) with f0 = f(t, y).

        With `dense=False` the interpolation coefficients are not computed
        (`StepResult.dense` is None): a solve with no output inside its span
        never reads them.
        """
        y1, y_error, f1, stages = runge_kutta_step(self.tableau, f, t, y, f0, h)
        h_y = h.astype(jnp.real(y[0]).dtype)
        pair = self._stiffness_pair(y, h_y, stages, y1, f1)
        if not dense:
            return StepResult(y1, y_error, f1, None, pair)
        coefficients = []
        for i, leaf in enumerate(y):
            if self.interpolation == "polynomial":
                coeffs = interp.polynomial_coefficients(
                    present(self.tableau.dense), [k[i] for k in stages], h_y
                )
            elif self.interpolation == "hermite":
                coeffs = interp.hermite_coefficients(leaf, y1[i], f0[i], f1[i], h_y)
            else:
                coeffs = interp.linear_coefficients(leaf, y1[i])
            coefficients.append(coeffs)
        return StepResult(y1, y_error, f1, tuple(coefficients), pair)

    @property
    def stiffness_stage(self) -> int | None:
        """A stage evaluated at t + h like f(y1), at a different point; or None.

        Dopri5 and Tsit5 (c = 1 twice), RK4 and Fehlberg45 (a stage at c = 1
        besides the final f(y1)) have one; Bosh3, Midpoint and Euler do not.
        """
        tableau = self.tableau
        last = tableau.num_stages - (2 if tableau.fsal else 1)
        for p in range(last, -1, -1):
            if float(tableau.c[p]) == 1.0:
                return p
        return None

    def _stiffness_pair(self, y, h_y, stages, y1, f1) -> tuple[State, State] | None:
        """(f(y1) - k_p, y1 - Y_p) for `stiffness_stage` p, or None.

        The ratio of their norms is Hairer's stiffness indicator of DOPRI5
        (Hairer & Wanner, Solving ODEs II, IV.2): both points lie at t + h, so
        they differ mostly along the fastest modes, and h times the ratio
        approaches the stability boundary (~3.3 for Dopri5) when a problem is
        stiff. Free: no extra evaluation, and XLA shares Y_p with the step's own.
        """
        tableau, p = self.tableau, self.stiffness_stage
        if p is None:
            return None
        y_p = y if p == 0 else _combine(y, h_y, tableau.a[p, :p], stages[:p])
        df = tuple(a - b for a, b in zip(f1, stages[p], strict=True))
        dy = tuple(a - b for a, b in zip(y1, y_p, strict=True))
        return df, dy


class Dopri5(AbstractExplicitRungeKutta):
    """Dormand–Prince 5(4), FSAL, with Hairer's 4th-order dense output.

    The default solver (MATLAB's ode45, scipy's RK45). Dormand & Prince (1980),
    J. Comput. Appl. Math. 6, 19–26.
    """

    tableau: ClassVar[ButcherTableau] = tableaus.DOPRI5
    interpolation: ClassVar[str] = "polynomial"


class Tsit5(AbstractExplicitRungeKutta):
    """Tsitouras 5(4), FSAL, with its own 4th-order interpolant.

    Tsitouras (2011), Comput. Math. Appl. 62, 770–775.
    """

    tableau: ClassVar[ButcherTableau] = tableaus.TSIT5
    interpolation: ClassVar[str] = "polynomial"


class Bosh3(AbstractExplicitRungeKutta):
    """Bogacki–Shampine 3(2), FSAL, with Hermite cubic dense output.

    Bogacki & Shampine (1989), Appl. Math. Lett. 2, 321–325.
    """

    tableau: ClassVar[ButcherTableau] = tableaus.BOSH3
    interpolation: ClassVar[str] = "hermite"


class Fehlberg45(AbstractExplicitRungeKutta):
    """Runge–Kutta–Fehlberg 4(5) (4th order propagated), Hermite dense output.

    Fehlberg (1969), NASA Technical Report R-315.
    """

    tableau: ClassVar[ButcherTableau] = tableaus.FEHLBERG45
    interpolation: ClassVar[str] = "hermite"


class Euler(AbstractExplicitRungeKutta):
    """Explicit Euler, order 1, fixed step (needs `dt0`), linear dense output."""

    tableau: ClassVar[ButcherTableau] = tableaus.EULER
    interpolation: ClassVar[str] = "linear"


class Midpoint(AbstractExplicitRungeKutta):
    """Explicit midpoint rule, order 2, fixed step (needs `dt0`), Hermite output."""

    tableau: ClassVar[ButcherTableau] = tableaus.MIDPOINT
    interpolation: ClassVar[str] = "hermite"


class RK4(AbstractExplicitRungeKutta):
    """The classical Runge–Kutta method, order 4, fixed step (needs `dt0`)."""

    tableau: ClassVar[ButcherTableau] = tableaus.RK4
    interpolation: ClassVar[str] = "hermite"
