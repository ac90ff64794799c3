"""Data-parallel solving and training over a device mesh (JAX sharding).

Two ways to solve a sharded batch: one ODE over the whole batch with a shared
step size (`jax.jit` on arrays placed by `shard_batch`; the error norm becomes
an all-reduce), or one ODE per sample (`sharded_vmap`, each device looping over
its own samples). The documentation's page on many devices (docs/devices.md)
shows both in use.
"""

from ._sharding import (
    batch_sharding as batch_sharding,
    data_mesh as data_mesh,
    replicate as replicate,
    replicated_sharding as replicated_sharding,
    shard_batch as shard_batch,
    sharded_vmap as sharded_vmap,
)
