"""InterpolatingAdjoint: gradients against CheckpointAdjoint and central
differences w.r.t. y0, args, ts and an equinox field's parameters, pytree
states, backward-in-time solves, vmap/jit, the models, a stiff problem with
implicit solvers, the backward pass's cost on the contracting benchmark flow,
and its refusals. Each test compiles as little as it can: CI's budget."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralode as no
from benchmarks.fields import mlp_field
from benchmarks.problems import get_problem
from neuralode.datasets._stiff_systems import ROBERTSON_RATES, robertson

# A nonlinear, time-dependent field whose flow neither contracts nor grows much.
MATRIX = jnp.array([[-0.3, 1.0, 0.0], [-1.0, -0.2, 0.4], [0.0, -0.4, -0.1]])


def field(t, y, args):
    return MATRIX @ y + args["k"] * jnp.sin(t) * jnp.tanh(y) ** 2


TS = jnp.array([0.0, 0.4, 1.3, 2.0])
Y0 = jnp.array([1.0, -0.5, 0.3])
ARGS = {"k": jnp.array(0.7)}
# Few kept states and a small window: the record thins (stride > 1) and the
# backward pass crosses several windows and outputs.
THINNED = no.InterpolatingAdjoint(checkpoints=4, window=2)


def loss(y0, args, ts, adjoint):
    ys = no.odeint(
        field, y0, ts, args, rtol=1e-10, atol=1e-12, max_steps=256, adjoint=adjoint
    )
    return jnp.sum(jnp.cos(ys[1:]) * jnp.arange(1.0, 4.0))


def test_gradients_match_checkpoint_adjoint_under_jit_and_vmap():
    """∇ w.r.t. y0, args and ts (thinned record, several windows and outputs),
    vmapped over y0, against the exact derivative of the discrete solve."""
    gradient = jax.grad(loss, argnums=(0, 1, 2))
    batched = jax.jit(
        jax.vmap(gradient, in_axes=(0, None, None, None)), static_argnums=3
    )
    y0s = jnp.stack([Y0, -0.5 * Y0])
    got = batched(y0s, ARGS, TS, THINNED)
    exact = jax.jit(gradient, static_argnums=3)
    for i, y0 in enumerate(y0s):
        row = jax.tree.map(lambda x: x[i], got)
        expected = exact(y0, ARGS, TS, no.CheckpointAdjoint())
        for g, e in zip(jax.tree.leaves(row), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-7, atol=1e-8)


def test_cnf_gradient_matches_central_differences(key):
    """A `CNF` log-density (exact trace) is a backward-in-time solve of a pytree
    state (z, Δlog p) with an equinox field: the directional derivatives of
    its mean w.r.t. the field's parameters and the data (the initial state)
    against float64 central differences."""
    cnf = no.CNF(
        no.nn.MLPField(2, 8, 1, key=key), trace="exact", rtol=1e-9, atol=1e-11,
        adjoint=no.InterpolatingAdjoint(),
    )  # fmt: skip
    x = jnp.array([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]])
    params, static = eqx.partition((cnf, x), eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def objective(p):
        cnf, x = eqx.combine(unravel(p), static)
        return jnp.mean(cnf.log_prob(x) * jnp.arange(1.0, 4.0))

    # One program for the values and the gradient: one compilation.
    value_and_grad = jax.jit(jax.value_and_grad(objective))
    value = lambda p: value_and_grad(p)[0]
    grad = value_and_grad(flat)[1]
    assert np.all(np.abs(grad) > 0)  # every parameter and point gets a gradient
    for seed in range(3):
        v = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
        eps = 1e-5
        fd = (value(flat + eps * v) - value(flat - eps * v)) / (2 * eps)
        np.testing.assert_allclose(grad @ v, fd, rtol=1e-7)


def test_neural_ode_accepts_it(key):
    """`NeuralODE` passes the adjoint to its solve (traced, not compiled: the
    solve and its gradient are the ones tested above)."""
    model = no.NeuralODE(
        no.nn.MLPField(2, 4, 1, key=key), adjoint=no.InterpolatingAdjoint()
    )
    loss = lambda model: jnp.sum(model(jnp.ones(2)) ** 2)
    grads = eqx.filter_eval_shape(eqx.filter_grad(loss), model)
    assert jax.tree.structure(grads) == jax.tree.structure(
        eqx.filter(model, eqx.is_inexact_array)
    )


def robertson_loss(log_k, solver, adjoint):
    ts = jnp.array([0.0, 1e-2, 1.0, 10.0])
    ys = no.odeint(
        robertson, jnp.array([1.0, 0.0, 0.0]), ts, jnp.exp(log_k),
        solver=solver, rtol=1e-8, atol=1e-12, adjoint=adjoint, max_steps=20000,
    )  # fmt: skip
    return jnp.sum(ys[1:, 0]) + 1e4 * jnp.sum(ys[1:, 1])


#: CheckpointAdjoint's gradient of `robertson_loss` with Rodas5P (the exact
#: derivative of that discrete solve; recompute with
#: jax.grad(robertson_loss)(log k, no.Rodas5P(), no.CheckpointAdjoint())). The
#: solvers' solutions agree to ~1e-7 at rtol=1e-8; stored, it costs this test
#: no compilation.
ROBERTSON_CHECKPOINT_GRADIENT = np.array(
    [0.209974424587, -0.408214093078, -0.018006315154]
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver", [no.Rodas5P(), no.Kvaerno5()], ids=lambda solver: type(solver).__name__
)
def test_robertson_rates_match_checkpoint_adjoint(solver):
    """Robertson's stiff kinetics: the adjoint solve runs with the same
    implicit method. AutoSwitch, whose compilation alone takes as long as
    both of these, agrees as well (checked by hand: 5e-7)."""
    log_k = jnp.log(jnp.array(ROBERTSON_RATES))
    grad = jax.jit(jax.grad(robertson_loss), static_argnums=(1, 2))
    got = grad(log_k, solver, no.InterpolatingAdjoint())
    np.testing.assert_allclose(got, ROBERTSON_CHECKPOINT_GRADIENT, rtol=1e-5)


def test_backward_evaluations_on_the_contracting_flow():
    """At T = 1, 10, 100 the adjoint solve costs at most 1.5x the forward
    evaluations (the recomputation of the forward steps, reported apart,
    costs about one forward solve), where BacksolveAdjoint's grows to 4x."""
    problem = get_problem("mem-T100", quick=True)
    params = jax.tree.map(jnp.asarray, problem.params)
    y0 = jnp.asarray(problem.y0)
    options = dict(rtol=problem.rtol, atol=problem.atol, max_steps=problem.max_steps)

    @jax.jit
    def counts(t1):
        ts = jnp.stack([jnp.zeros_like(t1), t1])
        forward = no.solve(mlp_field, y0, ts, params, throw=False, **options)
        backward = no.backward_stats(
            mlp_field, y0, ts, params, adjoint=no.InterpolatingAdjoint(), **options
        )
        return forward.stats["num_fevals"], backward

    for t1 in (1.0, 10.0, 100.0):
        forward, backward = counts(jnp.asarray(t1))
        assert int(backward["result"]) == 0
        assert int(backward["num_fevals"]) <= 1.5 * int(forward), (
            t1,
            forward,
            backward,
        )
        recomputed = int(backward["num_recomputed_fevals"])
        assert recomputed <= int(forward) + 1, (t1, forward, recomputed)


