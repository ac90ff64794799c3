"""Automatic stiffness switching: an explicit method while the problem is
non-stiff, an implicit one while it is stiff, within one solve."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._controller import rms_norm
from ._linear_solve import common_dtype, concat, split
from ._rosenbrock import Rodas5P
from ._solvers import (
    AbstractExplicitRungeKutta,
    AbstractImplicitSolver,
    AbstractSolver,
    StepResult,
    Tsit5,
)
from ._state import FlatField, State, present

_NONSTIFF, _STIFF = 0, 1
_POWER_ITERATIONS = 5


def stability_boundary(solver: AbstractExplicitRungeKutta) -> float:
    """The x > 0 where the method's stability region ends on the negative real
    axis: the first x with |R(−x)| > 1, R(z) = 1 + z bᵀ(I − zA)⁻¹1 (Tsit5 ≈ 3.51,
    Dopri5 ≈ 3.31)."""
    tab = solver.tableau
    s = tab.num_stages
    xs = np.linspace(1e-3, 20, 20000)
    stages = np.linalg.solve(np.eye(s) + xs[:, None, None] * tab.a, np.ones((s, 1)))
    growth = np.abs(1 - xs * (tab.b @ stages[..., 0].T))
    unstable = growth > 1 + 1e-12
    return float(xs[np.argmax(unstable)]) if unstable.any() else float("inf")


class AutoSwitch(AbstractSolver):
    """Switch between an explicit and an implicit method as the problem demands.

    The solve starts with `nonstiff`. Each accepted step estimates h·ρ, ρ the
    spectral radius of ∂f/∂y: the explicit method's stiffness indicator
    (Hairer's, from two stages at t + h), the implicit one's a few power
    iterations on its Jacobian. Hairer's indicator reads low once the stiff
    components have decayed below the tolerance (tight tolerances), so every
    `probe_every`-th explicit step also runs the power iterations (JVPs, about
    a tenth of the explicit method's evaluations) and the larger estimate
    counts. Hysteresis keeps the method from flickering: `stiff_steps`
    consecutive explicit steps with h·ρ above `switch_fraction` of the explicit
    method's stability boundary B (its step size is being limited by
    stability, not accuracy: the error estimate's own stability region ends
    before B, so steps held by stability sit at 0.6–0.9 B) switch to `stiff`;
    `nonstiff_steps` consecutive implicit steps with h·ρ below half that (the
    explicit method would be stable, with room, at the same step) switch back.

    **Arguments:**

    - `nonstiff`: an adaptive explicit Runge–Kutta method with a stiffness
      stage (default `Tsit5()`).
    - `stiff`: `Rodas5P()` (default) or `Kvaerno5()`.
    - `stiff_steps`, `nonstiff_steps`, `switch_fraction`: the hysteresis.
    - `probe_every`: explicit steps between power-iteration probes.

    Reference: the strategy of DifferentialEquations.jl's `AutoTsit5(Rodas5P())`
    (Rackauckas & Nie 2017) and of DOPRI5's stiffness detection (Hairer &
    Wanner II, §IV.2).
    """

    nonstiff: AbstractExplicitRungeKutta = Tsit5()
    stiff: AbstractSolver = Rodas5P()
    stiff_steps: int = eqx.field(default=10, static=True)
    nonstiff_steps: int = eqx.field(default=3, static=True)
    switch_fraction: float = eqx.field(default=0.5, static=True)
    probe_every: int = eqx.field(default=8, static=True)

    def __check_init__(self):
        if not isinstance(self.nonstiff, AbstractExplicitRungeKutta) or not (
            self.nonstiff.adaptive and self.nonstiff.stiffness_stage is not None
        ):
            raise ValueError(
                "AutoSwitch: nonstiff must be an adaptive explicit method with a "
                f"stiffness estimate (Tsit5() or Dopri5()), got {self.nonstiff!r}"
            )
        if not isinstance(self.stiff, AbstractImplicitSolver):
            raise ValueError(
                f"AutoSwitch: stiff must be Rodas5P() or Kvaerno5(), got {self.stiff!r}"
            )
        if self.stiff_steps < 1 or self.nonstiff_steps < 1 or self.probe_every < 1:
            raise ValueError(
                "AutoSwitch: stiff_steps, nonstiff_steps and probe_every must be >= 1"
            )
        if not 0 < self.switch_fraction <= 1:
            raise ValueError(
                f"AutoSwitch: switch_fraction must lie in (0, 1], got "
                f"{self.switch_fraction}"
            )

    @property
    def order(self) -> int:
        return min(self.nonstiff.order, self.stiff.order)

    @property
    def adaptive(self) -> bool:
        return True

    @property
    def error_exponent(self) -> float:
        return min(self.nonstiff.error_exponent, self.stiff.error_exponent)

    @property
    def dense_degree(self) -> int:
        return max(self.nonstiff.dense_degree, self.stiff.dense_degree)

    @property
    def fevals_per_step(self) -> None:
        return None

    @property
    def stiffness_stage(self) -> int | None:
        return self.nonstiff.stiffness_stage

    @property
    def switching(self) -> bool:
        return True

    @property
    def replays_carry(self) -> bool:
        return True

    def init_carry(self, y0: State) -> Array:
        return self.initial_switch_state(jnp.real(y0[0]).dtype)

    def next_carry(
        self,
        carry: Array,
        result: StepResult,
        accept: Array,
        stiffness: Array,
        h: Array,
    ) -> Array:
        """The switch state moves on accepted steps only."""
        return jnp.where(accept, self.next_switch_state(carry, stiffness, h), carry)

    @property
    def threshold_back(self) -> float:
        """h·ρ below which an implicit step could as well be explicit."""
        return 0.5 * self.threshold

    @property
    def threshold(self) -> float:
        """h·ρ above which an explicit step is limited by stability."""
        return self.switch_fraction * stability_boundary(self.nonstiff)

    def initial_switch_state(self, dtype) -> Array:
        """[method in use, consecutive steps voting to switch, steps since the
        last probe, the probe's ρ] (floats of the state's real dtype)."""
        return jnp.array([_NONSTIFF, 0, 0, 0], dtype)

    def next_switch_state(self, state: Array, stiffness: Array, h: Array) -> Array:
        """The switch state after an accepted step of size h with h·ρ̂ = `stiffness`."""
        mode, count, age, rho = state[0], state[1], state[2], state[3]
        h = jnp.abs(h).astype(state.dtype)
        stiffness = jnp.where(jnp.isfinite(stiffness), stiffness, 0).astype(state.dtype)
        stiff_now = mode == _STIFF
        probed = ~stiff_now & (age == 0)
        rho = jnp.where(probed, stiffness / jnp.maximum(h, 1e-300), rho)
        estimate = jnp.where(stiff_now, stiffness, jnp.maximum(stiffness, h * rho))
        votes = jnp.where(
            stiff_now, estimate < self.threshold_back, estimate > self.threshold
        )
        count = jnp.where(votes, count + 1, 0)
        needed = jnp.where(stiff_now, self.nonstiff_steps, self.stiff_steps)
        switch = count >= needed
        mode = jnp.where(switch, 1 - mode, mode)
        age = jnp.where(switch, 0, jnp.remainder(age + 1, self.probe_every))
        rho = jnp.where(switch, 0, rho)
        return jnp.stack([mode, jnp.where(switch, 0, count), age, rho])

    def step(
        self,
        f: FlatField,
        t: Array,
        y: State,
        f0: State,
        h: Array,
        dense: bool = True,
        tolerances: tuple[float, float] = (1e-6, 1e-8),
        carry: Array | None = None,
    ) -> StepResult:
        """One step of the method the switch state `carry` selects (its entry 0:
        0 explicit, 1 implicit; see `initial_switch_state`)."""
        if carry is None:
            raise ValueError("AutoSwitch.step needs the switch state of the solve")
        mode = carry
        degree = self.dense_degree

        def padded(result: StepResult, fevals: Array, jacobians: Array) -> StepResult:
            coeffs = result.dense
            if coeffs is not None:
                coeffs = tuple(
                    jnp.concatenate(
                        [c, jnp.zeros((degree - c.shape[0],) + c.shape[1:], c.dtype)]
                    )
                    for c in coeffs
                )
            converged = result.converged
            if converged is None:
                converged = jnp.ones((), bool)
            return result._replace(
                dense=coeffs, converged=converged, cost=(fevals, jacobians), carry=carry
            )

        def explicit():
            result = self.nonstiff.step(f, t, y, f0, h, dense, tolerances)
            fevals = jnp.asarray(self.nonstiff.fevals_per_step, jnp.int32)
            return padded(result, fevals, jnp.zeros((), jnp.int32))

        def probed():
            result = explicit()
            pair = _power_pair(f, t, y)
            cost = present(result.cost)  # padded() sets it
            fevals = cost[0] + _POWER_ITERATIONS + 1
            return result._replace(stiffness_pair=pair, cost=(fevals, cost[1]))

        def implicit():
            result = self.stiff.step(f, t, y, f0, h, dense, tolerances)
            if result.cost is None:
                cost = (self.stiff.fevals_per_step, self.stiff.jacobians_per_step)
            else:
                cost = result.cost
            fevals, jacobians = (jnp.asarray(c, jnp.int32) for c in cost)
            pair = _power_pair(f, t, y)
            return padded(result._replace(stiffness_pair=pair), fevals, jacobians)

        branch = jnp.where(mode[0] == _STIFF, 2, jnp.where(mode[2] == 0, 1, 0))
        return lax.switch(branch, [explicit, probed, implicit])


def _power_pair(f: FlatField, t: Array, y: State) -> tuple[State, State]:
    """(J v, v) for v from a few power iterations on J = ∂f/∂y(t, y), so that
    ‖Jv‖/‖v‖ estimates the spectral radius (as the explicit methods' stiffness
    pair does). JVPs only; the start has components in every direction."""
    dtype = common_dtype(y)
    x0 = concat(y, dtype)
    _, jvp = jax.linearize(lambda x: concat(f(t, split(x, y)), dtype), x0)
    real = jnp.real(x0).dtype
    v = (1.0 + jnp.cos(1.7 * jnp.arange(x0.size, dtype=real))).astype(dtype)

    def body(_, v):
        w = jvp(v)
        scale = jnp.maximum(rms_norm((w,)), jnp.finfo(real).tiny).astype(dtype)
        return jnp.where(jnp.all(jnp.isfinite(w)), w / scale, v)

    v = lax.fori_loop(0, _POWER_ITERATIONS, body, v)
    return split(jvp(v), y), split(v, y)
