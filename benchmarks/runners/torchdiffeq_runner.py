"""torchdiffeq: eager PyTorch ``odeint`` / ``odeint_adjoint`` with dopri5.

Torch runs eagerly on one thread (``torch.set_num_threads(1)``); its "first
call" is just the first eager call. The limit is the JAX fori-loop limit for
torchdiffeq's own evaluation count, so every library is held to the same bar.
With ``device="gpu"`` the tensors live on CUDA and every timed call ends with
``torch.cuda.synchronize()``; a torch without CUDA gives skipped rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..fields import FIELDS, VDP_MU, jax_inputs, rel_error
from ..problems import Problem
from ..timing import first_call, limit_callable, repeat
from .common import (
    RunSettings,
    Skipped,
    join_notes,
    new_row,
    shorten_error,
    step_cap_note,
    timing_values,
)


def _build_field(problem: Problem, torch: Any, device: Any) -> Any:
    """The problem's vector field as a ``torch.nn.Module`` counting its calls."""
    dtype = getattr(torch, problem.dtype)

    class Field(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights = torch.nn.ParameterList()
            for w, b in problem.params or ():
                for a in (w, b):
                    tensor = torch.tensor(a, dtype=dtype, device=device)
                    self.weights.append(torch.nn.Parameter(tensor))
            self.nfe = 0

        def mlp(self, x: Any) -> Any:
            n = len(self.weights) // 2
            for i in range(n):
                x = x @ self.weights[2 * i] + self.weights[2 * i + 1]
                if i < n - 1:
                    x = torch.tanh(x)
            return x

        def with_time(self, t: Any, y: Any) -> Any:
            tcol = t.to(y.dtype).reshape(1, 1).expand(y.shape[0], 1)
            return torch.cat([tcol, y], dim=-1)

        def forward(self, t: Any, y: Any) -> Any:
            self.nfe += 1
            if problem.field == "mlp_t":
                return self.mlp(self.with_time(t, y))
            if problem.field == "mlp":
                return self.mlp(y)
            if problem.field == "vdp":
                x, v = y[0], y[1]
                return torch.stack([v, VDP_MU * (1 - x**2) * v - x])
            return self.cnf(t, y)

        def cnf(self, t: Any, state: Any) -> Any:
            z, _ = state
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
                dz = self.mlp(self.with_time(t, z))
                trace = sum(
                    torch.autograd.grad(
                        dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True
                    )[0][:, i]
                    for i in range(z.shape[-1])
                )
            if not create_graph:
                dz, trace = dz.detach(), trace.detach()
            return dz, trace

    return Field()


def _device(torch: Any, device: str) -> tuple[Any, Callable[[Any], Any]]:
    """The torch device for `device` and the function that waits for its work."""
    if device != "gpu":
        return torch.device("cpu"), lambda out: out
    if not torch.cuda.is_available():
        raise Skipped(
            f"torch {torch.__version__} sees no CUDA device; torchdiffeq is "
            "not run on --device gpu"
        )

    def sync(out: Any) -> Any:
        torch.cuda.synchronize()
        return out

    return torch.device("cuda"), sync


def run(
    problem: Problem, variant: str, ref: dict | None, settings: RunSettings
) -> list[dict]:
    """Measure torchdiffeq on `problem`."""
    import torch
    import torchdiffeq

    torch.set_num_threads(1)
    if variant not in ("dopri5", "adjoint"):
        raise Skipped(f"unknown torchdiffeq variant {variant!r}")
    if settings.first_call_only:
        raise Skipped("warm-cache first calls are for the JAX libraries")
    device, sync = _device(torch, settings.device)
    dtype = getattr(torch, problem.dtype)
    func = _build_field(problem, torch, device)
    params = tuple(func.parameters())
    ts = torch.tensor(problem.ts, dtype=dtype, device=device)
    z0 = torch.tensor(problem.y0, dtype=dtype, device=device)
    if problem.kind == "cnf":
        y0 = (z0, torch.zeros(z0.shape[0], dtype=dtype, device=device))
    else:
        y0 = z0
    options = dict(
        rtol=problem.rtol,
        atol=problem.atol,
        method="dopri5",
        options={"max_num_steps": problem.max_steps},
    )

    def final_output(ys: Any) -> Any:
        if problem.kind == "cnf":
            z1, trace = ys[0][-1], ys[1][-1]
            d = z1.shape[-1]
            log_base = -0.5 * (z1**2).sum(-1) - 0.5 * d * np.log(2 * np.pi)
            return log_base + trace
        if problem.kind == "grad":
            return ys[-1]
        return ys

    def forward() -> Any:
        func.nfe = 0
        with torch.no_grad():
            return final_output(torchdiffeq.odeint(func, y0, ts, **options))

    def gradient() -> Any:
        func.nfe = 0
        ys = torchdiffeq.odeint_adjoint(func, y0, ts, adjoint_params=params, **options)
        out = final_output(ys)
        loss = out.mean() if problem.kind == "cnf" else (out**2).sum()
        return torch.autograd.grad(loss, params)

    def count(fn: Any) -> int:
        func.nfe = 0
        fn()
        return func.nfe

    version = f"{torchdiffeq.__version__} (torch {torch.__version__})"
    jax_y0, jax_params, jax_ts = jax_inputs(problem)
    field = FIELDS[problem.field]

    def limit(nfe: int | None, nfe_bwd: int = 0) -> Any:
        if not (settings.count_evals and settings.measure_limit and nfe):
            return None
        return limit_callable(field, jax_y0, jax_params, jax_ts[0], nfe, nfe_bwd)

    def forward_values() -> dict[str, Any]:
        first_s, out = first_call(forward, sync)
        nfe = func.nfe  # a plain counter: exact and free, no separate run needed
        values: dict[str, Any] = {}
        got = np.asarray(out.detach().cpu().numpy(), np.float64)
        reference = None
        if ref is not None:
            reference = {"fwd": ref.get("ys"), "grad": ref.get("y_final")}.get(
                problem.kind, ref.get("logp")
            )
        if reference is not None:
            if problem.kind == "fwd":
                got, reference = got[1:], reference[1:]
            values["error"] = rel_error(got, reference)
        if settings.count_evals:
            values["nfe_fwd"] = nfe
            values["message"] = step_cap_note(problem, nfe)
        timing = repeat(forward, sync, settings.timing, first_s, limit(nfe))
        values.update(timing_values(timing))
        return values

    def gradient_values() -> dict[str, Any]:
        first_s, grads = first_call(gradient, sync)
        nfe_total = func.nfe
        values: dict[str, Any] = {}
        flat_grads = np.concatenate([g.detach().cpu().numpy().ravel() for g in grads])
        if ref is not None and "grad" in ref:
            values["error"] = rel_error(flat_grads.astype(np.float64), ref["grad"])
        notes = []
        if not np.all(np.isfinite(flat_grads)):
            values["status"] = "failed"
            notes.append("non-finite gradient")
        nfe_fwd = nfe_bwd = None
        if settings.count_evals and settings.count_grad_evals:
            nfe_fwd = count(forward)
            nfe_bwd = nfe_total - nfe_fwd
            values.update(nfe_fwd=nfe_fwd, nfe_bwd=nfe_bwd)
            notes += [step_cap_note(problem, nfe_fwd), step_cap_note(problem, nfe_bwd)]
        lim = limit(nfe_fwd, max(nfe_bwd or 0, 0))
        timing = repeat(gradient, sync, settings.timing, first_s, lim)
        values.update(timing_values(timing))
        values["message"] = join_notes(*notes)
        return values

    jobs = {"fwd": [("fwd", forward_values)], "grad": [("grad", gradient_values)]}
    jobs["cnf"] = [("logp", forward_values), ("grad", gradient_values)]
    rows = []
    for task, job in jobs[problem.kind]:
        try:
            values = job()
        except Exception as exc:
            values = {"status": "failed", "message": shorten_error(exc)}
        rows.append(
            new_row(problem, "torchdiffeq", variant, task, version=version, **values)
        )
    return rows
