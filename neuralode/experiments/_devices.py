"""Data parallelism over several devices (the `--devices` option).

Uses `neuralode.parallel` when the package provides it; otherwise a mesh with
one "batch" axis and `NamedSharding`s built here. Batches are split along
their leading axis, parameters and optimiser state are replicated, and
`jax.jit` inserts the gradient all-reduce.
"""

from __future__ import annotations

import importlib
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


class DataParallel:
    """Place batches split over `num_devices` devices and replicate the rest.

    With `num_devices=None` or 1 both methods return their input unchanged.
    """

    def __init__(self, num_devices: int | None):
        self.num_devices = 1 if num_devices is None else num_devices
        self.mesh: Mesh | None = None
        self._parallel = None
        if self.num_devices == 1:
            return
        available = len(jax.devices())
        if self.num_devices > available:
            raise ValueError(
                f"--devices {self.num_devices} asks for more devices than the "
                f"{available} JAX sees. On CPU, set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={self.num_devices} before "
                "JAX starts (the command line does this for you)."
            )
        try:
            self._parallel = importlib.import_module("neuralode.parallel")
            self.mesh = self._parallel.data_mesh(self.num_devices, axis="batch")
        except (ImportError, AttributeError):
            self._parallel = None
            devices = np.asarray(jax.devices()[: self.num_devices])
            self.mesh = Mesh(devices, ("batch",))

    def check_batch_size(self, batch_size: int) -> None:
        """Raise if `batch_size` does not split evenly over the devices."""
        if batch_size % self.num_devices:
            raise ValueError(
                f"The batch size {batch_size} must be a multiple of --devices "
                f"{self.num_devices}."
            )

    def shard(self, batch: PyTree) -> PyTree:
        """Split every leaf of `batch` along its leading axis over the devices."""
        if self.mesh is None:
            return batch
        if self._parallel is not None:
            return self._parallel.shard_batch(batch, self.mesh)
        sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
        return jax.device_put(batch, sharding)

    def replicate(self, tree: Any) -> Any:
        """Copy every array leaf of `tree` to all the devices."""
        if self.mesh is None:
            return tree
        if self._parallel is not None:
            return self._parallel.replicate(tree, self.mesh)
        sharding = NamedSharding(self.mesh, PartitionSpec())
        arrays, static = eqx.partition(tree, eqx.is_array)
        return eqx.combine(jax.device_put(arrays, sharding), static)
