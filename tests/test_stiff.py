"""The implicit solvers: order conditions, observed orders, the classic stiff
problems against SciPy's Radau, automatic switching, gradients, failures."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

import neuralode as no
from neuralode import _implicit_tableaus as tableaus
from neuralode.datasets import stiff_system
from neuralode.datasets._stiff_systems import ROBERTSON_RATES, robertson

IMPLICIT = [no.Rodas5P(), no.Kvaerno5(), no.AutoSwitch()]


# --- order conditions --------------------------------------------------------


@functools.cache
def _trees(order: int) -> tuple:
    """Rooted trees with `order` vertices, each a sorted tuple of its subtrees."""
    if order == 1:
        return ((),)
    found = set()
    for parts in _partitions(order - 1):
        for children in itertools.product(*(_trees(p) for p in parts)):
            found.add(tuple(sorted(children)))
    return tuple(sorted(found))


def _partitions(n: int, largest: int | None = None):
    largest = n if largest is None else largest
    if n == 0:
        yield ()
        return
    for first in range(min(n, largest), 0, -1):
        for rest in _partitions(n - first, first):
            yield (first, *rest)


def _size(tree) -> int:
    return 1 + sum(_size(t) for t in tree)


def _density(tree) -> int:
    """γ(t) = |t| Π γ(children)."""
    return _size(tree) * int(np.prod([_density(t) for t in tree]))


def _weights(tree, alpha, beta):
    """Φ(t) per stage: Π over children of (A Φ(child)), with A = β for a vertex
    with one child and α for more (Hairer & Wanner II, §IV.7: the Rosenbrock
    conditions; α = β gives Butcher's)."""
    s = alpha.shape[0]
    matrix = beta if len(tree) == 1 else alpha
    phi = np.ones(s)
    for child in tree:
        phi = phi * (matrix @ _weights(child, alpha, beta))
    return phi


def _order_residuals(b, alpha, beta, order: int) -> np.ndarray:
    return np.array(
        [
            b @ _weights(t, alpha, beta) - 1 / _density(t)
            for k in range(1, order + 1)
            for t in _trees(k)
        ]
    )


def test_tree_count_is_known():
    assert [len(_trees(k)) for k in range(1, 6)] == [1, 1, 2, 4, 9]


def test_rodas5p_satisfies_its_order_conditions():
    tab = tableaus.RODAS5P
    gamma_matrix, alpha, b = tab.classical
    beta = alpha + gamma_matrix
    assert np.max(np.abs(_order_residuals(b, alpha, beta, 5))) < 1e-10
    # The embedded solution (error estimate Σ m_error k) has order 4, not 5.
    b_hat = (tab.m - tab.m_error) @ gamma_matrix
    assert np.max(np.abs(_order_residuals(b_hat, alpha, beta, 4))) < 1e-10
    assert np.max(np.abs(_order_residuals(b_hat, alpha, beta, 5))) > 1e-6


def test_kvaerno5_satisfies_its_order_conditions():
    tab = tableaus.KVAERNO5
    assert tab.stiffly_accurate
    assert np.max(np.abs(_order_residuals(tab.b, tab.a, tab.a, 5))) < 1e-10
    b_hat = tab.b - tab.b_error
    assert np.max(np.abs(_order_residuals(b_hat, tab.a, tab.a, 4))) < 1e-10
    assert np.max(np.abs(_order_residuals(b_hat, tab.a, tab.a, 5))) > 1e-6


def test_both_are_l_stable():
    """R(z) → 0 as z → −∞ and |R| ≤ 1 on the left half-plane (sampled)."""
    z = np.concatenate([-np.logspace(-2, 8, 60), 1j * np.logspace(-2, 4, 30) - 1e-9])
    for tab in (tableaus.RODAS5P, tableaus.KVAERNO5):
        if isinstance(tab, tableaus.RosenbrockTableau):
            gamma_matrix, alpha, b = tab.classical
            matrix = alpha + gamma_matrix
        else:
            matrix, b = tab.a, tab.b
        s = len(b)
        r = np.array(
            [1 + x * b @ np.linalg.solve(np.eye(s) - x * matrix, np.ones(s)) for x in z]
        )
        assert np.all(np.abs(r) <= 1 + 1e-9)
        assert abs(r[np.argmin(z.real)]) < 1e-6


def test_broken_rosenbrock_tableau_is_a_value_error():
    tab = tableaus.RODAS5P
    with pytest.raises(ValueError, match="c != rows of α"):
        tableaus.RosenbrockTableau(**{**tab.__dict__, "c": tab.c + 0.1})


# --- observed orders ----------------------------------------------------------

_A = np.array([[-1.0, 0.5, 0.0], [0.0, -10.0, 1.0], [0.0, -3.0, -2.0]])


@pytest.mark.parametrize("solver", IMPLICIT[:2], ids=lambda s: type(s).__name__)
def test_observed_order_on_a_mildly_stiff_linear_problem(solver):
    y0 = np.ones(3)
    exact = scipy.linalg.expm(_A) @ y0
    errors, sizes = [], [1 / 8, 1 / 16, 1 / 32]
    for dt in sizes:
        sol = no.solve(
            lambda t, y, a: a @ y, jnp.asarray(y0), jnp.array([0.0, 1.0]),
            jnp.asarray(_A), solver=solver, dt0=dt,
            controller=no.ConstantStepSize(), rtol=1e-12, atol=1e-14,
        )  # fmt: skip
        errors.append(np.max(np.abs(np.asarray(sol.ys[-1]) - exact)))
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert 4.5 < slope < 6.5, (errors, slope)


def test_rosenbrock_uses_the_time_derivative():
    """y' = −λ(y − sin t): order 4–5 needs ∂f/∂t in the stages."""
    lam = 50.0
    exact = lam / (1 + lam**2) * (lam * np.sin(1) - np.cos(1) + np.exp(-lam))
    errors, sizes = [], [1 / 16, 1 / 32, 1 / 64]
    for dt in sizes:
        sol = no.solve(
            lambda t, y, a: -lam * (y - jnp.sin(t)), jnp.zeros(1),
            jnp.array([0.0, 1.0]), solver=no.Rodas5P(), dt0=dt,
            controller=no.ConstantStepSize(),
        )  # fmt: skip
        errors.append(abs(float(sol.ys[-1, 0]) - exact))
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert slope > 3.7, (errors, slope)


# --- the classic stiff problems against Radau ---------------------------------


#: Output times as fractions of the span: away from Van der Pol's jumps, where
#: a phase error of the tolerance's size is a large error in the state.
FRACTIONS = np.array([0.0, 0.12, 0.37, 0.62, 0.87, 1.0])


@functools.cache
def _radau(name: str, t1: float | None = None):
    """(system, ts, Radau at ts, max |y_i| over Radau's steps)."""
    system = stiff_system(name, t1=t1)
    field = jax.jit(lambda t, y: system.field(t, y, system.args))
    jac = jax.jit(jax.jacfwd(lambda t, y: system.field(t, y, system.args), 1))
    ts = system.t0 + (system.t1 - system.t0) * FRACTIONS
    sol = scipy.integrate.solve_ivp(
        lambda t, y: np.asarray(field(t, y)), (system.t0, system.t1), system.y0,
        method="Radau", rtol=1e-12, atol=1e-14, dense_output=True,
        jac=lambda t, y: np.asarray(jac(t, y)),
    )  # fmt: skip
    assert sol.status == 0
    return system, ts, sol.sol(ts).T, np.max(np.abs(sol.y), axis=1)


def _solve_system(system, ts, solver, rtol, atol, **kwargs):
    return no.solve(
        system.field, jnp.asarray(system.y0), jnp.asarray(ts), system.args,
        solver=solver, rtol=rtol, atol=atol, max_steps=20000, **kwargs,
    )  # fmt: skip


CASES = [
    ("robertson", no.Rodas5P()),
    ("robertson", no.Kvaerno5()),
    ("robertson", no.AutoSwitch()),
    ("van_der_pol", no.AutoSwitch()),
    ("hires", no.Kvaerno5()),
    ("orego", no.Rodas5P()),
]


@pytest.mark.parametrize(
    "name, solver", CASES, ids=[f"{n}-{type(s).__name__}" for n, s in CASES]
)
def test_stiff_problem_matches_radau_in_hundreds_of_steps(name, solver):
    system, ts, reference, magnitude = _radau(name)
    rtol, atol = 1e-6, 1e-10
    sol = _solve_system(system, ts, solver, rtol, atol)
    ys = np.asarray(sol.ys)
    # Error per component in units of the tolerance (a global error: a small
    # multiple of it), at the end and at four interior (dense) outputs,
    # relative to each component's size over the solve (Van der Pol's y2 is
    # 1e-2 on the slow branches and 1e3 on the jumps).
    scaled = np.abs(ys - reference) / (atol + rtol * magnitude)
    assert np.max(scaled) < 100, np.max(scaled, axis=0)
    assert 20 < int(sol.stats["num_steps"]) < 2000


def test_kvaerno5_dense_output_stays_accurate_inside_long_stiff_steps():
    """A Hermite cubic (h f(y_1) in it) was off by 7% of y2 inside Robertson's
    long steps at rtol 1e-4; the stage-value interpolant follows the tolerance."""
    system, ts, reference, magnitude = _radau("robertson")
    sol = _solve_system(system, ts, no.Kvaerno5(), 1e-4, 1e-10)
    assert np.max(np.abs(np.asarray(sol.ys) - reference) / magnitude) < 1e-3


def test_robertson_to_four_times_ten_to_the_ten():
    system, ts, reference, _ = _radau("robertson", t1=4e10)
    sol = _solve_system(system, ts, no.Rodas5P(), 1e-8, 1e-14)
    ys = np.asarray(sol.ys[-1])
    assert np.allclose(ys, reference[-1], rtol=1e-5, atol=1e-13)
    assert abs(ys.sum() - 1) < 1e-8  # mass is conserved
    assert int(sol.stats["num_steps"]) < 1000


def test_kvaerno5_reuses_its_jacobian_while_newton_contracts_well():
    system, ts, reference, magnitude = _radau("robertson")
    reused = _solve_system(system, ts, no.Kvaerno5(reuse_rate=0.01), 1e-6, 1e-10)
    fresh = _solve_system(system, ts, no.Kvaerno5(reuse_rate=0.0), 1e-6, 1e-10)
    assert int(fresh.stats["num_jacobians"]) == int(fresh.stats["num_steps"])
    assert int(reused.stats["num_jacobians"]) < 0.9 * int(reused.stats["num_steps"])
    for sol in (reused, fresh):
        scaled = np.abs(np.asarray(sol.ys) - reference) / (1e-10 + 1e-6 * magnitude)
        assert np.max(scaled) < 100


def test_explicit_solver_fails_on_robertson_and_names_the_implicit_ones():
    system = stiff_system("robertson")
    with pytest.raises(no.SolveError) as info:
        _solve_system(
            system, [0.0, 1e5], no.Tsit5(), 1e-6, 1e-10, adjoint=no.ForwardMode()
        )
    message = str(info.value)
    assert "max_steps=20000 reached" in message
    for name in ("Rodas5P()", "Kvaerno5()", "AutoSwitch()"):
        assert name in message


# --- automatic switching ------------------------------------------------------


def test_autoswitch_stays_explicit_on_a_nonstiff_problem():
    def lotka_volterra(t, y, args):
        return jnp.stack([1.5 * y[0] - y[0] * y[1], y[0] * y[1] - 3.0 * y[1]])

    solve = lambda solver: no.solve(
        lotka_volterra, jnp.array([1.0, 1.0]), jnp.linspace(0, 20, 11),
        solver=solver, rtol=1e-7, atol=1e-9,
    )  # fmt: skip
    auto, tsit5 = solve(no.AutoSwitch()), solve(no.Tsit5())
    assert int(auto.stats["num_switches"]) == 0
    assert int(auto.stats["num_fevals"]) <= 1.3 * int(tsit5.stats["num_fevals"])
    assert int(auto.stats["num_jacobians"]) == 0
    assert np.allclose(auto.ys, tsit5.ys, rtol=1e-6, atol=1e-8)


def test_autoswitch_switches_both_ways_on_van_der_pol():
    """Stiff on the slow branches, non-stiff on the fast jumps."""
    system, ts, reference, magnitude = _radau("van_der_pol")
    sol = _solve_system(system, ts, no.AutoSwitch(), 1e-6, 1e-10)
    switches, stiff = int(sol.stats["num_switches"]), int(sol.stats["num_stiff_steps"])
    assert switches >= 4  # into stiff and back, on each of the branches
    assert 0 < stiff < int(sol.stats["num_accepted"])
    # One Jacobian per implicit attempt (accepted or not), none for explicit ones.
    assert stiff <= int(sol.stats["num_jacobians"]) < int(sol.stats["num_steps"])
    assert np.max(np.abs(sol.ys - reference) / magnitude) < 1e-3


# --- gradients ----------------------------------------------------------------


def _robertson_loss(log_k, solver, adjoint):
    ts = jnp.array([0.0, 1e-2, 1.0, 10.0])
    sol = no.solve(
        robertson, jnp.array([1.0, 0.0, 0.0]), ts, jnp.exp(log_k), solver=solver,
        rtol=1e-10, atol=1e-14, adjoint=adjoint, max_steps=20000,
    )  # fmt: skip
    return jnp.sum(sol.ys[1:, 0]) + 1e4 * jnp.sum(sol.ys[1:, 1])


@functools.cache
def _robertson_central_differences() -> np.ndarray:
    log_k = jnp.log(jnp.array(ROBERTSON_RATES))
    loss = jax.jit(lambda x: _robertson_loss(x, no.Rodas5P(), no.ForwardMode()))
    eps = 1e-5
    return np.array(
        [
            (loss(log_k.at[i].add(eps)) - loss(log_k.at[i].add(-eps))) / (2 * eps)
            for i in range(3)
        ]
    )


GRADIENT_CASES = [
    (no.Rodas5P(), no.CheckpointAdjoint()),
    (no.Rodas5P(), no.ForwardMode()),
    (no.Kvaerno5(), no.CheckpointAdjoint()),
    (no.AutoSwitch(), no.CheckpointAdjoint()),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver, adjoint",
    GRADIENT_CASES,
    ids=[f"{type(s).__name__}-{type(a).__name__}" for s, a in GRADIENT_CASES],
)
def test_robertson_rate_gradient_matches_central_differences(solver, adjoint):
    log_k = jnp.log(jnp.array(ROBERTSON_RATES))
    loss = lambda x: _robertson_loss(x, solver, adjoint)
    if isinstance(adjoint, no.ForwardMode):
        grad = jax.jacfwd(loss)(log_k)
    else:
        grad = jax.grad(loss)(log_k)
    expected = _robertson_central_differences()
    assert np.allclose(grad, expected, rtol=1e-5, atol=1e-9), (grad, expected)


def test_backsolve_on_robertson_refuses_and_names_the_adjoints_that_work():
    log_k = jnp.log(jnp.array(ROBERTSON_RATES))
    with pytest.raises(no.SolveError) as info:
        jax.grad(_robertson_loss)(log_k, no.Rodas5P(), no.BacksolveAdjoint())
    message = str(info.value)
    assert "backward" in message
    assert "CheckpointAdjoint()" in message and "ForwardMode()" in message
    # ... and no advice about tolerances, which would not help.
    assert "rtol" not in message and "tolerances may be" not in message


# --- transformations, dtypes, pytrees, failures ---------------------------------


def test_jit_vmap_over_rate_constants_with_pytree_state():
    def field(t, y, k):
        dy = robertson(t, jnp.stack([y["a"], y["b"][0], y["b"][1]]), k)
        return {"a": dy[0], "b": dy[1:]}

    y0 = {"a": jnp.array(1.0), "b": jnp.zeros(2)}

    @jax.jit
    @jax.vmap
    def final(scale):
        k = jnp.array(ROBERTSON_RATES) * scale
        sol = no.solve(field, y0, jnp.array([0.0, 40.0]), k, solver=no.Rodas5P())
        return sol.ys["a"][-1]

    batched = final(jnp.array([0.5, 1.0, 2.0]))
    _, _, reference, _ = _radau("robertson", t1=40.0)
    assert abs(float(batched[1]) - reference[-1, 0]) < 1e-5
    assert batched[0] > batched[1] > batched[2]  # faster decay with larger k


@pytest.mark.parametrize("solver", IMPLICIT[1:], ids=lambda s: type(s).__name__)
def test_float32_robertson(solver):
    system, ts, reference, _ = _radau("robertson", t1=1e3)
    sol = no.solve(
        system.field, jnp.asarray(system.y0, jnp.float32),
        jnp.asarray(ts, jnp.float32), jnp.asarray(system.args, jnp.float32),
        solver=solver, rtol=1e-4, atol=1e-8,
    )  # fmt: skip
    assert sol.ys.dtype == jnp.float32
    assert np.allclose(sol.ys[-1], reference[-1], rtol=2e-3, atol=1e-7)


def test_matrix_free_linear_solves_match_radau():
    system, ts, reference, _ = _radau("hires")
    free = _solve_system(
        system, ts, no.Rodas5P(linear_solver="matrix_free"), 1e-6, 1e-10
    )
    assert np.allclose(free.ys, reference, rtol=1e-4, atol=1e-9)


@jax.custom_jvp
def _decay_with_wrong_jacobian(y):
    return -100.0 * y


@_decay_with_wrong_jacobian.defjvp
def _(primals, tangents):
    (y,), (dy,) = primals, tangents
    # The Jacobian reported is −1000 instead of −100: simplified Newton then
    # contracts only while h is small.
    return -100.0 * y, 1000.0 * dy


def test_diverging_newton_iterations_are_rejected_and_retried_smaller():
    f = lambda t, y, args: _decay_with_wrong_jacobian(y)
    sol = no.solve(f, jnp.ones(2), jnp.array([0.0, 1.0]), solver=no.Kvaerno5())
    assert int(sol.stats["num_rejected"]) > 0
    assert np.allclose(sol.ys[-1], np.exp(-100.0), atol=1e-8)


def test_newton_that_never_converges_has_its_own_result_code():
    """A rejected attempt whose Newton iterations failed, with no step size
    left, ends the solve with its own code (not a step-size underflow)."""
    from neuralode._integrate import Attempt, SolverConfig, failure_code

    config = SolverConfig(no.Kvaerno5(), no.PIController(), 1e-6, 1e-8, None, 100)
    t = jnp.array(0.5)
    attempt = lambda converged: Attempt(
        t, jnp.array(1e-20), None, None, None, jnp.array(False), jnp.array(True),
        jnp.array(1.0), jnp.array(1e-20), jnp.array(0.0), jnp.array(converged), None,
    )  # fmt: skip
    code = lambda converged: int(
        failure_code(config, attempt(converged), t, jnp.array(1.0), jnp.array(5))
    )
    assert code(False) == no.RESULTS.implicit_not_converged
    assert code(True) == no.RESULTS.dt_underflow
    assert "Newton" in no.RESULTS.message(no.RESULTS.implicit_not_converged)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: no.Rodas5P(linear_solver="lu"), "linear_solver must be"),
        (lambda: no.Kvaerno5(newton_kappa=2.0), "newton_kappa must lie"),
        (lambda: no.Kvaerno5(reuse_rate=1.5), "reuse_rate must lie"),
        (lambda: no.AutoSwitch(nonstiff=no.RK4()), "nonstiff must be an adaptive"),
        (lambda: no.AutoSwitch(stiff=no.Tsit5()), "stiff must be Rodas5P"),
    ],
)
def test_bad_configuration_is_a_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()
