"""Coefficients of the implicit methods, held as frozen data and checked at import.

**Rosenbrock (Rosenbrock–Wanner) methods** are stored in the transformed form
that is implemented (Hairer & Wanner, *Solving ODEs II*, §IV.7, eq. (7.4')):
with W = I/(hγ) − J, J = ∂f/∂y(t, y),

    W k_i = f(t + c_i h, y + Σ_{j<i} a_ij k_j) + Σ_{j<i} (C_ij / h) k_j + h d_i ∂f/∂t,
    y_1 = y + Σ_i m_i k_i,

which needs one LU of W per step and no Newton iterations. The classical
coefficients (α, Γ, b) of the method k̃_i = h f(y + Σ α_ij k̃_j) + h J Σ Γ_ij k̃_j
follow as Γ = (I/γ − C)⁻¹, α = a Γ, b = m Γ; the order conditions are checked
on those (tests), and at import that the nodes c are the row sums of α and the
d_i those of Γ (so the stored numbers are consistent with each other).

**ESDIRK methods** (explicit first stage, singly diagonally implicit) are a
Butcher tableau with a lower-triangular `a` whose diagonal is γ from the second
stage on; stiffly accurate when the last row of `a` is `b`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _check(checks: list[tuple[bool, str]], kind: str) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{kind}: {message}")


@dataclasses.dataclass(frozen=True)
class RosenbrockTableau:
    """A Rosenbrock method in transformed form, with dense output.

    **Arguments:**

    - `gamma`: the diagonal γ.
    - `a`, `C`: the strictly lower-triangular (s, s) stage matrices.
    - `c`, `d`: the nodes and the time-derivative weights.
    - `m`: the solution weights; `m_error` the error weights (the error
      estimate is Σ m_error_i k_i).
    - `H`: (q, s) dense-output weights: K_j = Σ_i H_ji k_i and y(t + θh) =
      (1 − θ) y + θ (y_1 + (1 − θ)(K_1 + θ (K_2 + θ K_3 + …))).
    - `order`, `error_order`: of the solution and of the embedded one.
    """

    gamma: float
    a: np.ndarray
    C: np.ndarray
    c: np.ndarray
    d: np.ndarray
    m: np.ndarray
    m_error: np.ndarray
    H: np.ndarray
    order: int
    error_order: int

    def __post_init__(self):
        s = len(self.c)
        gamma_matrix, alpha, _ = self.classical
        _check(
            [
                (self.a.shape == (s, s) and self.C.shape == (s, s), "a, C not (s, s)"),
                (np.allclose(np.tril(self.a, -1), self.a), "a must be strictly lower"),
                (np.allclose(np.tril(self.C, -1), self.C), "C must be strictly lower"),
                (np.allclose(alpha.sum(axis=1), self.c, atol=1e-10), "c != rows of α"),
                (
                    np.allclose(gamma_matrix.sum(axis=1), self.d, atol=1e-10),
                    "d != rows of Γ",
                ),
                (abs(self.classical[2].sum() - 1) < 1e-10, "Σ b != 1"),
                (self.H.shape[1] == s, "H must have s columns"),
            ],
            "RosenbrockTableau",
        )

    @property
    def num_stages(self) -> int:
        return len(self.c)

    @property
    def classical(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Γ, α, b) of the untransformed method (Γ with γ on its diagonal)."""
        s = self.num_stages
        gamma_matrix = np.linalg.inv(np.eye(s) / self.gamma - self.C)
        return gamma_matrix, self.a @ gamma_matrix, self.m @ gamma_matrix

    @property
    def dense_coefficients(self) -> np.ndarray:
        """(s, q + 1) weights P with y(t + θh) = y + Σ_p θ^(p+1) Σ_i P_ip k_i.

        Expanding the interpolant: θ(y_1 − y) + θ(1 − θ)(K_1 + θK_2 + … + θ^(q−1)K_q)
        with y_1 − y = Σ m_i k_i, so the θ^1 weight is m + H_1, θ^p (1 < p ≤ q)
        is H_p − H_(p−1), and θ^(q+1) is −H_q.
        """
        H = self.H
        q = H.shape[0]
        columns = [self.m + H[0]]
        columns += [H[p] - H[p - 1] for p in range(1, q)]
        columns.append(-H[q - 1])
        return np.stack(columns, axis=1)


