"""Data parallelism with JAX's own SPMD machinery: meshes, shardings, shard_map.

Nothing here communicates by itself. `shard_batch` and `replicate` only place
arrays; the compiler (GSPMD/Shardy) partitions a `jax.jit`-ed solve and inserts
the collectives it needs, and `sharded_vmap` is `jax.shard_map` around
`jax.vmap`.
"""

from __future__ import annotations

import functools as ft
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


def data_mesh(
    num_devices: int | None = None,
    axis: str = "batch",
    *,
    # jax.Device is a compiled class that pyright sees only as a variable.
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
) -> Mesh:
    """A one-dimensional device mesh for data parallelism.

    The mesh has a single axis named `axis` over the first `num_devices` of
    `devices` (default `jax.devices()`, every device of every process once
    `jax.distributed.initialize` has run). The axis is of type `Auto`, so a
    `jax.jit`-ed computation on arrays sharded over it is partitioned by the
    compiler, which inserts the collectives (such as the all-reduce of a
    solver's error norm over the batch).

    **Arguments:**

    - `num_devices`: how many devices to use (default: all of them). With
      several processes it must be `None` or the global device count, since
      every process must take part.
    - `axis`: the name of the mesh axis (default `"batch"`).
    - `devices`: the devices to choose from (default `jax.devices()`).

    **Returns:** a `jax.sharding.Mesh` of shape `{axis: num_devices}`.
    """
    available = list(jax.devices() if devices is None else devices)
    if not available:
        raise ValueError("neuralode.parallel.data_mesh: no devices given")
    if num_devices is None:
        num_devices = len(available)
    if (
        isinstance(num_devices, bool)
        or not isinstance(num_devices, int | np.integer)
        or not 1 <= num_devices <= len(available)
    ):
        raise ValueError(
            "neuralode.parallel.data_mesh: num_devices must be an int between 1 and "
            f"the {len(available)} available devices, got {num_devices!r}"
        )
    chosen = available[: int(num_devices)]
    if jax.process_count() > 1 and len(chosen) != jax.device_count():
        raise ValueError(
            "neuralode.parallel.data_mesh: with several processes the mesh must "
            f"span all {jax.device_count()} devices, got num_devices={num_devices}"
        )
    return Mesh(np.asarray(chosen, dtype=object), (axis,), axis_types=(AxisType.Auto,))


def _axis_name(mesh: Mesh, axis: str | None) -> str:
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                "neuralode.parallel: the mesh has axes "
                f"{tuple(mesh.axis_names)}; say which one is the batch axis "
                "with axis=..."
            )
        return mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(
            f"neuralode.parallel: the mesh has no axis {axis!r}; its axes are "
            f"{tuple(mesh.axis_names)}"
        )
    return axis


