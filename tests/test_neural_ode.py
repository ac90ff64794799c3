"""Tests of the `NeuralODE` layer."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import scipy.linalg

import neuralode as no

A_TRUE = np.array([[-0.1, 1.0], [-1.0, -0.1]])


class Linear(eqx.Module):
    """dy/dt = y A^T acting on the last axis."""

    a: jax.Array
    data_size: int = eqx.field(static=True)

    def __init__(self, a):
        self.a = jnp.asarray(a)
        self.data_size = self.a.shape[0]

    def __call__(self, t, y, args):
        return y @ self.a.T


def test_call_matches_matrix_exponential(key):
    model = no.NeuralODE(Linear(A_TRUE), t0=0.0, t1=1.5, rtol=1e-9, atol=1e-11)
    y0 = np.random.default_rng(0).standard_normal((4, 2))
    w = np.arange(8.0).reshape(4, 2)

    @eqx.filter_jit
    def value_and_cotangent(model, y0):
        out, vjp = jax.vjp(model, y0)
        return out, vjp(w)[0]

    out, g = value_and_cotangent(model, y0)
    np.testing.assert_allclose(
        out, y0 @ scipy.linalg.expm(1.5 * A_TRUE).T, rtol=1e-7, atol=1e-9
    )
    # the gradient with respect to the initial state, through the adjoint
    np.testing.assert_allclose(
        g, w @ scipy.linalg.expm(1.5 * A_TRUE), rtol=1e-6, atol=1e-8
    )


def test_trajectory_and_solve(key):
    field = no.nn.MLPField(3, 16, 1, key=key)
    model = no.NeuralODE(field, rtol=1e-6, atol=1e-8)
    y0 = np.random.default_rng(1).standard_normal((5, 3))
    ts = np.linspace(0.0, 1.0, 6)

    @eqx.filter_jit
    def run(model, y0):
        return model.trajectory(y0, ts), model.solve(y0)

    ys, sol = run(model, y0)
    assert ys.shape == (6, 5, 3)
    np.testing.assert_allclose(ys[0], y0)
    assert sol.ys.shape == (2, 5, 3)
    np.testing.assert_allclose(sol.ys[-1], ys[-1], rtol=1e-5, atol=1e-7)
    assert int(sol.stats["num_steps"]) > 0


def test_pytree_state():
    def field(t, y, args):
        return {"x": y["v"], "v": -y["x"]}

    model = no.NeuralODE(field, t1=np.pi / 2, rtol=1e-8, atol=1e-10)
    out = model({"x": np.array(1.0), "v": np.array(0.0)})
    np.testing.assert_allclose(out["x"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["v"], -1.0, rtol=1e-6)


def test_trains_as_a_layer_to_a_linear_flow(key):
    """encoder -> NeuralODE -> head, fitted with optax to y0 -> exp(A) y0."""
    keys = jr.split(key, 3)
    y0 = np.random.default_rng(2).standard_normal((64, 2))
    target = y0 @ scipy.linalg.expm(A_TRUE).T

    class Model(eqx.Module):
        encoder: eqx.nn.Linear
        ode: no.NeuralODE
        head: eqx.nn.Linear

        def __call__(self, x):
            h = jax.vmap(self.encoder)(x)
            return jax.vmap(self.head)(self.ode(h))

    model = Model(
        eqx.nn.Linear(2, 3, key=keys[0]),
        no.NeuralODE(no.nn.MLPField(3, 16, 1, key=keys[1], time_dependent=False)),
        eqx.nn.Linear(3, 2, key=keys[2]),
    )
    optim = optax.adam(3e-2)
    state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model):
        return jnp.mean((model(y0) - target) ** 2)

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, state = optim.update(grads, state)
        return eqx.apply_updates(model, updates), state, loss, grads

    losses = []
    # optax's bias correction mixes int and float, which strict promotion rejects
    with jax.numpy_dtype_promotion("standard"):
        for i in range(60):
            model, state, loss, grads = step(model, state)
            losses.append(float(loss))
            if i == 0:  # gradients reach every part of the model
                for part in (grads.encoder, grads.ode.field, grads.head):
                    leaves = jax.tree.leaves(eqx.filter(part, eqx.is_inexact_array))
                    assert all(np.all(np.isfinite(g)) for g in leaves)
                    assert all(np.max(np.abs(g)) > 0 for g in leaves)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] / 10


def test_augmentation(key):
    field = no.nn.MLPField(5, 8, 1, key=key)
    model = no.NeuralODE(field, augment=2)
    y0 = np.random.default_rng(3).standard_normal((4, 3))
    ts = np.linspace(0.0, 1.0, 3)

    @eqx.filter_jit
    def run(model, y0):
        return model(y0), model.trajectory(y0, ts)

    out, ys = run(model, y0)
    assert out.shape == (4, 5)
    assert model.project(out).shape == (4, 3)
    assert ys.shape == (3, 4, 5)
    np.testing.assert_array_equal(ys[0, :, 3:], 0.0)
    np.testing.assert_allclose(ys[0, :, :3], y0)
    np.testing.assert_allclose(ys[-1], out, rtol=1e-5, atol=1e-7)
    assert model.project(ys).shape == (3, 4, 3)
    # the augmented channels really evolve
    assert np.max(np.abs(out[:, 3:])) > 0
    # a single (unbatched) state
    assert jax.eval_shape(model, y0[0]).shape == (5,)
    assert no.NeuralODE(field).project(out) is out


def test_bad_arguments(key):
    field = no.nn.MLPField(5, 8, 1, key=key)
    with pytest.raises(ValueError, match="3 \\+ 1 = 4"):
        no.NeuralODE(field, augment=1)(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="augment"):
        no.NeuralODE(field, augment=-1)
    with pytest.raises(ValueError, match="pytree"):
        no.NeuralODE(lambda t, y, a: y, augment=1)({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="differ"):
        no.NeuralODE(field, t0=1.0, t1=1.0)
    with pytest.raises(TypeError, match="callable"):
        no.NeuralODE(3)


def test_numpy_integers_accepted(key):
    """Configuration takes NumPy integers, as `neuralode.solve` does."""
    field = no.nn.MLPField(3, 8, 1, key=key)
    y0 = np.random.default_rng(4).standard_normal((2, 2))
    model = no.NeuralODE(field, max_steps=np.int64(100), augment=np.int64(1))
    assert (model.max_steps, model.augment) == (100, 1)
    assert type(model.max_steps) is int and type(model.augment) is int
    expected = no.NeuralODE(field, max_steps=100, augment=1)(y0)
    np.testing.assert_allclose(model(y0), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(max_steps=2.5), TypeError, "`max_steps` must be an int; got 2.5"),
        (dict(max_steps=True), TypeError, "`max_steps` must be an int; got True"),
        (dict(max_steps=0), ValueError, "`max_steps` must be an int >= 1; got 0"),
        (dict(augment=1.0), TypeError, "`augment` must be an int; got 1.0"),
        (dict(augment=-1), ValueError, "`augment` must be an int >= 0; got -1"),
        (dict(t0=np.float32(1), t1=np.float32(1)), ValueError, "must differ"),
        (dict(t1="1"), TypeError, "`t1` must be a real scalar"),
        (dict(t1=np.inf), ValueError, "`t1` must be finite"),
    ],
)
def test_bad_config(key, kwargs, error, message):
    field = no.nn.MLPField(2, 8, 1, key=key)
    with pytest.raises(error, match=message):
        no.NeuralODE(field, **kwargs)
