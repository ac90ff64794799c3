"""Butcher tableaus of the explicit Runge–Kutta methods, held as frozen data.

A tableau of an s-stage explicit method is (c, A, b) with stage k_i =
f(t + c_i h, y + h Σ_j a_ij k_j) and the step y_1 = y_0 + h Σ_i b_i k_i. An
embedded pair adds error weights e = b - b̂ so that h Σ_i e_i k_i estimates the
local error. Dense output is a polynomial y(t_0 + θh) = y_0 + h Σ_i w_i(θ) k_i,
stored as the coefficient matrix ``dense[i, p]`` of θ^(p+1) in w_i(θ).

Every tableau is checked at import: rows of A sum to c, Σ b = 1, Σ e = 0, and
the dense weights reproduce b at θ = 1. First-same-as-last (FSAL) is derived
from the numbers: the last stage is evaluated at (t_1, y_1).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction as F

import numpy as np


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit (embedded) Runge–Kutta method.

    **Arguments:**

    - `c`, `a`, `b`: the nodes, the strictly lower-triangular stage matrix and
      the weights.
    - `b_error`: `b - b̂` for an embedded pair, or None for a fixed-step method.
    - `order`: the order of the propagated solution.
    - `error_order`: the order of the embedded solution (None without one).
    - `dense`: (stages, degree) coefficients of the dense-output weights, or
      None for a method without a continuous extension (its solver then
      interpolates by Hermite cubics, or linearly for Euler).
    """

    c: np.ndarray
    a: np.ndarray
    b: np.ndarray
    b_error: np.ndarray | None
    order: int
    error_order: int | None
    dense: np.ndarray | None = None

    def __post_init__(self):
        s = len(self.c)
        checks = [
            (
                self.a.shape == (s, s) and self.b.shape == (s,),
                f"a must be ({s}, {s}) and b ({s},) for {s} nodes c",
            ),
            (np.allclose(np.tril(self.a, -1), self.a), "a must be strictly lower"),
            (np.allclose(self.a.sum(axis=1), self.c, atol=1e-14), "rows of a != c"),
            (abs(self.b.sum() - 1.0) < 1e-14, "sum(b) != 1"),
            (
                self.b_error is None or abs(self.b_error.sum()) < 1e-14,
                "sum(b_error) != 0",
            ),
            (
                self.dense is None
                or (
                    self.dense.shape[0] == s
                    and np.allclose(self.dense.sum(axis=1), self.b, atol=1e-12)
                ),
                "dense output at theta=1 does not reproduce b",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ButcherTableau: {message}")

    @property
    def num_stages(self) -> int:
        return len(self.c)

    @property
    def fsal(self) -> bool:
        """Whether the last stage is f(t_1, y_1): c_s = 1 and row s of A is b."""
        return bool(self.c[-1] == 1.0 and np.array_equal(self.a[-1], self.b))

    @property
    def adaptive(self) -> bool:
        return self.b_error is not None


def _frac(rows) -> np.ndarray:
    return np.array([[float(F(x)) for x in row] for row in rows], dtype=np.float64)


def _lower(rows: list[list[str | float]], s: int) -> np.ndarray:
    a = np.zeros((s, s))
    for i, row in enumerate(rows, start=1):
        a[i, : len(row)] = [float(F(x)) if isinstance(x, str) else x for x in row]
    return a


def _poly_mul(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.convolve(p, q)


def _dopri5_dense(b: np.ndarray) -> np.ndarray:
    """Hairer's 4th-order continuous extension of DOPRI5 as stage weights.

    y(θ) = y0 + θ[Δ + (1-θ)(h k1 - Δ + θ(2Δ - h(k1 + k7) + (1-θ) h Σ d_i k_i))]
    with Δ = y1 - y0 = h Σ b_i k_i (Hairer, Nørsett & Wanner, "Solving ODEs I",
    II.6, and the code DOPRI5).
    """
    d = np.array(
        [
            F(-12715105075, 11282082432),
            0,
            F(87487479700, 32700410799),
            F(-10690763975, 1880347072),
            F(701980252875, 199316789632),
            F(-1453857185, 822651844),
            F(69997945, 29380423),
        ],
        dtype=np.float64,
    )
    e1 = np.eye(7)[0]
    e7 = np.eye(7)[6]
    r2 = b
    r3 = e1 - b
    r4 = b - e7 - r3
    r5 = d
    # Polynomials in θ with coefficients indexed by power (lowest first).
    one_minus = np.array([1.0, -1.0])
    theta = np.array([0.0, 1.0])
    basis = [
        theta,
        _poly_mul(theta, one_minus),
        _poly_mul(_poly_mul(theta, theta), one_minus),
        _poly_mul(_poly_mul(theta, theta), _poly_mul(one_minus, one_minus)),
    ]
    weights = np.zeros((7, 5))
    for r, poly in zip((r2, r3, r4, r5), basis, strict=True):
        padded = np.zeros(5)
        padded[: len(poly)] = poly
        weights += np.outer(r, padded)
    assert np.allclose(weights[:, 0], 0.0)
    return weights[:, 1:]


def _roots_poly(scale: float, roots: list[float], extra_theta_power: int) -> np.ndarray:
    """Coefficients (θ^1 .. θ^4) of scale · θ^k · Π (θ - r)."""
    poly = np.array([scale])
    for r in roots:
        poly = _poly_mul(poly, np.array([-r, 1.0]))
    poly = np.concatenate([np.zeros(extra_theta_power), poly])
    out = np.zeros(5)
    out[: len(poly)] = poly
    assert out[0] == 0.0
    return out[1:]


def _tsit5_dense() -> np.ndarray:
    """Tsitouras' (2011) free 4th-order interpolant, b_i(θ) in factored form."""

    def quad(scale, p, q, extra, linear_roots=()):
        poly = np.array([scale])
        poly = _poly_mul(poly, np.array([q, p, 1.0]))
        for r in linear_roots:
            poly = _poly_mul(poly, np.array([-r, 1.0]))
        poly = np.concatenate([np.zeros(extra), poly])
        out = np.zeros(5)
        out[: len(poly)] = poly
        return out[1:]

    rows = [
        quad(
            -1.0530884977290216,
            -1.4364028541716351,
            0.7139816917074209,
            1,
            (1.3299890189751412,),
        ),
        quad(0.1017, -2.1966568338249754, 1.2949852507374631, 2),
        quad(2.490627285651252793, -2.38535645472061657, 1.57803468208092486, 2),
        _roots_poly(
            -16.54810288924490272, [1.21712927295533244, 0.61620406037800089], 2
        ),
        _roots_poly(
            47.37952196281928122, [1.203071208372362603, 0.658047292653547382], 2
        ),
        _roots_poly(-34.87065786149660974, [1.2, 0.666666666666666667], 2),
        _roots_poly(2.5, [1.0, 0.6], 2),
    ]
    return np.stack(rows)


# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae".
_DOPRI5_B = _frac([["35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0]])[0]
_DOPRI5_BHAT = _frac(
    [["5179/57600", 0, "7571/16695", "393/640", "-92097/339200", "187/2100", "1/40"]]
)[0]
DOPRI5 = ButcherTableau(
    c=_frac([[0, "1/5", "3/10", "4/5", "8/9", 1, 1]])[0],
    a=_lower(
        [
            ["1/5"],
            ["3/40", "9/40"],
            ["44/45", "-56/15", "32/9"],
            ["19372/6561", "-25360/2187", "64448/6561", "-212/729"],
            ["9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"],
            ["35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84"],
        ],
        7,
    ),
    b=_DOPRI5_B,
    b_error=_DOPRI5_B - _DOPRI5_BHAT,
    order=5,
    error_order=4,
    dense=_dopri5_dense(_DOPRI5_B),
)

# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first
# column simplifying assumption", Comput. Math. Appl. 62, 770-775.
_TSIT5_B_PUBLISHED = np.array(
    [
        0.09646076681806523,
        0.01,
        0.4798896504144996,
        1.379008574103742,
        -3.290069515436081,
        2.324710524099774,
        0.0,
    ]
)
# Normalised so that sum(b) == 1 to rounding (the published digits give 1 - 4e-16).
_TSIT5_B = _TSIT5_B_PUBLISHED / _TSIT5_B_PUBLISHED.sum()
_TSIT5_B_ERROR = np.array(
    [
        -0.00178001105222577714,
        -0.0008164344596567469,
        0.007880878010261995,
        -0.1447110071732629,
        0.5823571654525552,
        -0.45808210592918697,
        1.0 / 66.0,
    ]
)
_TSIT5_C = np.array([0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0])
_TSIT5_A = _lower(
    [
        [0.161],
        [-0.008480655492356989, 0.335480655492357],
        [2.897153057105493, -6.359448489975075, 4.3622954328695815],
        [
            5.325864828439257,
            -11.748883564062828,
            7.4955393428898365,
            -0.09249506636175525,
        ],
        [
            5.86145544294642,
            -12.92096931784711,
            8.159367898576159,
            -0.071584973281401,
            -0.028269050394068383,
        ],
        list(_TSIT5_B[:6]),
    ],
    7,
)
# The published c are rounded; the rows of A define the method, so take c from
# them (they agree to ~1e-15).
TSIT5 = ButcherTableau(
    c=np.where(_TSIT5_C == 1.0, 1.0, _TSIT5_A.sum(axis=1)),
    a=_TSIT5_A,
    b=_TSIT5_B,
    b_error=_TSIT5_B_ERROR - _TSIT5_B_ERROR.sum() / 7,
    order=5,
    error_order=4,
    dense=_tsit5_dense(),
)

# Bogacki & Shampine (1989), "A 3(2) pair of Runge-Kutta formulas".
_BOSH3_B = _frac([["2/9", "1/3", "4/9", 0]])[0]
BOSH3 = ButcherTableau(
    c=_frac([[0, "1/2", "3/4", 1]])[0],
    a=_lower([["1/2"], [0, "3/4"], ["2/9", "1/3", "4/9"]], 4),
    b=_BOSH3_B,
    b_error=_BOSH3_B - _frac([["7/24", "1/4", "1/3", "1/8"]])[0],
    order=3,
    error_order=2,
)

# Fehlberg (1969), NASA TR R-315: the 4th-order solution is propagated and the
# 5th-order one estimates its error.
_RKF_B4 = _frac([["25/216", 0, "1408/2565", "2197/4104", "-1/5", 0]])[0]
_RKF_B5 = _frac([["16/135", 0, "6656/12825", "28561/56430", "-9/50", "2/55"]])[0]
FEHLBERG45 = ButcherTableau(
    c=_frac([[0, "1/4", "3/8", "12/13", 1, "1/2"]])[0],
    a=_lower(
        [
            ["1/4"],
            ["3/32", "9/32"],
            ["1932/2197", "-7200/2197", "7296/2197"],
            ["439/216", -8, "3680/513", "-845/4104"],
            ["-8/27", 2, "-3544/2565", "1859/4104", "-11/40"],
        ],
        6,
    ),
    b=_RKF_B4,
    b_error=_RKF_B4 - _RKF_B5,
    order=4,
    error_order=5,
)

EULER = ButcherTableau(
    c=np.zeros(1),
    a=np.zeros((1, 1)),
    b=np.ones(1),
    b_error=None,
    order=1,
    error_order=None,
)

MIDPOINT = ButcherTableau(
    c=np.array([0.0, 0.5]),
    a=np.array([[0.0, 0.0], [0.5, 0.0]]),
    b=np.array([0.0, 1.0]),
    b_error=None,
    order=2,
    error_order=None,
)

# Kutta (1901): the classical fourth-order method.
RK4 = ButcherTableau(
    c=np.array([0.0, 0.5, 0.5, 1.0]),
    a=_lower([[0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], 4),
    b=_frac([["1/6", "1/3", "1/3", "1/6"]])[0],
    b_error=None,
    order=4,
    error_order=None,
)
