"""The benchmark problems: sizes, tolerances, initial values and shared weights.

Every library receives exactly the same numbers: weights and initial values are
generated once here with a seeded NumPy generator, as float64, and cast to the
problem's dtype by each runner.

MLP weights are stored as a tuple of ``(W, b)`` layers with ``W`` of shape
``(fan_in, fan_out)``, applied as ``x @ W + b`` with ``tanh`` between layers.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

Layers = tuple[tuple[np.ndarray, np.ndarray], ...]

#: Problem names in the order they are run and reported.
PROBLEM_NAMES: tuple[str, ...] = (
    "mlp-fwd",
    "big-fwd",
    "vdp-dense",
    "mlp-grad",
    "cnf",
    "mem-T1",
    "mem-T10",
    "mem-T100",
    "nc-T10",
    "nc-T100",
)

#: The subset run by ``--quick`` (with only the first variant of each library).
QUICK_PROBLEM_NAMES: tuple[str, ...] = ("mlp-fwd", "mlp-grad")

#: What each problem group stresses (used in the report).
GROUP_NOTES: dict[str, str] = {
    "mlp-fwd": "forward solve",
    "big-fwd": "vector-field-bound forward",
    "vdp-dense": "per-step overhead, dense output",
    "mlp-grad": "gradient through the solve (adjoints)",
    "cnf": "continuous normalizing flow, exact trace",
    "mem-scaling": "gradient at long horizons (contracting flow)",
    "non-contracting": "gradient at long horizons (non-contracting flow): every "
    "adjoint against the exact discrete gradient; a refusal is a correct outcome, "
    "a wrong gradient is not",
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    **Attributes:**

    - `name`: unique name, e.g. ``"mem-T10"``.
    - `group`: the row group in the report, e.g. ``"mem-scaling"``.
    - `kind`: ``"fwd"`` (time the solve), ``"grad"`` (time the gradient of
      ``sum(y(t1)**2)`` with respect to the weights) or ``"cnf"`` (time the
      log-density and the gradient of its mean).
    - `field`: ``"mlp_t"`` (MLP of ``[t, y]``), ``"mlp"`` (autonomous MLP),
      ``"vdp"`` (Van der Pol) or ``"cnf"`` (MLP of ``[t, z]`` with exact trace).
    - `dtype`: ``"float32"`` or ``"float64"``.
    - `y0`: initial value (float64 NumPy array).
    - `ts`: output times, ``ts[0]`` is the initial time.
    - `params`: MLP layers, or None.
    - `rtol`, `atol`, `max_steps`: solver settings shared by every library.
    - `description`: one line for the report.
    """

    name: str
    group: str
    kind: str
    field: str
    dtype: str
    y0: np.ndarray
    ts: np.ndarray
    params: Layers | None
    rtol: float
    atol: float
    max_steps: int
    description: str

    def fingerprint(self) -> str:
        """A short hash of every number in the problem (for reference caching)."""
        h = hashlib.sha256()
        h.update(repr((self.name, self.kind, self.field, self.dtype)).encode())
        h.update(repr((self.rtol, self.atol, self.max_steps)).encode())
        arrays = [self.y0, self.ts]
        for w, b in self.params or ():
            arrays += [w, b]
        for a in arrays:
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]


def mlp_layers(sizes: list[int], gain: float, seed: int) -> Layers:
    """Random tanh-MLP layers with ``W ~ N(0, gain² / fan_in)``, ``b ~ N(0, 0.1²)``."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = rng.normal(size=(fan_in, fan_out)) * gain / np.sqrt(fan_in)
        b = rng.normal(size=(fan_out,)) * 0.1
        layers.append((w, b))
    return tuple(layers)


def contracting_layers(width: int, rate: float, fixed_point: np.ndarray) -> Layers:
    """Layers of a 2 → width → width → 2 tanh MLP whose flow contracts.

    The last layer is chosen so that ``fixed_point`` is an equilibrium whose
    Jacobian is ``-rate · I``: the hidden layers are random, and with
    ``M = ∂h/∂y`` at the fixed point the output weights are ``-rate · pinv(M)``
    and the output bias cancels the field there.
    """
    (w1, b1), (w2, b2) = mlp_layers([2, width, width], gain=1.0, seed=7)
    h1 = np.tanh(fixed_point @ w1 + b1)
    h2 = np.tanh(h1 @ w2 + b2)
    jac_hidden = (w1 * (1 - h1**2)) @ (w2 * (1 - h2**2))  # (2, width)
    w3 = -rate * np.linalg.pinv(jac_hidden)  # (width, 2): jac_hidden @ w3 = -rate I
    b3 = -(h2 @ w3)
    return ((w1, b1), (w2, b2), (w3, b3))


def _normal(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape) * scale


def _two_moons(n: int, seed: int) -> np.ndarray:
    """Noisy two-moons points, the usual 2-D density-estimation toy data."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, np.pi, size=n)
    upper = rng.uniform(size=n) < 0.5
    x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    pts = np.stack([x - 0.5, y - 0.25], axis=-1) * 1.5
    return pts + rng.normal(size=pts.shape) * 0.05