def batch_sharding(mesh: Mesh, axis: str | None = None) -> NamedSharding:
    """The sharding of arrays split along their leading (batch) axis.

    **Arguments:**

    - `mesh`: the device mesh.
    - `axis`: the mesh axis to split over (default: the mesh's only axis).

    **Returns:** `NamedSharding(mesh, PartitionSpec(axis))`.
    """
    return NamedSharding(mesh, PartitionSpec(_axis_name(mesh, axis)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of arrays held whole on every device of `mesh`.

    **Arguments:**

    - `mesh`: the device mesh.

    **Returns:** `NamedSharding(mesh, PartitionSpec())`.
    """
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: PyTree, mesh: Mesh, axis: str | None = None) -> PyTree:
    """Split every array of `batch` along its leading axis over `mesh`.

    With one process each leaf is placed with `jax.device_put`; device `k` of
    the axis holds rows `[k·B/D, (k+1)·B/D)` of a leading axis of size `B` on
    `D` devices, so `B` must be a multiple of `D`.

    With several processes (after `jax.distributed.initialize`) each process
    passes only *its own* rows, and the leaves become global arrays whose
    leading axis is the concatenation of every process's rows in process order
    (`jax.make_array_from_process_local_data`); each process's row count must
    then be a multiple of its local device count.

    **Arguments:**

    - `batch`: a pytree of arrays (NumPy or JAX) with a common leading axis.
    - `mesh`: the device mesh, e.g. from `data_mesh`.
    - `axis`: the mesh axis to split over (default: the mesh's only axis).

    **Returns:** the same pytree of `jax.Array`s with sharding
    `NamedSharding(mesh, PartitionSpec(axis))`.
    """
    axis = _axis_name(mesh, axis)
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    multi_process = jax.process_count() > 1
    shards = mesh.shape[axis] // (jax.process_count() if multi_process else 1)

    def place(x: Any) -> jax.Array:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(
                "neuralode.parallel.shard_batch: every leaf needs a leading batch "
                "axis, got a scalar"
            )
        if x.shape[0] % shards:
            raise ValueError(
                "neuralode.parallel.shard_batch: a leading axis of size "
                f"{x.shape[0]} does not split evenly over {shards} devices of "
                f"mesh axis {axis!r}; pad or drop samples to a multiple of {shards}"
            )
        if multi_process:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(place, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every array leaf of `tree` whole on every device of `mesh`.

    For model parameters and optimiser states in data-parallel training.
    Non-array leaves (activation functions, static fields of an
    `equinox.Module`) are left as they are. With several processes every
    process must pass the same values (JAX checks this).

    **Arguments:**

    - `tree`: any pytree, e.g. an `equinox.Module` or an `optax` state.
    - `mesh`: the device mesh.

    **Returns:** `tree` with its arrays replicated,
    `NamedSharding(mesh, PartitionSpec())`.
    """
    sharding = replicated_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree
    )


def _spec(mapped_axis: int | None, axis: str) -> PartitionSpec:
    if mapped_axis is None:
        return PartitionSpec()
    return PartitionSpec(*([None] * mapped_axis), axis)


def _check_axis(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"neuralode.parallel.sharded_vmap: {what} must hold ints >= 0 or None, "
            f"got {value!r}"
        )
    return value


def sharded_vmap(
    fn: Callable,
    mesh: Mesh,
    *,
    in_axes: int | None | Sequence[int | None] = 0,
    out_axes: int = 0,
    axis: str | None = None,
) -> Callable:
    """`jax.vmap(fn)` with every device mapping over its own part of the batch.

    The result equals `jax.vmap(fn, in_axes, out_axes)(*args)`, computed as
    `jax.shard_map` over the mesh axis of a `jax.vmap` over each device's
    rows. This is the per-sample mode of batched solving: each sample is its
    own ODE with its own step sizes, and the solver's `while_loop` on a device
    runs only until *that device's* samples have finished, without any
    collective inside the loop. (A `jax.vmap` under plain `jax.jit` on a sharded
    batch also gives per-sample steps, but the compiler turns the batched
    loop's stopping test into an all-reduce, so every device iterates until the
    slowest sample of the whole batch has finished.)

    Unmapped arguments (`in_axes` entry `None`, such as the model) are
    replicated; when differentiating with respect to them, `jax.shard_map`
    sums their cotangents over the devices.

    **Arguments:**

    - `fn`: the per-sample function. Its outputs must be arrays (a pytree of
      them).
    - `mesh`: the device mesh, e.g. from `data_mesh`.
    - `in_axes`: for each positional argument, the axis mapped over (applied to
      every array leaf of that argument) or `None`; a single value applies to
      all arguments. Non-array leaves of the arguments (e.g. the activation
      function of an `equinox.Module`) are passed through unmapped. Mapped axes
      must have a size divisible by the number of devices on `axis`.
    - `out_axes`: where the mapped axis goes in every output (default 0).
    - `axis`: the mesh axis to split over (default: the mesh's only axis).

    **Returns:** a function of the same arguments as `fn`, whose outputs carry
    the mapped axis sharded over `axis`. Use it inside `jax.jit` (or
    `eqx.filter_jit`).
    """
    axis = _axis_name(mesh, axis)
    out_axis = _check_axis(out_axes, "out_axes")
    if out_axis is None:
        raise ValueError("neuralode.parallel.sharded_vmap: out_axes cannot be None")

    @ft.wraps(fn)
    def wrapped(*args: Any) -> Any:
        if isinstance(in_axes, Sequence):
            axes = tuple(_check_axis(a, "in_axes") for a in in_axes)
            if len(axes) != len(args):
                raise ValueError(
                    f"neuralode.parallel.sharded_vmap: in_axes has {len(axes)} "
                    f"entries for {len(args)} arguments"
                )
        else:
            axes = (_check_axis(in_axes, "in_axes"),) * len(args)
        if all(a is None for a in axes):
            raise ValueError(
                "neuralode.parallel.sharded_vmap: at least one argument must be mapped"
            )
        dynamic, static = eqx.partition(args, eqx.is_array)
        in_specs = tuple(_spec(a, axis) for a in axes)

        def local(*dynamic_args):
            def one(*dynamic_one):
                return fn(*eqx.combine(dynamic_one, static))

            return jax.vmap(one, in_axes=axes, out_axes=out_axis)(*dynamic_args)

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=_spec(out_axis, axis),
            check_vma=False,
        )(*dynamic)

    return wrapped