@dataclasses.dataclass(frozen=True)
class ESDIRKTableau:
    """A singly diagonally implicit RK method with an explicit first stage.

    **Arguments:**

    - `c`, `a`, `b`: nodes, lower-triangular stage matrix (diagonal γ from the
      second stage, 0 in the first), weights.
    - `b_error`: b − b̂ (the error estimate is h Σ b_error_i k_i).
    - `predictor`: (s, s) strictly lower weights α of the Newton starting guess
      for stage i, Σ_j α_ij (h k_j) (rows of zeros use the previous stage).
    - `order`, `error_order`.
    """

    c: np.ndarray
    a: np.ndarray
    b: np.ndarray
    b_error: np.ndarray
    predictor: np.ndarray
    order: int
    error_order: int

    def __post_init__(self):
        s = len(self.c)
        gamma = self.gamma
        _check(
            [
                (self.a.shape == (s, s) and self.b.shape == (s,), "shapes"),
                (np.allclose(np.tril(self.a), self.a), "a must be lower triangular"),
                (self.a[0, 0] == 0, "the first stage must be explicit"),
                (np.allclose(np.diag(self.a)[1:], gamma), "diagonal must be γ"),
                (np.allclose(self.a.sum(axis=1), self.c, atol=1e-12), "rows of a != c"),
                (abs(self.b.sum() - 1) < 1e-12, "sum(b) != 1"),
                (abs(self.b_error.sum()) < 1e-12, "sum(b_error) != 0"),
            ],
            "ESDIRKTableau",
        )

    @property
    def gamma(self) -> float:
        return float(self.a[1, 1])

    @property
    def num_stages(self) -> int:
        return len(self.c)

    @property
    def stiffly_accurate(self) -> bool:
        return bool(np.array_equal(self.a[-1], self.b))

    def stage_interpolant(self, stages: tuple[int, ...]) -> np.ndarray:
        """(q, s) weights W of the polynomial through y at θ = 0, the stage
        values Y_i (i in `stages`) at θ = c_i, and y_1 at θ = 1:
        y(t + θh) = y + Σ_p θ^(p+1) Σ_j W_pj z_j, with z_j = h k_j.

        Derivative-free: a Hermite interpolant uses h f(y_1), which for a stiff
        problem carries h‖J‖ times y_1's error, while the stage values are the
        method's own damped approximations. With Y_i − y = Σ_j a_ij z_j and
        Lagrange polynomials L_m on the nodes, y(θ) − y = Σ_m (V_m − y) L_m(θ).
        """
        nodes = [0.0] + [float(self.c[i]) for i in stages] + [1.0]
        rows = [self.a[i] for i in stages] + [self.b]
        q = len(nodes) - 1
        weights = np.zeros((q, self.num_stages))
        for m in range(1, len(nodes)):
            others = [x for k, x in enumerate(nodes) if k != m]
            basis = np.poly(others)[::-1] / np.prod([nodes[m] - x for x in others])
            for p in range(q):
                weights[p] += basis[p + 1] * rows[m - 1]
        return weights


