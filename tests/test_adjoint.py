"""Gradients: both adjoints against finite differences, expm and each other."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import neuralode as no

from .helpers import random_stable_matrix, tree_allclose

ADJOINTS = [no.BacksolveAdjoint(), no.CheckpointAdjoint()]
TOL = dict(rtol=1e-10, atol=1e-12)


def adjoint_name(adjoint) -> str:
    return type(adjoint).__name__


def forced(t, y, args):
    k, w = args["k"], args["w"]
    return -k * y + jnp.sin(w * t) * jnp.roll(y, 1)


def central_difference(fun, x, eps=1e-6):
    """∂fun/∂x by central differences, for a flat float64 array x."""
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (fun(x + step) - fun(x - step)) / (2 * eps)
    return grad


def _loss(y0, args, ts, adjoint):
    ys = no.odeint(forced, y0, ts, args, adjoint=adjoint, **TOL)
    return jnp.sum(ys**2 * jnp.arange(1.0, ys.shape[0] + 1.0)[:, None])


Y0 = jnp.array([1.0, -0.5, 0.3])
ARGS = {"k": jnp.array(0.7), "w": jnp.array(2.0)}
TS = jnp.array([0.0, 0.4, 1.1, 2.0])


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=adjoint_name)
def test_gradients_match_finite_differences(adjoint):
    grads = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=3)(
        Y0, ARGS, TS, adjoint
    )
    forward_loss = jax.jit(lambda y0, args, ts: _loss(y0, args, ts, no.ForwardMode()))
    fd_loss = lambda y0, args, ts: float(forward_loss(y0, args, ts))
    fd_y0 = central_difference(lambda y: fd_loss(jnp.asarray(y), ARGS, TS), Y0)
    fd_k = central_difference(
        lambda k: fd_loss(Y0, {"k": jnp.asarray(k), "w": ARGS["w"]}, TS), ARGS["k"]
    )
    fd_w = central_difference(
        lambda w: fd_loss(Y0, {"k": ARGS["k"], "w": jnp.asarray(w)}, TS), ARGS["w"]
    )
    fd_ts = central_difference(lambda ts: fd_loss(Y0, ARGS, jnp.asarray(ts)), TS)
    assert np.allclose(grads[0], fd_y0, rtol=1e-6, atol=1e-7)
    assert np.allclose(grads[1]["k"], fd_k, rtol=1e-6, atol=1e-7)
    assert np.allclose(grads[1]["w"], fd_w, rtol=1e-6, atol=1e-7)
    # Interior and both end points of ts.
    assert np.allclose(grads[2], fd_ts, rtol=1e-5, atol=1e-6), (grads[2], fd_ts)


class MLPField(eqx.Module):
    mlp: eqx.nn.MLP
    scale: float = eqx.field(static=True)

    def __call__(self, t, y, args):
        return self.scale * self.mlp(jnp.concatenate([y, t[None]]))


def _mlp_field(key, width=16):
    return MLPField(eqx.nn.MLP(3, 2, width, 2, activation=jnp.tanh, key=key), 1.0)


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=adjoint_name)
def test_equinox_module_parameters_match_finite_differences(adjoint, key):
    field = _mlp_field(key, width=8)
    y0 = jnp.array([0.5, -1.0])
    ts = jnp.array([0.0, 1.5])

    def loss(field, adjoint):
        return jnp.sum(no.odeint(field, y0, ts, adjoint=adjoint, **TOL)[-1] ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(field, adjoint)
    weight = field.mlp.layers[1].weight
    with_weight = jax.jit(
        lambda w: loss(
            eqx.tree_at(lambda f: f.mlp.layers[1].weight, field, w), no.ForwardMode()
        )
    )
    fd = central_difference(lambda w: float(with_weight(jnp.asarray(w))), weight)
    assert np.allclose(grads.mlp.layers[1].weight, fd, rtol=1e-5, atol=1e-8)


def test_adjoints_agree_with_each_other(key):
    field = _mlp_field(key)
    y0 = jnp.array([0.5, -1.0])
    ts = jnp.linspace(0.0, 3.0, 7)

    def loss(field, y0, adjoint):
        return jnp.sum(no.odeint(field, y0, ts, adjoint=adjoint, **TOL) ** 2)

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    back = grad(field, y0, no.BacksolveAdjoint())
    check = grad(field, y0, no.CheckpointAdjoint())
    assert tree_allclose(back, check, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=adjoint_name)
def test_linear_ode_gradient_through_expm(adjoint, key):
    """L = ½‖e^{AT} z0‖²: dL/dA and dL/dz0 from the matrix exponential."""
    a = random_stable_matrix(key, 4)
    z0 = jnp.array([1.0, 2.0, -1.0, 0.5])
    t1 = 1.3

    def loss_ode(a, z0):
        ys = no.odeint(
            lambda t, y, a: a @ y, z0, jnp.array([0.0, t1]), a, adjoint=adjoint, **TOL
        )
        return 0.5 * jnp.sum(ys[-1] ** 2)

    def loss_expm(a, z0):
        return 0.5 * jnp.sum((jax.scipy.linalg.expm(a * t1) @ z0) ** 2)

    got = jax.grad(loss_ode, argnums=(0, 1))(a, z0)
    want = jax.grad(loss_expm, argnums=(0, 1))(a, z0)
    assert tree_allclose(got, want, rtol=1e-7, atol=1e-9)
    assert np.allclose(
        scipy.linalg.expm(np.asarray(a) * t1) @ np.asarray(z0),
        no.odeint(lambda t, y, a: a @ y, z0, jnp.array([0.0, t1]), a, **TOL)[-1],
    )


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [None, 3], ids=["all-kept", "thinned"])
@pytest.mark.parametrize(
    "solver, controller",
    [(no.RK4(), no.PIController()), (no.Dopri5(), no.ConstantStepSize())],
    ids=["RK4", "Dopri5-constant"],
)
def test_checkpoint_equals_autodiff_of_unrolled_steps(
    solver, controller, checkpoints, key
):
    """The exact discrete gradient: same as autodiff through a Python loop,
    also when 3 kept states (stride 4 for the 12 steps) force recomputation."""
    field = _mlp_field(key)
    y0 = jnp.array([0.5, -1.0])
    dt, n = 0.1, 12
    ts = jnp.array([0.0, 0.25, 0.6, n * dt])

    def unrolled(field, y0):
        # The solver's state is a tuple of flat vectors.
        f = lambda t, y: (field(t, y[0], None),)
        t, y, out = 0.0, (y0,), [y0]
        tableau = solver.tableau
        for _ in range(n):
            h = jnp.asarray(dt)
            t_ = jnp.asarray(t)
            y1, _, _, _ = no._solvers.runge_kutta_step(tableau, f, t_, y, f(t_, y), h)
            for t_out in (0.25, 0.6):
                if t < t_out <= t + dt + 1e-12:
                    (dense,) = solver.step(f, t_, y, f(t_, y), h).dense
                    theta = jnp.asarray((t_out - t) / dt)
                    out.append(no._interpolation.evaluate(y[0], dense, theta))
            t, y = t + dt, y1
        out.append(y[0])
        return jnp.sum(jnp.stack(out) ** 2)

    def via_solve(field, y0):
        ys = no.odeint(
            field,
            y0,
            ts,
            solver=solver,
            dt0=dt,
            controller=controller,
            adjoint=no.CheckpointAdjoint(checkpoints),
            max_steps=64,
        )
        return jnp.sum(ys**2)

    # The solve jitted (eagerly it compiles its loops anyway, more slowly); the
    # Python loop of small steps eagerly (its ops compile once, cheaply).
    assert np.isclose(
        float(unrolled(field, y0)),
        float(eqx.filter_jit(via_solve)(field, y0)),
        rtol=1e-12,
    )
    want = eqx.filter_grad(unrolled)(field, y0)
    got = eqx.filter_jit(eqx.filter_grad(via_solve))(field, y0)
    assert tree_allclose(got, want, rtol=1e-10, atol=1e-12)

    if isinstance(solver, no.RK4):
        return  # one solver is enough for the (slow, eager) second-order check

    # Reverse over reverse: the gradient of the squared gradient norm (w.r.t.
    # the field's weights and y0) is exact as well.
    def squared_gradient(loss):
        grads = lambda both: eqx.filter_grad(lambda both: loss(*both))(both)
        norm = lambda both: sum(jnp.sum(g**2) for g in jax.tree.leaves(grads(both)))
        return eqx.filter_grad(norm)((field, y0))

    second_want = squared_gradient(unrolled)
    second_got = eqx.filter_jit(squared_gradient)(via_solve)
    assert tree_allclose(second_got, second_want, rtol=1e-9, atol=1e-11)


def test_closure_over_traced_array():
    def loss(k):
        ys = no.odeint(
            lambda t, y, args: -k * y, jnp.array(1.0), jnp.array([0.0, 2.0]), **TOL
        )
        return ys[-1]

    k = 0.8
    assert np.isclose(float(jax.grad(loss)(k)), -2.0 * np.exp(-2.0 * k), rtol=1e-8)
    assert np.isclose(
        float(jax.jit(jax.grad(loss))(k)), -2.0 * np.exp(-2.0 * k), rtol=1e-8
    )


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=adjoint_name)
def test_gradient_under_vmap(adjoint):
    def loss(y0, k, ts):
        return no.odeint(lambda t, y, k: -k * y, y0, ts, k, adjoint=adjoint, **TOL)[-1]

    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(
        jnp.array([1.0, 2.0]),
        jnp.array([0.5, 1.5]),
        jnp.array([[0.0, 1.0], [0.0, 2.0]]),
    )
    y0, k, t1 = np.array([1.0, 2.0]), np.array([0.5, 1.5]), np.array([1.0, 2.0])
    assert np.allclose(grads[0], np.exp(-k * t1), rtol=1e-8)
    assert np.allclose(grads[1], -t1 * y0 * np.exp(-k * t1), rtol=1e-8)
    assert np.allclose(grads[2][:, 1], -k * y0 * np.exp(-k * t1), rtol=1e-7)
    assert np.allclose(grads[2][:, 0], k * y0 * np.exp(-k * t1), rtol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("adjoint", ADJOINTS, ids=adjoint_name)
def test_gradient_of_gradient(adjoint):
    def inner(k):
        ys = no.odeint(forced, Y0, TS, {"k": k, "w": ARGS["w"]}, adjoint=adjoint, **TOL)
        return jnp.sum(ys**2)

    second = jax.jit(jax.grad(jax.grad(inner)))(ARGS["k"])
    first = jax.jit(jax.grad(inner))
    eps = 1e-5
    fd = (first(ARGS["k"] + eps) - first(ARGS["k"] - eps)) / (2 * eps)
    assert np.isclose(float(second), float(fd), rtol=1e-6)


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=adjoint_name)
def test_second_derivative_under_vmap_matches_closed_form(adjoint):
    """d²/dk² of y(T) for dy/dt = -k y is T² y0 exp(-kT), batched over k."""

    def y_end(k, y0, t1):
        ts = jnp.stack([jnp.zeros_like(t1), t1])
        f = lambda t, y, k: -k * y
        return no.odeint(f, y0, ts, k, adjoint=adjoint, **TOL)[-1]

    k = jnp.array([0.3, 0.8, 1.5])
    y0, t1 = jnp.array([1.0, 2.0, -0.5]), jnp.array([1.0, 0.5, 2.0])
    second = jax.jit(jax.vmap(jax.grad(jax.grad(y_end))))(k, y0, t1)
    want = np.asarray(t1**2 * y0 * jnp.exp(-k * t1))
    assert np.allclose(second, want, rtol=1e-7)


def test_integer_and_boolean_args_get_no_gradient():
    def field(t, y, args):
        return -args["k"] * y * args["n"] * jnp.where(args["flag"], 1.0, 2.0)

    def loss(k):
        args = {"k": k, "n": jnp.array(2), "flag": jnp.array(True)}
        return no.odeint(field, jnp.array(1.0), jnp.array([0.0, 1.0]), args, **TOL)[-1]

    assert np.isclose(float(jax.grad(loss)(0.5)), -2.0 * np.exp(-1.0), rtol=1e-8)


def test_forward_mode_jvp_and_jacfwd():
    def solve(y0):
        return no.odeint(forced, y0, TS, ARGS, adjoint=no.ForwardMode(), **TOL)

    jac = jax.jacfwd(solve)(Y0)
    fd = np.stack(
        [
            (solve(Y0.at[i].add(1e-6)) - solve(Y0.at[i].add(-1e-6))) / 2e-6
            for i in range(3)
        ],
        axis=-1,
    )
    assert np.allclose(jac, fd, rtol=1e-6, atol=1e-8)
    _, tangent = jax.jvp(solve, (Y0,), (jnp.array([1.0, 0.0, 0.0]),))
    assert np.allclose(tangent, fd[..., 0], rtol=1e-6, atol=1e-8)


def test_custom_vjp_adjoint_refuses_forward_mode():
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda y0: no.odeint(forced, y0, TS, ARGS), (Y0,), (Y0,))


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=adjoint_name)
def test_float32_gradients(adjoint):
    def loss(k):
        ys = no.odeint(
            lambda t, y, k: -k * y,
            jnp.float32(1.0),
            jnp.array([0.0, 1.0], jnp.float32),
            k,
            adjoint=adjoint,
        )
        return ys[-1]

    g = jax.grad(loss)(jnp.float32(0.5))
    assert g.dtype == jnp.float32
    assert np.isclose(float(g), -np.exp(-0.5), rtol=1e-4)


def _many_parameter_problem(key):
    field = MLPField(eqx.nn.MLP(3, 2, 96, 2, activation=jnp.tanh, key=key), 1.0)
    return field, jnp.array([0.5, -1.0]), jnp.array([0.0, 2.0])


@pytest.mark.slow
def test_seminorm_agrees_and_needs_fewer_backward_evaluations(key):
    field, y0, ts = _many_parameter_problem(key)
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(field, eqx.is_array)))
    assert n_params > 9_000

    def loss(field, adjoint):
        return jnp.sum(
            no.odeint(field, y0, ts, adjoint=adjoint, rtol=1e-6, atol=1e-8)[-1] ** 2
        )

    semi = no.BacksolveAdjoint(seminorm=True)
    full = no.BacksolveAdjoint(seminorm=False)
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    g_semi = grad(field, semi)
    g_full = grad(field, full)
    assert tree_allclose(g_semi, g_full, rtol=1e-4, atol=1e-7)
    stats = eqx.filter_jit(
        lambda field, adjoint: no.backward_stats(
            field, y0, ts, adjoint=adjoint, rtol=1e-6, atol=1e-8
        )
    )
    n_semi = int(stats(field, semi)["num_fevals"])
    n_full = int(stats(field, full)["num_fevals"])
    assert n_semi <= n_full, (n_semi, n_full)


def test_backward_stats_counts_and_is_jittable():
    stats = jax.jit(lambda k: no.backward_stats(lambda t, y, k: -k * y, Y0, TS, k))(
        jnp.array(0.7)
    )
    steps = int(stats["num_steps"])
    assert steps == int(stats["num_accepted"]) + int(stats["num_rejected"])
    assert steps > 0 and int(stats["num_fevals"]) > 6 * int(stats["num_accepted"])
    assert int(stats["result"]) == 0
    with pytest.raises(TypeError, match="BacksolveAdjoint"):
        no.backward_stats(forced, Y0, TS, ARGS, adjoint=no.CheckpointAdjoint())


def contracting_field(key, rate=1.0, width=64):
    """A 2→width→width→2 tanh MLP whose flow contracts to a fixed point at rate."""
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (2, width)) / np.sqrt(2)
    w2 = jax.random.normal(k2, (width, width)) / np.sqrt(width)
    b1 = jnp.zeros(width)
    b2 = jnp.zeros(width)
    star = jnp.array([0.5, -0.5])
    h1 = jnp.tanh(star @ w1 + b1)
    h2 = jnp.tanh(h1 @ w2 + b2)
    jac = (w1 * (1 - h1**2)) @ (w2 * (1 - h2**2))
    w3 = -rate * jnp.linalg.pinv(jac)
    b3 = -(h2 @ w3)
    params = (w1, b1, w2, b2, w3, b3)

    def field(t, y, p):
        w1, b1, w2, b2, w3, b3 = p
        return jnp.tanh(jnp.tanh(y @ w1 + b1) @ w2 + b2) @ w3 + b3

    return field, params


@pytest.mark.slow
def test_long_horizon_gradient_matches_reference(key):
    """T = 100 on a contracting flow: backsolve with checkpoints stays accurate."""
    field, params = contracting_field(key)
    y0 = jax.random.normal(jax.random.key(3), (16, 2))
    ts = jnp.array([0.0, 100.0])

    def loss(params, adjoint, tol):
        ys = no.odeint(
            field,
            y0,
            ts,
            params,
            adjoint=adjoint,
            rtol=tol,
            atol=tol * 1e-2,
            max_steps=20_000,
        )
        return jnp.sum(ys[-1] ** 2)

    ref = jax.grad(loss)(params, no.CheckpointAdjoint(), 1e-11)
    got = jax.grad(loss)(params, no.BacksolveAdjoint(), 1e-6)
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(got, ref, strict=True))
    den = sum(float(jnp.sum(b**2)) for b in ref)
    assert np.sqrt(num / den) < 1e-3


def _temp_bytes(horizon, adjoint, field, params, y0):
    ts = jnp.array([0.0, horizon])

    def loss(params):
        ys = no.odeint(field, y0, ts, params, adjoint=adjoint, max_steps=20_000)
        return jnp.sum(ys[-1] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_backsolve_memory_does_not_grow_with_the_horizon(key):
    field, params = contracting_field(key, width=32)
    y0 = jax.random.normal(jax.random.key(3), (16, 2))
    small = _temp_bytes(5.0, no.BacksolveAdjoint(), field, params, y0)
    large = _temp_bytes(100.0, no.BacksolveAdjoint(), field, params, y0)
    assert large <= 1.5 * small, (small, large)
    # Keeping every step, the checkpointed adjoint's buffers grow with
    # max_steps instead.
    check = _temp_bytes(5.0, no.CheckpointAdjoint(None), field, params, y0)
    assert check > 10 * small


def _thinned_record(slots: int):
    """The step record of a 40-odd-step solve of the forced problem."""
    config = no._integrate.SolverConfig(
        no.Dopri5(), no.PIController(), 1e-9, 1e-11, None, 256, None
    )
    f = lambda t, y: (forced(t, y[0], ARGS),)
    options = no._integrate.LoopOptions(record_steps=True, record_slots=slots)
    _, stats, record = no._integrate.integrate(
        config, f, (Y0,), jnp.array([0.0, 6.0]), options=options
    )
    return stats, record


@pytest.mark.parametrize("slots", [2, 3, 8])
def test_record_keeps_every_strideth_step(slots):
    _, full = _thinned_record(None)
    stats, record = _thinned_record(slots)
    count, stride = int(record.count), int(record.stride)
    assert count == int(full.count) == int(stats.num_accepted) and count > 8 * slots
    assert np.array_equal(record.times, full.times)
    # The stride doubles at step slots·S: the smallest power of 2 with room.
    assert stride == next(s for s in 2 ** np.arange(12) if -(-count // s) <= slots)
    assert stride <= no._integrate.thinned_stride(slots, 256) <= 2 * 256 // slots
    # Slot j holds step j·stride, one spare slot more.
    assert record.y_starts[0].shape[0] == slots + 1
    for j, k in enumerate(range(0, count, stride)):
        assert np.array_equal(record.y_starts[0][j], full.y_starts[0][k])


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [2])
def test_thinned_checkpoint_gradients_equal_keeping_every_step(checkpoints):
    """Recomputing dropped states changes nothing but memory: first and second
    derivatives (w.r.t. y0, args and ts, with interior outputs) agree with
    keeping every step, also under vmap."""
    ts = jnp.linspace(0.0, 6.0, 7)
    loss = lambda y0, args, adjoint: _loss(y0, args, ts, adjoint)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    want = grad(Y0, ARGS, no.CheckpointAdjoint(None))
    got = grad(Y0, ARGS, no.CheckpointAdjoint(checkpoints))
    assert tree_allclose(got, want, rtol=1e-11, atol=1e-13)

    def curvature(k, adjoint):
        g = jax.grad(loss, argnums=1)(Y0, {"k": k, "w": ARGS["w"]}, adjoint)
        return g["k"]

    second = jax.jit(jax.vmap(jax.grad(curvature), (0, None)), static_argnums=1)
    ks = jnp.array([0.4, 0.7])
    want = second(ks, no.CheckpointAdjoint(None))
    got = second(ks, no.CheckpointAdjoint(checkpoints))
    assert np.allclose(got, want, rtol=1e-9, atol=1e-12), (got, want)


def test_checkpoint_memory_is_bounded_by_its_slots(key):
    field, params = contracting_field(key, width=32)
    y0 = jax.random.normal(jax.random.key(3), (16, 2))
    every = _temp_bytes(5.0, no.CheckpointAdjoint(None), field, params, y0)
    bounded = _temp_bytes(5.0, no.CheckpointAdjoint(), field, params, y0)
    state = y0.size * y0.dtype.itemsize
    # max_steps = 20000 states against 256 kept and 128 recomputed ones.
    assert no._integrate.thinned_stride(256, 20_000) == 128
    assert every > 20_000 * state > 8 * bounded, (every, bounded)


def test_bad_checkpoints_are_refused():
    with pytest.raises(ValueError, match="checkpoints must be at least 2"):
        no.CheckpointAdjoint(1)
    with pytest.raises(TypeError, match="checkpoints must be an int or None"):
        no.CheckpointAdjoint(64.0)
    with pytest.raises(TypeError, match="checkpoints must be an int"):
        no.BacksolveAdjoint(checkpoints=2.5)


def test_thinned_checkpoint_gradients_of_pytree_states():
    """A pytree state: thinned, the gradients equal those of keeping every step."""

    def field(t, y, k):
        a, b = y["a"], y["b"]
        return {
            "a": -k * a + jnp.sin(t) * b[:2],
            "b": jnp.concatenate([a * b[:2], -b[2:]]),
        }

    y0 = {"a": jnp.array([1.0, 0.5]), "b": jnp.array([0.3, -0.2, 1.0])}
    ts = jnp.linspace(0.0, 5.0, 6)

    def loss(k, y0, adjoint):
        ys = no.odeint(field, y0, ts, k, adjoint=adjoint, **TOL)
        return sum(jnp.sum(v**2) for v in jax.tree.leaves(ys))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    want = grad(0.7, y0, no.CheckpointAdjoint(None))
    assert tree_allclose(grad(0.7, y0, no.CheckpointAdjoint(2)), want, rtol=1e-12)
