"""ReversibleAdjoint: exact gradients of the reversible solve at constant memory.

Each test compiles one or two programs (compilation is what these tests
cost): gradients are checked against central differences of the same solve
evaluated in the same vmapped program (`_directional`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
import pytest

import neuralode as no

from .helpers import name


def field(t, y, args):
    return args["a"] @ jnp.tanh(y) + args["b"] * jnp.cos(t)


ARGS = {
    "a": jnp.array([[-0.5, 1.0, 0.2], [-1.0, -0.3, 0.1], [0.3, -0.2, -0.4]]),
    "b": jnp.array([0.2, -0.1, 0.3]),
}
Y0 = jnp.array([1.0, 0.5, -0.7])
TS = jnp.array([0.0, 0.37, 1.2, 2.0])


def _directional(loss, inputs, eps=1e-6, seed=0):
    """(⟨∇loss(inputs), v⟩, central difference along v) for a random v, from
    one compiled value_and_grad called at inputs and inputs ± eps·v."""
    leaves, treedef = jax.tree.flatten(inputs)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    v = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    moved = lambda e: jax.tree.map(lambda x, d: x + e * d, inputs, v)
    _, grad = value_and_grad(inputs)
    plus, _ = value_and_grad(moved(eps))
    minus, _ = value_and_grad(moved(-eps))
    exact = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v), strict=True)
    )
    return float(exact), float((plus - minus) / (2 * eps))


# With Euler (pytree test), Midpoint (CNF test), RK4 (NeuralODE test) and
# Tsit5 (adaptive test) every explicit solver's gradient is checked; Bosh3's
# rebuilding is.
FIXED_STEP = [no.Fehlberg45(), no.Dopri5()]


@pytest.mark.parametrize("solver", FIXED_STEP, ids=name)
def test_gradient_equals_finite_differences_of_the_fixed_step_solve(solver):
    """y0, args and the field's closed-over array, with interior outputs read
    from the reversible step's dense output."""
    scale = jnp.array([1.0, -0.5, 0.25])

    def loss(inputs):
        y0, args, c = inputs
        f = lambda t, y, args: field(t, y, args) * c
        ys = no.odeint(
            f, y0, TS, args, solver=solver, dt0=0.1,
            controller=no.ConstantStepSize(), adjoint=no.ReversibleAdjoint(),
        )  # fmt: skip
        return jnp.sum(jnp.sin(ys) * scale)

    exact, fd = _directional(loss, (Y0, ARGS, jnp.array(1.3)))
    assert abs(exact - fd) <= 1e-8 * max(1.0, abs(exact)), (exact, fd)


def test_adaptive_gradient_matches_checkpoint_and_the_exact_one():
    """On y' = Ay both discrete gradients (of two different solves) approach
    the exact ∂/∂(y0, A, ts) of c·expm(A(t1 - t0))y0, within their tolerances."""
    a = ARGS["a"]
    c = jnp.array([0.3, -1.0, 0.5])
    ts = jnp.array([0.0, 3.0])

    def loss(a, y0, ts, adjoint):
        ys = no.odeint(
            lambda t, y, a: a @ y, y0, ts, a, solver=no.Tsit5(), rtol=1e-9,
            atol=1e-11, adjoint=adjoint,
        )  # fmt: skip
        return jnp.dot(c, ys[-1])

    exact = jax.grad(
        lambda a, y0, ts: jnp.dot(c, jax.scipy.linalg.expm(a * (ts[1] - ts[0])) @ y0),
        argnums=(0, 1, 2),
    )(a, Y0, ts)

    @jax.jit
    def both(a, y0, ts):
        grad = jax.grad(loss, argnums=(0, 1, 2))
        return grad(a, y0, ts, no.ReversibleAdjoint()), grad(
            a, y0, ts, no.CheckpointAdjoint()
        )

    reversible, checkpoint = both(a, Y0, ts)
    for got in (reversible, checkpoint):
        for x, y in zip(got, exact, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)


def pendulum(t, y, args):
    return jnp.stack([y[1], -args * jnp.sin(y[0])])


