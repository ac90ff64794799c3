"""Tableau identities and the order conditions of every method."""

import numpy as np
import pytest

from neuralode import _tableaus as tableaus

ALL = {
    "dopri5": tableaus.DOPRI5,
    "tsit5": tableaus.TSIT5,
    "bosh3": tableaus.BOSH3,
    "fehlberg45": tableaus.FEHLBERG45,
    "euler": tableaus.EULER,
    "midpoint": tableaus.MIDPOINT,
    "rk4": tableaus.RK4,
}


def _order_conditions(a, b, c, order):
    """Residuals of the order conditions up to `order` (trees up to order 5)."""
    one = np.ones_like(c)
    conds = {
        1: [(b @ one, 1)],
        2: [(b @ c, 1 / 2)],
        3: [(b @ c**2, 1 / 3), (b @ a @ c, 1 / 6)],
        4: [
            (b @ c**3, 1 / 4),
            (b @ (c * (a @ c)), 1 / 8),
            (b @ a @ c**2, 1 / 12),
            (b @ a @ a @ c, 1 / 24),
        ],
        5: [
            (b @ c**4, 1 / 5),
            (b @ (c**2 * (a @ c)), 1 / 10),
            (b @ ((a @ c) ** 2), 1 / 20),
            (b @ (c * (a @ c**2)), 1 / 15),
            (b @ (c * (a @ a @ c)), 1 / 30),
            (b @ a @ c**3, 1 / 20),
            (b @ a @ (c * (a @ c)), 1 / 40),
            (b @ a @ a @ c**2, 1 / 60),
            (b @ a @ a @ a @ c, 1 / 120),
        ],
    }
    return [lhs - rhs for k in range(1, order + 1) for lhs, rhs in conds[k]]


@pytest.mark.parametrize("name", ALL)
def test_propagated_solution_satisfies_order_conditions(name):
    t = ALL[name]
    residuals = _order_conditions(t.a, t.b, t.c, t.order)
    assert np.max(np.abs(residuals)) < 1e-12
    # ... and not those of one order higher (the order is exact).
    if t.order < 5:
        higher = _order_conditions(t.a, t.b, t.c, t.order + 1)
        assert np.max(np.abs(higher)) > 1e-6


@pytest.mark.parametrize("name", [k for k, t in ALL.items() if t.adaptive])
def test_embedded_solution_satisfies_its_order_conditions(name):
    t = ALL[name]
    b_hat = t.b - t.b_error
    residuals = _order_conditions(t.a, b_hat, t.c, t.error_order)
    assert np.max(np.abs(residuals)) < 1e-12


def test_fsal_is_derived_from_the_numbers():
    assert tableaus.DOPRI5.fsal and tableaus.TSIT5.fsal and tableaus.BOSH3.fsal
    assert not tableaus.FEHLBERG45.fsal and not tableaus.RK4.fsal


@pytest.mark.parametrize("name", ["dopri5", "tsit5"])
def test_dense_output_matches_b_at_the_end_and_is_fourth_order(name):
    t = ALL[name]
    # The continuous weights b_i(θ) satisfy the order conditions up to 4 at
    # every θ: Σ b_i(θ) c_i^(k-1) = θ^k / k, etc. (scaled by θ).
    for theta in (0.1, 0.37, 0.5, 0.93):
        bt = t.dense @ theta ** np.arange(1, t.dense.shape[1] + 1)
        one = np.ones_like(t.c)
        c = t.c
        checks = [
            (bt @ one, theta),
            (bt @ c, theta**2 / 2),
            (bt @ c**2, theta**3 / 3),
            (bt @ t.a @ c, theta**3 / 6),
            (bt @ c**3, theta**4 / 4),
            (bt @ (c * (t.a @ c)), theta**4 / 8),
            (bt @ t.a @ c**2, theta**4 / 12),
            (bt @ t.a @ t.a @ c, theta**4 / 24),
        ]
        for lhs, rhs in checks:
            assert abs(lhs - rhs) < 1e-12


@pytest.mark.parametrize(
    "change, message",
    [
        ({"b": tableaus.RK4.b * 1.01}, "sum\\(b\\) != 1"),
        ({"c": tableaus.RK4.c + 0.1}, "rows of a != c"),
        ({"a": tableaus.RK4.a.T}, "strictly lower"),
        ({"b_error": np.array([0.1, 0.0, 0.0, 0.0])}, "sum\\(b_error\\) != 0"),
        ({"dense": np.ones((4, 2))}, "does not reproduce b"),
        ({"b": np.ones(3) / 3}, "a must be \\(4, 4\\)"),
    ],
)
def test_broken_tableau_is_a_value_error(change, message):
    """ValueError, not assert: `python -O` would skip an assert."""
    good = tableaus.RK4
    fields = dict(c=good.c, a=good.a, b=good.b, b_error=None, order=4, error_order=None)
    with pytest.raises(ValueError, match=message):
        tableaus.ButcherTableau(**{**fields, **change})


def test_stage_counts():
    counts = {k: t.num_stages for k, t in ALL.items()}
    assert counts == dict(zip(ALL, [7, 7, 4, 6, 1, 2, 4], strict=True)), counts
