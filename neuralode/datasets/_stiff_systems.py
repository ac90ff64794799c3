"""Classic stiff test problems, as vector fields f(t, y, args) in JAX.

Each `StiffSystem` holds its field, initial value, time span and default
arguments. The definitions follow Hairer & Wanner, *Solving Ordinary
Differential Equations II* (2nd ed., 1996), and the IVP test set of Mazzia &
Magherini (Bari, release 2.4): Robertson's chemical kinetics (II.1), the Van
der Pol oscillator in Liénard-free form with stiffness μ (II.1), HIRES (the
High Irradiance RESponse of plant photomorphogenesis, Schäfer 1975; 8
species) and OREGO (the Oregonator of Field & Noyes 1974).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

#: Robertson's rate constants (k1, k2, k3).
ROBERTSON_RATES = (0.04, 3e7, 1e4)


def robertson(t: ArrayLike, y: Array, args: Array) -> Array:
    """Robertson's kinetics: y1' = -k1 y1 + k3 y2 y3, y2' = k1 y1 - k2 y2² -
    k3 y2 y3, y3' = k2 y2²; `args` holds (k1, k2, k3)."""
    k1, k2, k3 = args[0], args[1], args[2]
    y1, y2, y3 = y[0], y[1], y[2]
    r1, r2, r3 = k1 * y1, k2 * y2 * y2, k3 * y2 * y3
    return jnp.stack([-r1 + r3, r1 - r2 - r3, r2])


def van_der_pol(t: ArrayLike, y: Array, args: Array) -> Array:
    """Van der Pol, y'' − μ(1 − y²)y' + y = 0: y1' = y2, y2' = μ(1 − y1²) y2 − y1
    (MATLAB's vdp1000 for μ = 10³); `args` is μ."""
    mu = args
    return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def hires(t: ArrayLike, y: Array, args: None = None) -> Array:
    """HIRES, 8 reacting species (Hairer & Wanner II, §IV.10)."""
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    r = 280.0 * y6 * y8
    return jnp.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            r - 1.81 * y7,
            -r + 1.81 * y7,
        ]
    )


def orego(t: ArrayLike, y: Array, args: None = None) -> Array:
    """The Oregonator (Hairer & Wanner II, §IV.10): three species, period ≈ 300."""
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack(
        [
            77.27 * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)),
            (y3 - (1 + y1) * y2) / 77.27,
            0.161 * (y1 - y3),
        ]
    )


@dataclasses.dataclass(frozen=True)
class StiffSystem:
    """A stiff initial-value problem: dy/dt = `field`(t, y, `args`), y(`t0`) = `y0`,
    to be solved to `t1`."""

    name: str
    field: Callable
    y0: np.ndarray
    t0: float
    t1: float
    args: object = None


def stiff_system(name: str, *, t1: float | None = None) -> StiffSystem:
    """One of "robertson", "van_der_pol" (μ = 10³, [0, 3000]), "hires",
    "orego", with its standard span (or ending at `t1`).

    Robertson runs to 10⁵ by default (its standard 4·10¹⁰ needs float64).
    Van der Pol with μ = 10³ (MATLAB's vdp1000 span) has period ≈ (3 − 2 ln 2)μ
    ≈ 1614: from y0 = (2, 0) it jumps near t ≈ 807, 1614 and 2421, and ends on
    a slow branch, almost two periods on.
    """
    systems = {
        "robertson": StiffSystem(
            "robertson",
            robertson,
            np.array([1.0, 0.0, 0.0]),
            0.0,
            1e5,
            np.array(ROBERTSON_RATES),
        ),
        "van_der_pol": StiffSystem(
            "van_der_pol", van_der_pol, np.array([2.0, 0.0]), 0.0, 3000.0, 1e3
        ),
        "hires": StiffSystem(
            "hires",
            hires,
            np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057]),
            0.0,
            321.8122,
        ),
        "orego": StiffSystem("orego", orego, np.array([1.0, 2.0, 3.0]), 0.0, 360.0),
    }
    if name not in systems:
        raise ValueError(
            f"neuralode.datasets.stiff_system: unknown system {name!r}; "
            f"choose one of {sorted(systems)}"
        )
    system = systems[name]
    if t1 is not None:
        if not t1 > system.t0:
            raise ValueError(
                f"neuralode.datasets.stiff_system: t1 must exceed t0 = {system.t0}, "
                f"got {t1}"
            )
        system = dataclasses.replace(system, t1=float(t1))
    return system


STIFF_SYSTEM_NAMES = ("robertson", "van_der_pol", "hires", "orego")
"""The names that `stiff_system` accepts."""