def _rodas5p() -> RosenbrockTableau:
    """Rodas5P: Steinebach, G. (2023), "Construction of Rosenbrock–Wanner method
    Rodas5P and numerical benchmarks within the Julia Differential Equations
    package", BIT Numer. Math. 63, 27. Coefficients (transformed form, with the
    3-term dense output) as published there and in OrdinaryDiffEq.jl."""
    a = np.zeros((8, 8))
    a[1, :1] = [3.0]
    a[2, :2] = [2.849394379747939, 0.45842242204463923]
    a[3, :3] = [-6.954028509809101, 2.489845061869568, -10.358996098473584]
    a[4, :4] = [
        2.8029986275628964,
        0.5072464736228206,
        -0.3988312541770524,
        -0.04721187230404641,
    ]
    row6 = [
        -7.502846399306121,
        2.561846144803919,
        -11.627539656261098,
        -0.18268767659942256,
        0.030198172008377946,
    ]
    a[5, :5] = row6
    a[6, :6] = row6 + [1.0]
    a[7, :7] = row6 + [1.0, 1.0]
    C = np.zeros((8, 8))
    C[1, :1] = [-14.155112264123755]
    C[2, :2] = [-17.97296035885952, -2.859693295451294]
    C[3, :3] = [147.12150275711716, -1.41221402718213, 71.68940251302358]
    C[4, :4] = [
        165.43517024871676,
        -0.4592823456491126,
        42.90938336958603,
        -5.961986721573306,
    ]
    C[5, :5] = [
        24.854864614690072,
        -3.0009227002832186,
        47.4931110020768,
        5.5814197821558125,
        -0.6610691825249471,
    ]
    C[6, :6] = [
        30.91273214028599,
        -3.1208243349937974,
        77.79954646070892,
        34.28646028294783,
        -19.097331116725623,
        -28.087943162872662,
    ]
    C[7, :7] = [
        37.80277123390563,
        -3.2571969029072276,
        112.26918849496327,
        66.9347231244047,
        -40.06618937091002,
        -54.66780262877968,
        -9.48861652309627,
    ]
    c = np.array(
        [0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716]
        + [0.4288403609558664, 1, 1, 1]
    )
    d = np.array(
        [0.21193756319429014, -0.42387512638858027, -0.3384627126235924]
        + [1.8046452872882734, 2.325825639765069, 0, 0, 0]
    )
    H = np.array(
        [
            [25.948786856663858, -2.5579724845846235, 10.433815404888879]
            + [-2.3679251022685204, 0.524948541321073, 1.1241088310450404]
            + [0.4272876194431874, -0.17202221070155493],
            [-9.91568850695171, -0.9689944594115154, 3.0438037242978453]
            + [-24.495224566215796, 20.176138334709044, 15.98066361424651]
            + [-6.789040303419874, -6.710236069923372],
            [11.419903575922262, 2.8879645146136994, 72.92137995996029]
            + [80.12511834622643, -52.072871366152654, -59.78993625266729]
            + [-0.15582684282751913, 4.883087185713722],
        ]
    )
    # Stiffly accurate: y_1 is the last stage's argument plus k_8, and the
    # embedded solution is that argument itself (error estimate k_8).
    m = np.append(a[7, :7], 1.0)
    m_error = np.zeros(8)
    m_error[7] = 1.0
    return RosenbrockTableau(
        gamma=0.21193756319429014,
        a=a,
        C=C,
        c=c,
        d=d,
        m=m,
        m_error=m_error,
        H=H,
        order=5,
        error_order=4,
    )


def _kvaerno5() -> ESDIRKTableau:
    """Kvaerno5: Kværnø, A. (2004), "Singly diagonally implicit Runge–Kutta
    methods with an explicit first stage", BIT Numer. Math. 44, 489–502
    (the 7-stage 5(4) pair, γ = 0.26, stiffly accurate, L-stable), with the
    Newton starting-guess weights used by OrdinaryDiffEq.jl."""
    g = 0.26
    a = np.zeros((7, 7))
    a[1, :2] = [g, g]
    a[2, :3] = [0.13, 0.84033320996790809, g]
    a[3, :4] = [0.22371961478320505, 0.47675532319799699, -0.06470895363112615, g]
    a[4, :5] = [
        0.16648564323248321,
        0.1045001884159172,
        0.03631482272098715,
        -0.13090704451073998,
        g,
    ]
    a[5, :6] = [
        0.13855640231268224,
        0.0,
        -0.04245337201752043,
        0.02446657898003141,
        0.61943039072480676,
        g,
    ]
    a[6, :7] = [
        0.13659751177640291,
        0.0,
        -0.05496908796538376,
        -0.04118626728321046,
        0.62993304899016403,
        0.06962479448202728,
        g,
    ]
    predictor = np.zeros((7, 7))
    predictor[1, 0] = 1.0
    predictor[2, :2] = [-1.366025403784441, 2.3660254037844357]
    predictor[3, :3] = [-0.19650552613122207, 0.8113579546496623, 0.38514757148155954]
    predictor[4, :3] = [0.10375304369958693, 0.937994698066431, -0.04174774176601781]
    predictor[5, :3] = [-0.17281112873898072, 0.6235784481025847, 0.5492326806363959]
    predictor[6, 5] = 1.0
    b = a[6].copy()
    return ESDIRKTableau(
        c=a.sum(axis=1),
        a=a,
        b=b,
        b_error=a[5] - a[6],
        predictor=predictor,
        order=5,
        error_order=4,
    )


RODAS5P = _rodas5p()
KVAERNO5 = _kvaerno5()
