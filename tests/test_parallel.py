"""Data-parallel solving on a 4-device CPU mesh, against the same on 1 device.

The main pytest process has JAX initialised with one CPU device, so the checks
run in two child processes started at once: one with
`--xla_force_host_platform_device_count=4` (sharded solves, gradients and a
training step, compiler warnings captured from its stderr) and one with a single
device computing the references. Each prints its results as JSON; float64
values survive JSON exactly.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralode.parallel as npar

from .conftest import FAST_COMPILE

_CHILD = r"""
import json, os, sys

NDEV = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={NDEV}"
)
os.environ["JAX_PLATFORMS"] = "cpu"
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

jax.config.update("jax_enable_x64", True)
import neuralode as no
import neuralode.parallel as npar

out = {"devices": jax.device_count()}
mesh = npar.data_mesh(NDEV)


def arrays(tree):
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return [np.asarray(x).tolist() for x in leaves]


def spec_ok(x, spec):
    s = x.sharding
    return isinstance(s, NamedSharding) and s.is_equivalent_to(
        NamedSharding(mesh, spec), x.ndim
    )


def replicated(tree):
    return all(
        x.sharding.is_fully_replicated
        for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    )


B, D = 8, 2
field = npar.replicate(
    no.nn.MLPField(D, 8, 1, key=jax.random.key(0), dtype=jnp.float64), mesh
)
y0_host = np.asarray(jax.random.normal(jax.random.key(1), (B, D), jnp.float64))
y0 = npar.shard_batch(y0_host, mesh)
target = npar.shard_batch(np.flip(y0_host, axis=1).copy(), mesh)
ts = jnp.linspace(0.0, 1.0, 3)
out["input_spec"] = spec_ok(y0, P("batch"))

# 1. Shared step size: one ODE over the whole batch (error norm all-reduced).
sol = eqx.filter_jit(lambda f, y: no.solve(f, y, ts))(field, y0)
out["shared"] = arrays(sol.ys)
out["shared_steps"] = int(sol.stats["num_steps"])
out["shared_spec"] = spec_ok(sol.ys, P(None, "batch"))

# 2. Per-sample step sizes: vmap, each device looping over its own samples.
one = lambda f, y: no.odeint(f, y, ts)
if NDEV > 1:
    per = npar.sharded_vmap(one, mesh, in_axes=(None, 0), out_axes=1)
else:
    per = jax.vmap(one, in_axes=(None, 0), out_axes=1)
ys = eqx.filter_jit(per)(field, y0)
out["vmap"] = arrays(ys)
out["vmap_spec"] = spec_ok(ys, P(None, "batch"))


# 3. CheckpointAdjoint gradients, per-sample mode, parameters replicated (their
# cotangents are summed over the devices by shard_map's transpose).
def ckpt(f, y):
    return no.odeint(f, y, ts, adjoint=no.CheckpointAdjoint(), max_steps=32)[-1]


def ckpt_loss(f, y):
    if NDEV > 1:
        per = npar.sharded_vmap(ckpt, mesh, in_axes=(None, 0))
    else:
        per = jax.vmap(ckpt, in_axes=(None, 0))
    return jnp.mean((per(f, y) - target) ** 2)


grads = eqx.filter_jit(eqx.filter_grad(ckpt_loss))(field, y0)
out["grad_checkpoint"] = arrays(grads)
out["grad_checkpoint_replicated"] = replicated(grads)

# 3b. The reversible and interpolating adjoints on the sharded batch as one ODE
# (shared step size), parameters replicated.
for name, adjoint in (
    ("reversible", no.ReversibleAdjoint()),
    ("interpolating", no.InterpolatingAdjoint()),
):
    loss = lambda f, y, adjoint=adjoint: jnp.mean(
        (no.odeint(f, y, ts, adjoint=adjoint)[-1] - target) ** 2
    )
    grads = eqx.filter_jit(eqx.filter_grad(loss))(field, y0)
    out["grad_" + name] = arrays(grads)
    out["grad_" + name + "_replicated"] = replicated(grads)

# 4. One optax step of a NeuralODE with BacksolveAdjoint (shared step size).
model = npar.replicate(
    no.NeuralODE(field, adjoint=no.BacksolveAdjoint(), rtol=1e-8, atol=1e-10), mesh
)
optim = optax.adam(1e-2)
opt_state = npar.replicate(optim.init(eqx.filter(model, eqx.is_array)), mesh)


@eqx.filter_jit
def train_step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2)
    )(model)
    updates, opt_state = optim.update(
        grads, opt_state, eqx.filter(model, eqx.is_array)
    )
    return eqx.apply_updates(model, updates), opt_state, loss, grads


model, opt_state, loss, grads = train_step(model, opt_state, y0, target)
out["train_loss"] = float(loss)
out["grad_backsolve"] = arrays(grads)
out["train_params"] = arrays(model)
out["train_grads_replicated"] = replicated(grads)

