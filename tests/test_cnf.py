"""Tests of continuous normalizing flows (`neuralode.CNF`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import scipy.linalg

import neuralode as no

A = np.array([[0.3, 0.5], [0.2, -0.4]])
TIGHT = dict(rtol=1e-9, atol=1e-11)


class Linear(eqx.Module):
    """f(t, z) = A z for every row z."""

    a: jax.Array

    def __init__(self, a):
        self.a = jnp.asarray(a)

    def __call__(self, t, z, args):
        return z @ self.a.T


class PointField(eqx.Module):
    """A field written for one point: wraps `field` and refuses batches."""

    field: eqx.Module

    def __call__(self, t, z, args):
        assert z.shape == (2,), z.shape
        return self.field(t, z, args)


def point_linear(t, z, args):
    """f(t, z) = A z written for one point z of shape (2,)."""
    return jnp.asarray(A) @ z


def rows_only_linear(t, z, args):
    """f(t, z) = A z for every row of z; refuses a single point."""
    return jnp.einsum("ij,nj->ni", jnp.asarray(A), z)


def normal_log_prob(z):
    return -0.5 * np.sum(z**2, -1) - np.log(2 * np.pi) * z.shape[-1] / 2


def linear_log_prob(x, t0, t1):
    """log N(e^{-A(t1-t0)} x; 0, I) - (t1 - t0) tr A."""
    z0 = np.asarray(x) @ scipy.linalg.expm(-A * (t1 - t0)).T
    return normal_log_prob(z0) - (t1 - t0) * np.trace(A)


def simpson_weights(ts):
    w = np.ones(len(ts))
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w * abs(float(ts[1] - ts[0])) / 3


def test_linear_field_exact_and_regularizers(key):
    t0, t1 = 0.5, 2.0
    cnf = no.CNF(Linear(A), t0=t0, t1=t1, dim=2, **TIGHT)
    x = np.random.default_rng(0).standard_normal((3, 4, 2))
    logp, regs = eqx.filter_jit(lambda c, x: c.log_prob(x, regularize=True))(cnf, x)
    assert logp.shape == regs["kinetic"].shape == regs["jacobian"].shape == (3, 4)
    np.testing.assert_allclose(logp, linear_log_prob(x, t0, t1), rtol=1e-8)
    np.testing.assert_allclose(regs["jacobian"], (t1 - t0) * np.sum(A**2), rtol=1e-8)
    ts = np.linspace(t1, t0, 301)
    # z(t) = e^{A(t - t1)} x along the backward trajectory
    zs = np.stack([x @ scipy.linalg.expm(A * (t - t1)).T for t in ts])
    kinetic = np.tensordot(simpson_weights(ts), np.sum((zs @ A.T) ** 2, -1), 1)
    np.testing.assert_allclose(regs["kinetic"], kinetic, rtol=1e-7)
    # a single point gives a scalar
    assert jax.eval_shape(cnf.log_prob, x[0, 0]).shape == ()


def test_linear_field_hutchinson_converges(key):
    cnf = no.CNF(Linear(A), dim=2, trace="hutchinson", **TIGHT)
    x = np.random.default_rng(1).standard_normal((3, 2))
    reps = 2000
    # every replica of a point is its own row, so it gets its own probe
    logp = cnf.log_prob(np.broadcast_to(x, (reps, 3, 2)), key=jr.fold_in(key, 1))
    logp = np.asarray(logp)
    assert logp.std(0).min() > 1e-3  # really stochastic
    err = np.abs(logp.mean(0) - linear_log_prob(x, 0.0, 1.0))
    assert np.all(err < 5 * logp.std(0) / np.sqrt(reps))
    with pytest.raises(ValueError, match="key"):
        cnf.log_prob(x)


@pytest.mark.parametrize("batch", [2, 3])  # 2 == dim
def test_single_point_field_exact(key, batch):
    t0, t1 = 0.5, 2.0
    cnf = no.CNF(point_linear, t0=t0, t1=t1, dim=2, **TIGHT)
    assert not cnf.batched
    x = np.random.default_rng(4).standard_normal((batch, 2))
    logp, regs = eqx.filter_jit(lambda c, x: c.log_prob(x, regularize=True))(cnf, x)
    np.testing.assert_allclose(logp, linear_log_prob(x, t0, t1), rtol=1e-8)
    np.testing.assert_allclose(regs["jacobian"], (t1 - t0) * np.sum(A**2), rtol=1e-8)
    # sampling pushes z0 ~ N(0, I) through z(t1) = e^{A(t1 - t0)} z0
    z0 = jr.normal(key, (batch, 2), jnp.float64)
    expected = np.asarray(z0) @ scipy.linalg.expm(A * (t1 - t0)).T
    np.testing.assert_allclose(cnf.sample(key, batch), expected, rtol=1e-8)


@pytest.mark.parametrize("batch", [2, 3])  # 2 == dim
def test_single_point_field_hutchinson(key, batch):
    """The same probe gives the same estimate as the row-wise form of the field."""
    kw = dict(dim=2, trace="hutchinson", **TIGHT)
    point = no.CNF(point_linear, **kw)
    rows = no.CNF(rows_only_linear, batched=True, **kw)
    x = np.random.default_rng(5).standard_normal((batch, 2))
    logp, regs = point.log_prob(x, key=key, regularize=True)
    logp_rows, regs_rows = rows.log_prob(x, key=key, regularize=True)
    np.testing.assert_allclose(logp, logp_rows, rtol=1e-10)
    np.testing.assert_allclose(regs["jacobian"], regs_rows["jacobian"], rtol=1e-10)
    # a row-wise probe of one point differs from the exact trace: not exact
    assert not np.allclose(logp, linear_log_prob(x, 0.0, 1.0), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_mlp_field_same_as_single_point(key, trace):
    """MLPField on the batch and wrapped for one point: same values and gradients."""
    mlp = no.nn.MLPField(2, 16, 2, key=jr.fold_in(key, 3))
    kw = dict(trace=trace, rtol=1e-8, atol=1e-10)
    rows, point = no.CNF(mlp, **kw), no.CNF(PointField(mlp), dim=2, **kw)
    assert rows.batched and not point.batched
    x = np.random.default_rng(6).standard_normal((2, 2))

    def loss(cnf, x, key):
        logp, regs = cnf.log_prob(x, key=key, regularize=True)
        return -jnp.mean(logp) + jnp.mean(regs["kinetic"] + regs["jacobian"])

    @eqx.filter_jit
    def run(cnf, key):
        values = (
            cnf.log_prob(x, key=key),
            jax.vmap(lambda x, k: cnf.log_prob(x, key=k))(x, jr.split(key, 2)),
            cnf.sample_and_log_prob(key, 3),
        )
        return values, eqx.filter_grad(loss)(cnf, x, key)

    values, grads = run(rows, key)
    point_values, point_grads = run(point, key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
        (values, grads.field),
        (point_values, point_grads.field.field),
    )
    assert max(np.max(np.abs(g)) for g in jax.tree.leaves(grads.field)) > 0
    # a lambda closing over the field is treated as written for one point too
    # (jitted: an eager solve compiles its loop anyway, and more slowly)
    lam = no.CNF(lambda t, z, args: mlp(t, z, args), dim=2, **kw)
    lam_logp = eqx.filter_jit(lambda cnf, key: cnf.log_prob(x, key=key))(lam, key)
    np.testing.assert_allclose(lam_logp, values[0], rtol=1e-9)


def test_batched_declared_wrongly(key):
    x = np.ones((3, 2))
    with pytest.raises(
        ValueError, match=r"fails on one point .* pass `CNF\(\.\.\., batched=True\)`"
    ):
        no.CNF(rows_only_linear, dim=2).log_prob(x)
    with pytest.raises(
        ValueError, match=r"fails on the batch .* `CNF\(\.\.\., batched=False\)`"
    ):
        no.CNF(point_linear, batched=True).log_prob(x)
    with pytest.raises(
        ValueError, match=r"must return dz/dt of the shape of z, \(2,\)"
    ):
        no.CNF(lambda t, z, args: jnp.sum(z), dim=2).log_prob(x)
    with pytest.raises(TypeError, match="`batched` must be True, False or None"):
        no.CNF(point_linear, batched="yes")
    # with the dimension unknown, a wrong trailing axis fails in the field
    with pytest.raises(TypeError, match=r"calling field\(t, z, args\) on one point"):
        no.CNF(point_linear).log_prob(np.ones((4, 3)))
    np.testing.assert_allclose(
        no.CNF(rows_only_linear, batched=True, **TIGHT).log_prob(x),
        linear_log_prob(x, 0.0, 1.0),
        rtol=1e-8,
    )


@pytest.fixture
def mlp_cnf(key):
    field = no.nn.MLPField(2, 32, 2, key=jr.fold_in(key, 7))
    return no.CNF(field, rtol=1e-7, atol=1e-9)


@eqx.filter_jit
def _quadrature_integrands(field, x, ts):
    """‖f‖² and ‖∂f/∂z‖²_F along a dense trajectory from x at ts[0]."""
    zs = no.odeint(field, x, ts, rtol=1e-10, atol=1e-12)
    fs = jax.vmap(lambda t, z: field(t, z, None))(ts, zs)
    jac = jax.vmap(jax.vmap(jax.jacfwd(lambda z, t: field(t, z, None)), (0, None)))
    return jnp.sum(fs**2, -1), jnp.sum(jac(zs, ts) ** 2, (-1, -2))


def test_mlp_regularizers_match_quadrature(key, mlp_cnf):
    x = np.random.default_rng(2).standard_normal((4, 2))
    field = mlp_cnf.field
    _, regs = eqx.filter_jit(lambda c, x: c.log_prob(x, regularize=True))(mlp_cnf, x)
    ts = np.linspace(1.0, 0.0, 201)
    w = simpson_weights(ts)
    kinetic, frob = (
        np.tensordot(w, v, 1) for v in _quadrature_integrands(field, x, ts)
    )
    np.testing.assert_allclose(regs["kinetic"], kinetic, rtol=1e-5)
    np.testing.assert_allclose(regs["jacobian"], frob, rtol=1e-5)
    # Hutchinson (Gaussian probes): the kinetic term is probe-free and the
    # Jacobian term unbiased.
    hutch = no.CNF(field, trace="hutchinson", noise="gaussian", rtol=1e-7, atol=1e-9)
    reps = 500
    xr = np.broadcast_to(x, (reps, 4, 2))
    _, hregs = eqx.filter_jit(lambda c, x, k: c.log_prob(x, key=k, regularize=True))(
        hutch, xr, key
    )
    hkin, hjac = np.asarray(hregs["kinetic"]), np.asarray(hregs["jacobian"])
    np.testing.assert_allclose(hkin, np.broadcast_to(kinetic, (reps, 4)), rtol=1e-5)
    err = np.abs(hjac.mean(0) - frob)
    assert np.all(err < 5 * hjac.std(0) / np.sqrt(reps))


def test_density_integrates_to_one(key):
    # scale=3 makes the flow deform the base density substantially
    cnf = no.CNF(no.nn.MLPField(2, 64, 2, key=key, scale=3.0))
    n, half = 60, 6.0
    h = 2 * half / n
    grid = -half + h * (np.arange(n) + 0.5)
    x = np.stack(np.meshgrid(grid, grid), -1)
    density = np.exp(np.asarray(cnf.log_prob(x)))
    assert abs(np.sum(density) * h * h - 1.0) < 0.03
    base = np.exp(normal_log_prob(x))
    assert 0.5 * np.sum(np.abs(density - base)) * h * h > 0.2  # not the base


def test_sample_and_log_prob_consistent(key, mlp_cnf):
    @eqx.filter_jit
    def run(cnf, key):
        samples = cnf.sample(key, 16)
        z1, logp_forward = cnf.sample_and_log_prob(key, 16)
        return samples, z1, logp_forward, cnf.log_prob(z1), jax.vmap(cnf.log_prob)(z1)

    samples, z1, logp_forward, logp, logp_vmap = run(mlp_cnf, key)
    assert samples.shape == z1.shape == (16, 2) and logp_forward.shape == (16,)
    np.testing.assert_allclose(samples, z1, rtol=1e-6, atol=1e-8)
    # the forward-tracked density agrees with the backward log_prob
    np.testing.assert_allclose(logp, logp_forward, rtol=1e-5)
    # under vmap every point is its own ODE with its own steps
    np.testing.assert_allclose(logp_vmap, logp, rtol=1e-5)


def test_training_reduces_nll(key):
    """Exact trace, RNODE regularizers, optax, through the default adjoint."""
    data = np.random.default_rng(3).standard_normal((128, 2)) * 0.5 + [1.5, -1.0]
    cnf = no.CNF(no.nn.MLPField(2, 16, 1, key=key), rtol=1e-4, atol=1e-6)
    optim = optax.adam(5e-2)
    state = optim.init(eqx.filter(cnf, eqx.is_inexact_array))

    def loss_fn(cnf):
        logp, regs = cnf.log_prob(data, regularize=True)
        nll = -jnp.mean(logp)
        return nll + 0.01 * jnp.mean(regs["kinetic"] + regs["jacobian"]), nll

    @eqx.filter_jit
    def step(cnf, state):
        (_, nll), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(cnf)
        updates, state = optim.update(grads, state)
        return eqx.apply_updates(cnf, updates), state, nll, grads

    losses = []
    # optax's bias correction mixes int and float, which strict promotion rejects
    with jax.numpy_dtype_promotion("standard"):
        for i in range(25):
            cnf, state, nll, grads = step(cnf, state)
            losses.append(float(nll))
            if i == 0:
                leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
                assert all(np.all(np.isfinite(g)) for g in leaves)
                assert all(np.max(np.abs(g)) > 0 for g in leaves)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1.0


def test_bad_input(key, mlp_cnf):
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        mlp_cnf.log_prob(np.ones((4, 3)))
    with pytest.raises(ValueError, match="Unknown trace"):
        no.CNF(mlp_cnf.field, trace="exactly")
    with pytest.raises(ValueError, match="Unknown noise"):
        no.CNF(mlp_cnf.field, trace="hutchinson", noise="uniform")
    with pytest.raises(ValueError, match="t0 < t1"):
        no.CNF(mlp_cnf.field, t0=1.0, t1=0.0)
    with pytest.raises(ValueError, match="dim"):
        no.CNF(lambda t, z, a: z).sample(key, 3)
    with pytest.raises(ValueError, match="data_size"):
        no.CNF(mlp_cnf.field, dim=3)
    with pytest.raises(TypeError, match="`x` must be real"):
        mlp_cnf.log_prob(np.ones((4, 2)) * 1j)


@pytest.mark.parametrize(
    "num, error, message",
    [
        (0, ValueError, "`num` must be an int >= 1; got 0"),
        (-2, ValueError, "`num` must be an int >= 1; got -2"),
        (2.5, TypeError, "`num` must be an int; got 2.5"),
        (True, TypeError, "`num` must be an int; got True"),
    ],
)
def test_bad_num(key, mlp_cnf, num, error, message):
    with pytest.raises(error, match=message):
        mlp_cnf.sample(key, num)
    with pytest.raises(error, match=message):
        mlp_cnf.sample_and_log_prob(key, num)


def test_bad_key_and_dtype(key, mlp_cnf):
    hutch = no.CNF(mlp_cnf.field, trace="hutchinson")
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        hutch.log_prob(x)
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key .* got 0"):
        hutch.log_prob(x, key=0)
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key .* got 0"):
        mlp_cnf.sample(0, 3)
    with pytest.raises(ValueError, match=r"single PRNG key; .* shape \(2,\)"):
        hutch.log_prob(x, key=jr.split(key, 2))
    with pytest.raises(TypeError, match="`dtype` must be a real floating dtype"):
        mlp_cnf.sample(key, 3, dtype=jnp.int32)
    # raw uint32 keys still work
    assert hutch.log_prob(x, key=jr.PRNGKey(0)).shape == (3,)
    assert mlp_cnf.sample(jr.PRNGKey(0), np.int64(3)).shape == (3, 2)


def test_config_accepts_numpy_scalars(key, mlp_cnf):
    field = mlp_cnf.field
    cnf = no.CNF(point_linear, max_steps=np.int64(100), dim=np.int64(2))
    assert (cnf.max_steps, cnf.dim) == (100, 2)
    assert type(cnf.max_steps) is int and type(cnf.dim) is int
    with pytest.raises(ValueError, match="Need t0 < t1; got t0=1.0, t1=0.0"):
        no.CNF(field, t0=np.float32(1.0), t1=np.float32(0.0))
    with pytest.raises(TypeError, match="`max_steps` must be an int; got 2.5"):
        no.CNF(field, max_steps=2.5)
    with pytest.raises(ValueError, match="`max_steps` must be an int >= 1; got 0"):
        no.CNF(field, max_steps=0)
    with pytest.raises(ValueError, match="`dim` must be an int >= 1; got 0"):
        no.CNF(point_linear, dim=0)
    with pytest.raises(TypeError, match="`t1` must be a real scalar"):
        no.CNF(field, t1="1")