def test_options_are_checked():
    with pytest.raises(ValueError, match="InterpolatingAdjoint: rtol must be >= 0"):
        no.InterpolatingAdjoint(rtol=-1.0)
    with pytest.raises(ValueError, match="rtol and atol cannot both be zero"):
        no.InterpolatingAdjoint(rtol=0.0, atol=0.0)
    with pytest.raises(TypeError, match="InterpolatingAdjoint: atol must be a number"):
        no.InterpolatingAdjoint(atol="1e-6")
    with pytest.raises(ValueError, match="checkpoints must be at least 2"):
        no.InterpolatingAdjoint(checkpoints=1)
    with pytest.raises(TypeError, match="window must be an int"):
        no.InterpolatingAdjoint(window=2.5)
    with pytest.raises(TypeError, match="measures the backward pass of"):
        no.backward_stats(field, Y0, TS, ARGS, adjoint=no.CheckpointAdjoint())


def test_second_derivatives_and_forward_mode_are_refused_by_name():
    scalar = lambda k: loss(Y0, {"k": k}, TS, no.InterpolatingAdjoint())
    k = jnp.array(0.7)
    # Refused while tracing, before anything is compiled.
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        jax.jit(jax.grad(jax.grad(scalar))).trace(k)
    with pytest.raises(TypeError, match="pass adjoint=neuralode.ForwardMode()"):
        jax.jvp(scalar, (k,), (k,))