def test_backward_pass_rebuilds_the_initial_state():
    """Hundreds of adaptive steps of a pendulum (the oscillatory dynamics the
    scheme is stable on), rebuilt backwards to y0 (both states of the pair) to
    rounding."""
    adjoint = no.ReversibleAdjoint()
    config = no._integrate.SolverConfig(
        no.Bosh3(), no.PIController(), 1e-8, 1e-10, None, 4096, None
    )
    ts = jnp.array([0.0, 20.0])
    y0 = jnp.array([2.5, 0.0])
    problem, params, y0_flat = no._problem.make_problem(pendulum, y0, ts[0], 1.0)
    direction = jnp.ones(())

    @jax.jit
    def rebuild(params, y0):
        record, stats = adjoint.forward(config, problem, params, direction, (y0,), ts)
        ys_bar = tuple(jnp.ones_like(y) for y in record.ys)
        result = adjoint.backward(
            config, problem, params, direction, ts, (y0,), record, ys_bar
        )
        return result, stats.num_accepted

    result, steps = rebuild(params, y0_flat)
    (y_rebuilt,), (z_rebuilt,) = result.y0_rebuilt, result.z0_rebuilt
    assert steps > 200
    np.testing.assert_allclose(y_rebuilt, y0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(z_rebuilt, y0, rtol=0, atol=1e-12)
    assert result.drift < 0.1, result.drift


def test_vmap_jit_pytree_backward_in_time():
    """A pytree state solved from t = 1 back to t = -1 with interior outputs,
    under jit and vmap over samples, against central differences."""

    def f(t, y, args):
        return {"x": y["v"], "v": -args * jnp.sin(y["x"]) - 0.1 * y["v"] * t}

    ts = jnp.array([1.0, 0.4, -0.3, -1.0])

    def loss(inputs):
        y0, k = inputs
        ys = no.odeint(
            f, y0, ts, k, solver=no.Euler(), dt0=0.05,
            controller=no.ConstantStepSize(), adjoint=no.ReversibleAdjoint(),
        )  # fmt: skip
        return jnp.sum(ys["x"] ** 2) + jnp.sum(jnp.cos(ys["v"]))

    batch = {"x": jnp.array([[0.5, -1.0], [1.2, 0.3]]), "v": jnp.zeros((2, 2))}
    batched = lambda inputs: jnp.sum(jax.vmap(loss)(inputs))
    exact, fd = _directional(batched, (batch, jnp.array([1.5, 0.7])))
    assert abs(exact - fd) <= 1e-8 * max(1.0, abs(exact)), (exact, fd)


def _temp_bytes(horizon: float) -> int:
    """Compiled temporary memory of a gradient through a fixed-step solve whose
    max_steps is the number of steps taken (so that the program changes)."""
    w = jax.random.normal(jax.random.key(1), (32, 32)) / 8
    y0 = jax.random.normal(jax.random.key(2), (64, 32))
    dt0 = 0.1
    steps = int(np.ceil(horizon / dt0)) + 1

    def loss(w):
        ys = no.odeint(
            lambda t, y, w: jnp.tanh(y @ w), y0, jnp.array([0.0, horizon]), w,
            solver=no.Euler(), dt0=dt0, max_steps=steps, adjoint=no.ReversibleAdjoint(),
        )  # fmt: skip
        return jnp.sum(ys[-1] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(w).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_does_not_grow_with_the_number_of_steps():
    short, long = _temp_bytes(1.0), _temp_bytes(40.0)
    assert long <= 1.5 * short, (short, long)


@pytest.mark.parametrize(
    "solver", [no.Kvaerno5(), no.Rodas5P(), no.AutoSwitch()], ids=name
)
def test_implicit_solvers_are_refused(solver):
    loss = lambda y0: jnp.sum(
        no.odeint(field, y0, TS, ARGS, solver=solver, adjoint=no.ReversibleAdjoint())
    )
    with pytest.raises(TypeError, match="needs an explicit Runge-Kutta solver"):
        jax.grad(loss)(Y0)
    with pytest.raises(TypeError, match=f"got {name(solver)}"):
        loss(Y0)


def test_second_derivatives_are_refused():
    def loss(k):
        args = {"a": ARGS["a"] * k, "b": ARGS["b"]}
        ys = no.odeint(
            field, Y0, TS, args, solver=no.Euler(), dt0=0.5,
            adjoint=no.ReversibleAdjoint(),
        )  # fmt: skip
        return jnp.sum(ys**2)

    # Refused while tracing, before anything is compiled.
    with pytest.raises(TypeError, match="first derivatives only.*CheckpointAdjoint"):
        jax.jit(jax.grad(jax.grad(loss))).trace(1.0)


def test_coupling_is_checked():
    with pytest.raises(ValueError, match=r"coupling must be in \(0, 1\]"):
        no.ReversibleAdjoint(coupling=0.0)
    with pytest.raises(TypeError, match="coupling must be a float"):
        no.ReversibleAdjoint(coupling="0.9")


def _model(kind: str):
    field = no.nn.MLPField(2, 8, 1, key=jax.random.key(4))
    adjoint = no.ReversibleAdjoint()
    if kind == "NeuralODE":
        return no.NeuralODE(field, solver=no.RK4(), dt0=0.1, adjoint=adjoint)
    return no.CNF(field, solver=no.Midpoint(), dt0=0.1, adjoint=adjoint)


@pytest.mark.parametrize("kind", ["NeuralODE", "CNF"])
def test_neural_ode_and_cnf_accept_it(kind):
    """NeuralODE's and the exact-trace CNF's parameter gradients against
    central differences along a random direction of all their weights."""
    params, static = eqx.partition(_model(kind), eqx.is_inexact_array)
    x = jnp.array([[0.3, -0.4], [1.0, 0.2]])

    def loss(params):
        model = eqx.combine(params, static)
        out = model(x) if kind == "NeuralODE" else model.log_prob(x)
        return jnp.sum(out**2)

    exact, fd = _directional(loss, params)
    assert abs(exact - fd) <= 1e-8 * max(1.0, abs(exact)), (exact, fd)


def _contracting(k, coupling, horizon=10.0, throw=True):
    """A flow contracting at rate k over t ∈ [0, horizon]."""
    return no.solve(
        lambda t, y, k: -k * y + 0.1 * jnp.sin(y), jnp.array([1.0, -2.0]),
        jnp.array([0.0, horizon]), k, throw=throw,
        adjoint=no.ReversibleAdjoint(coupling=coupling),
    )  # fmt: skip


def test_unstable_solve_is_refused():
    """At rate 3 every step contracts by far more than the coupling 0.999: the
    scheme's spurious mode grows and y misses its tolerance by orders of
    magnitude. The solve raises, or with throw=False returns NaN and its code,
    instead of a wrong number (and so does its gradient)."""
    loss = lambda k: jnp.sum(_contracting(k, 0.999).ys[-1] ** 2)
    with pytest.raises(no.SolveError, match="reversible scheme was unstable"):
        with no.reraise_failures():
            jax.jit(jax.grad(loss))(3.0)
    sol = jax.jit(lambda k: _contracting(k, 0.999, throw=False))(3.0)
    assert int(sol.result) == no.RESULTS.reversible_unstable
    assert bool(jnp.all(jnp.isnan(sol.ys[-1])))


def _offset_flow(t, y, k):
    return -k * (y - 0.5) + 0.3 * jnp.sin(y[::-1])


def _reference_loss(k: float) -> float:
    """Σ ys² + ys of the flow at 5 times in [0, 10], by SciPy's DOP853 at
    rtol 1e-12 (float64, nothing compiled)."""
    from scipy.integrate import solve_ivp

    def rhs(t, y):
        return -k * (y - 0.5) + 0.3 * np.sin(y[::-1])

    ts = np.linspace(0.0, 10.0, 5)
    ys = solve_ivp(rhs, (0, 10), [2.0, 1.0], "DOP853", ts, rtol=1e-12, atol=1e-12).y
    return float(np.sum(ys**2 + ys))


def test_smaller_coupling_makes_a_contracting_flow_stable():
    """Rate 1 over [0, 10], where the default coupling 0.999 is unstable (as in
    `test_unstable_solve_is_refused`): at 0.5 (the stable band λ <= |R(hμ)|
    widens) the solve and its gradient are accurate to the tolerance's order,
    against SciPy's DOP853 and central differences of it."""

    def loss(k):
        ys = no.odeint(
            _offset_flow, jnp.array([2.0, 1.0]), jnp.linspace(0.0, 10.0, 5), k,
            adjoint=no.ReversibleAdjoint(coupling=0.5), rtol=1e-6, atol=1e-6,
        )  # fmt: skip
        return jnp.sum(ys**2 + ys)

    with no.reraise_failures():
        value, grad = jax.jit(jax.value_and_grad(loss))(1.0)
    eps = 1e-4
    expected = (_reference_loss(1.0 + eps) - _reference_loss(1.0 - eps)) / (2 * eps)
    assert abs(float(value) - _reference_loss(1.0)) <= 1e-5 * abs(float(value))
    assert abs(float(grad) - expected) <= 1e-4 * abs(expected)


def test_gradient_is_refused_where_the_rebuilding_fails():
    """Rate 3 at coupling 0.3: the forward solve is stable, but run backwards
    the rebuilding amplifies rounding errors by up to 1/λ per step, so the
    gradient is refused instead of returned wrong."""
    loss = lambda k: jnp.sum(_contracting(k, 0.3).ys[-1] ** 2)
    with pytest.raises(no.SolveError, match="did not rebuild y0"):
        with no.reraise_failures():
            jax.jit(jax.grad(loss))(3.0)
