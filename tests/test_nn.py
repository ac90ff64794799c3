"""Tests of the vector fields in `neuralode.nn`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import neuralode as no

FIELDS = {
    "mlp": lambda k: no.nn.MLPField(3, 8, 2, key=k),
    "mlp_autonomous": lambda k: no.nn.MLPField(3, 8, 2, key=k, time_dependent=False),
    "mlp_depth0": lambda k: no.nn.MLPField(3, 8, 0, key=k),
    "concat_squash": lambda k: no.nn.ConcatSquashMLP(3, 8, 2, key=k),
}


@eqx.filter_jit
def call(field, t, y):
    return field(t, y, None)


@pytest.fixture(params=sorted(FIELDS))
def field(request, key):
    return FIELDS[request.param](key)


def test_shapes_batch_axes_and_dtype(field, key):
    y = jr.normal(key, (2, 4, 3))
    out = call(field, 0.5, y)
    assert out.shape == y.shape and out.dtype == y.dtype
    # leading axes are batch axes: rows are mapped independently
    np.testing.assert_allclose(call(field, 0.5, y[1, 2]), out[1, 2], rtol=1e-12)
    np.testing.assert_allclose(call(field, 0.5, y[0]), out[0], rtol=1e-12)
    vmapped = eqx.filter_jit(jax.vmap(lambda r: field(0.5, r, None)))(y[0])
    np.testing.assert_allclose(vmapped, out[0], rtol=1e-12)
    out32 = call(field, 0.5, y.astype(jnp.float32))
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(out32, out, rtol=1e-4, atol=1e-5)


def test_jit_grad(field, key):
    y = jr.normal(key, (6, 3))

    @eqx.filter_jit
    def grads(f, y):
        loss = lambda f, y: jnp.sum(f(0.7, y, None) ** 2)
        return eqx.filter_grad(loss)(f, y), jax.grad(loss, argnums=1)(f, y)

    g, gy = grads(field, y)
    leaves = jax.tree.leaves(eqx.filter(g, eqx.is_array))
    assert leaves and all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in leaves)
    assert gy.shape == y.shape


def test_time_dependence(key):
    y = jr.normal(key, (4, 3))
    for name, f in ((n, FIELDS[n](key)) for n in ("mlp", "concat_squash")):
        assert not np.allclose(call(f, 0.0, y), call(f, 1.0, y)), name
    f = FIELDS["mlp_autonomous"](key)
    np.testing.assert_array_equal(call(f, 0.0, y), call(f, 1.0, y))
    assert f.time_weight is None


def test_mlp_matches_concatenated_time_input(key):
    f = FIELDS["mlp"](key)
    y, t = jr.normal(key, (5, 3)), 0.4

    @jax.jit
    def reference(y):
        w0 = jnp.concatenate([f.weights[0], f.time_weight[None, :]], axis=0)
        h = jnp.concatenate([y, jnp.full((5, 1), t)], axis=-1)
        for i, (w, b) in enumerate(zip([w0] + f.weights[1:], f.biases, strict=True)):
            h = h @ w + b
            if i < 2:
                h = jnp.tanh(h)
        return h

    np.testing.assert_allclose(call(f, t, y), reference(y), rtol=1e-12)


def test_mlp_options(key):
    y = jr.normal(key, (5, 3))
    f0 = no.nn.MLPField(3, 8, 2, key=key, zero_init=True)
    np.testing.assert_array_equal(call(f0, 0.3, y), jnp.zeros_like(y))
    g = eqx.filter_jit(eqx.filter_grad(lambda f: jnp.sum(f(0.3, y, None))))(f0)
    assert float(jnp.max(jnp.abs(g.weights[-1]))) > 0
    f = no.nn.MLPField(3, 8, 2, key=key, final_activation=jnp.tanh, scale=0.1)
    np.testing.assert_allclose(
        call(f, 0.3, y), 0.1 * jnp.tanh(call(FIELDS["mlp"](key), 0.3, y)), rtol=1e-12
    )
    f32 = no.nn.MLPField(3, 8, 2, key=key, dtype=jnp.float32)
    assert f32.weights[0].dtype == jnp.float32


def test_concat_squash_layer_formula(key):
    f = no.nn.ConcatSquashMLP(3, 8, 0, key=key)
    y, t = jr.normal(key, (4, 3)), 0.8
    gate = jax.nn.sigmoid(t * f.gate_weights[0] + f.gate_biases[0])
    expected = (y @ f.weights[0] + f.biases[0]) * gate + t * f.time_shifts[0]
    np.testing.assert_allclose(call(f, t, y), expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "concat_squash"])
def test_bad_input(name, key):
    f = FIELDS[name](key)
    cls = type(f)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        f(0.0, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        f(0.0, jnp.ones(()))
    with pytest.raises(ValueError, match="depth"):
        cls(3, 8, -1, key=key)
    with pytest.raises(ValueError, match="data_size"):
        cls(0, 8, 1, key=key)