if NDEV > 1:
    # 5. throw=True still raises when a sharded solve fails.
    failing = eqx.filter_jit(
        lambda f, y: no.odeint(f, y, jnp.array([0.0, 50.0]), max_steps=2)
    )
    try:
        with no.reraise_failures():
            jax.block_until_ready(failing(field, y0))
        out["throw_message"] = None
    except no.SolveError as e:
        out["throw_message"] = str(e)[-300:]

    # 6. Per-sample solves under plain jax.jit of jax.vmap on the sharded batch:
    # the per-sample failure codes are reduced to the first failure by
    # collectives before the host check, so nothing is gathered (no warning).
    vmapped = eqx.filter_jit(jax.vmap(one, in_axes=(None, 0), out_axes=1))
    out["jit_vmap"] = arrays(vmapped(field, y0))

    # 7. Positive control: a host callback on the sharded state inside a loop
    # must produce the warning, so that its absence above means something.
    print("@@@CONTROL@@@", file=sys.stderr, flush=True)

    def control(x):
        def body(c):
            i, x = c
            shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
            return i + 1, x + jax.pure_callback(lambda v: np.asarray(v), shape, x)

        return jax.lax.while_loop(lambda c: c[0] < 2, body, (0, x))[1]

    jax.block_until_ready(jax.jit(control)(y0))
print("@@@JSON@@@" + json.dumps(out), flush=True)
"""

_WARNING = "Involuntary full rematerialization"


def _start(num_devices: int) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_COMPILE
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(num_devices)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    stdout, stderr = proc.communicate(timeout=300)
    lines = [line for line in stdout.splitlines() if line.startswith("@@@JSON@@@")]
    assert proc.returncode == 0 and lines, stderr[-4000:]
    return json.loads(lines[-1][len("@@@JSON@@@") :]), stderr


@pytest.fixture(scope="module")
def runs():
    procs = {n: _start(n) for n in (4, 1)}
    return {n: _finish(p) for n, p in procs.items()}


def _close(a, b, rtol=1e-12, atol=1e-13):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_sharded_compilation_has_no_involuntary_rematerialization(runs):
    (_, stderr), (_, stderr_1) = runs[4], runs[1]
    checked, control = stderr.split("@@@CONTROL@@@", 1)
    # The probe works: the control (a callback inside a loop) triggers it.
    assert _WARNING in control
    bad = [line[:400] for line in checked.splitlines() if _WARNING in line]
    assert not bad, "\n".join(bad)
    assert _WARNING not in stderr_1


@pytest.mark.slow
def test_sharded_solves_equal_unsharded(runs):
    (four, _), (one, _) = runs[4], runs[1]
    assert four["devices"] == 4 and one["devices"] == 1
    assert four["input_spec"]
    _close(four["shared"], one["shared"])
    assert four["shared_steps"] == one["shared_steps"]
    _close(four["vmap"], one["vmap"])
    _close(four["jit_vmap"], one["vmap"])
    # Outputs keep the batch sharding: ys has shape (len(ts), batch, d).
    assert four["shared_spec"] and four["vmap_spec"]


@pytest.mark.slow
def test_sharded_gradients_equal_unsharded(runs):
    (four, _), (one, _) = runs[4], runs[1]
    _close(four["grad_checkpoint"], one["grad_checkpoint"])
    _close(four["grad_backsolve"], one["grad_backsolve"])
    assert four["grad_checkpoint_replicated"] and four["train_grads_replicated"]
    for name in ("reversible", "interpolating"):
        _close(four["grad_" + name], one["grad_" + name])
        _close(one["grad_" + name], one["grad_checkpoint"], rtol=1e-4, atol=1e-7)
        assert four["grad_" + name + "_replicated"]
    assert max(np.max(np.abs(g)) for g in one["grad_backsolve"]) > 1e-3


@pytest.mark.slow
def test_training_step_on_four_devices_equals_one(runs):
    (four, _), (one, _) = runs[4], runs[1]
    np.testing.assert_allclose(four["train_loss"], one["train_loss"], rtol=1e-12)
    _close(four["train_params"], one["train_params"])


@pytest.mark.slow
def test_throw_still_raises_on_a_failing_sharded_solve(runs):
    message = runs[4][0]["throw_message"]
    assert message is not None and "max_steps=2 reached" in message


# Single-device checks of the helpers, in this process.


def test_data_mesh_and_shardings():
    mesh = npar.data_mesh()
    assert mesh.axis_names == ("batch",) and mesh.size == jax.device_count()
    mesh = npar.data_mesh(1, axis="data")
    assert npar.batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    assert npar.replicated_sharding(mesh).is_fully_replicated
    with pytest.raises(ValueError, match="num_devices"):
        npar.data_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="no axis"):
        npar.batch_sharding(mesh, "batch")


def test_shard_batch_and_replicate_place_trees():
    mesh = npar.data_mesh(1)
    batch = {"x": np.ones((4, 2)), "y": jnp.zeros(4)}
    placed = npar.shard_batch(batch, mesh)
    assert all(
        x.sharding.is_equivalent_to(npar.batch_sharding(mesh), x.ndim)
        for x in jax.tree.leaves(placed)
    )
    tree = {"w": jnp.ones(3), "f": jnp.tanh}
    out = npar.replicate(tree, mesh)
    assert out["f"] is jnp.tanh and out["w"].sharding.is_fully_replicated
    with pytest.raises(ValueError, match="leading batch axis"):
        npar.shard_batch(np.float64(1.0), mesh)


def test_sharded_vmap_matches_vmap_on_one_device():
    mesh = npar.data_mesh(1)
    f = lambda a, x: a * jnp.sin(x)
    x = jnp.arange(4.0)
    out = jax.jit(npar.sharded_vmap(f, mesh, in_axes=(None, 0)))(2.0, x)
    np.testing.assert_allclose(out, jax.vmap(f, in_axes=(None, 0))(2.0, x))
    with pytest.raises(ValueError, match="in_axes"):
        npar.sharded_vmap(f, mesh, in_axes=(None,))(2.0, x)
