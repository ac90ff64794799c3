"""The latent ODE of Rubanova et al. (2019) shared by the `spiral` and
`latent` experiments: a GRU encoder run backwards over the observations gives
q(z0) = N(μ, diag σ²); z(t) solves a `NeuralODE` from z0; an MLP decodes it.

Each experiment subclasses `LatentODEBase` with its own `encode` (what the
GRU reads) and sets `INPUTS` (the GRU's input size) and `OUTPUTS` (the
decoder's)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

import neuralode as no

DTYPE = jnp.float32


class LatentODEBase(eqx.Module):
    """GRU cell and posterior read-out → latent `NeuralODE` → MLP decoder
    (float32, elu, an autonomous latent field of two hidden layers)."""

    INPUTS: ClassVar[int]
    OUTPUTS: ClassVar[int]

    cell: eqx.nn.GRUCell
    to_posterior: eqx.nn.Linear
    ode: no.NeuralODE
    decoder: eqx.nn.MLP
    latent: int = eqx.field(static=True)

    def __init__(
        self,
        latent: int,
        hidden: int,
        width: int,
        *,
        rtol: float,
        atol: float,
        key: PRNGKeyArray,
    ):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.latent = latent
        self.cell = eqx.nn.GRUCell(self.INPUTS, hidden, key=k1, dtype=DTYPE)
        self.to_posterior = eqx.nn.Linear(hidden, 2 * latent, key=k2, dtype=DTYPE)
        field = no.nn.MLPField(
            latent,
            width,
            2,
            key=k3,
            time_dependent=False,
            activation=jax.nn.elu,
            dtype=DTYPE,
        )
        self.ode = no.NeuralODE(field, rtol=rtol, atol=atol)
        self.decoder = eqx.nn.MLP(
            latent, self.OUTPUTS, width, 1, activation=jax.nn.elu, key=k4, dtype=DTYPE
        )

    def posterior(self, h: Float[Array, " H"]) -> tuple[Array, Array]:
        """Mean and log-variance of q(z0) from the encoder's final state."""
        out = self.to_posterior(h)
        return out[: self.latent], out[self.latent :]

    def decoded(self, z0: Float[Array, "B L"], ts: Float[Array, " T"]) -> Array:
        """Decoded means at every time of `ts` for a batch of z0:
        (B, T, OUTPUTS), the batch solved as one ODE."""
        zs = self.ode.trajectory(z0, ts)  # (T, B, L)
        return jax.vmap(jax.vmap(self.decoder))(jnp.swapaxes(zs, 0, 1))