def _long_horizon(
    name: str, prefix: str, group: str, params: Layers, max_steps: int, flow: str,
    batch: int, width: int,
) -> Problem:  # fmt: skip
    """∇ of Σ y(T)² for an autonomous MLP field, T from the name after `prefix`."""
    horizon = float(name.removeprefix(prefix))
    return Problem(
        name=name,
        group=group,
        kind="grad",
        field="mlp",
        dtype="float32",
        y0=_normal((batch, 2), seed=8),
        ts=np.array([0.0, horizon]),
        params=params,
        rtol=1e-6,
        atol=1e-8,
        max_steps=max_steps,
        description=f"∇ of Σ y(T)² at T={horizon:g}, batch ({batch}, 2), "
        f"MLP 2→{width}→{width}→2 tanh {flow}, float32",
    )


def get_problem(name: str, quick: bool = False) -> Problem:
    """Build problem `name`; `quick` shrinks sizes so a run takes seconds."""
    batch, width = (16, 16) if quick else (256, 64)
    if name == "mlp-fwd":
        return Problem(
            name=name,
            group=name,
            kind="fwd",
            field="mlp_t",
            dtype="float32",
            y0=_normal((batch, 2), seed=1),
            ts=np.array([0.0, 1.0]),
            params=mlp_layers([3, width, width, 2], gain=4.5, seed=0),
            rtol=1e-6,
            atol=1e-8,
            max_steps=4096,
            description=f"batch ({batch}, 2) as one ODE, MLP 3→{width}→{width}→2 "
            "tanh of [t, y], t∈[0,1], float32",
        )
    if name == "big-fwd":
        big_batch, dim, big_width = (32, 4, 32) if quick else (1024, 32, 256)
        return Problem(
            name=name,
            group=name,
            kind="fwd",
            field="mlp_t",
            dtype="float32",
            y0=_normal((big_batch, dim), seed=2),
            ts=np.array([0.0, 1.0]),
            params=mlp_layers([dim + 1, big_width, big_width, dim], gain=5.0, seed=3),
            rtol=1e-6,
            atol=1e-8,
            max_steps=4096,
            description=f"batch ({big_batch}, {dim}), MLP {dim + 1}→{big_width}→"
            f"{big_width}→{dim} tanh, t∈[0,1], float32",
        )
    if name == "vdp-dense":
        t1, n_out = (10.0, 100) if quick else (50.0, 2000)
        return Problem(
            name=name,
            group=name,
            kind="fwd",
            field="vdp",
            dtype="float64",
            y0=np.array([2.0, 0.0]),
            ts=np.linspace(0.0, t1, n_out),
            params=None,
            rtol=1e-8,
            atol=1e-10,
            max_steps=16384,
            description=f"Van der Pol μ=1, t∈[0,{t1:g}], {n_out} output times, float64",
        )
    if name == "mlp-grad":
        fwd = get_problem("mlp-fwd", quick)
        return dataclasses.replace(
            fwd,
            name=name,
            group=name,
            kind="grad",
            description="∇ of Σ y(1)² w.r.t. the MLP weights of mlp-fwd",
        )
    if name == "cnf":
        n_points, cnf_width = (32, 16) if quick else (512, 64)
        return Problem(
            name=name,
            group=name,
            kind="cnf",
            field="cnf",
            dtype="float32",
            y0=_two_moons(n_points, seed=5),
            ts=np.array([0.0, 1.0]),
            params=mlp_layers([3, cnf_width, cnf_width, 2], gain=1.5, seed=6),
            rtol=1e-5,
            atol=1e-5,
            max_steps=4096,
            description=f"{n_points} 2-D points, MLP 3→{cnf_width}→{cnf_width}→2 "
            "tanh of [t, z], exact trace, t∈[0,1], rtol=atol=1e-5, float32",
        )
    if name.startswith("mem-T"):
        params = contracting_layers(width, rate=1.0, fixed_point=np.array([0.5, -0.5]))
        return _long_horizon(
            name, "mem-T", "mem-scaling", params, 4096, "with a contracting flow",
            batch, width,
        )  # fmt: skip
    if name.startswith("nc-T"):
        params = mlp_layers([2, width, width, 2], gain=4.5, seed=0)
        return _long_horizon(
            name, "nc-T", "non-contracting", params, 16384,
            "(gain 4.5), a flow that does not contract", batch, width,
        )  # fmt: skip
    raise KeyError(f"unknown problem {name!r}; known: {', '.join(PROBLEM_NAMES)}")
