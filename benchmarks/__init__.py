"""Benchmarks of neuralode against diffrax, jax.experimental.ode and torchdiffeq.

Run everything with ``python -m benchmarks.run`` (``--quick`` for a seconds-long
smoke run) and the work–precision plot with ``python -m benchmarks.work_precision``.

Modules:

- `problems`: the benchmark problems, their sizes and their shared weights.
- `fields`: the JAX vector fields (MLP, Van der Pol, CNF dynamics).
- `reference`: float64 tight-tolerance reference solutions and gradients.
- `timing`: wall-clock timing, the fori-loop "limit", function-evaluation counts
  and compiled-memory queries.
- `runners`: one module per library, each turning a problem into result rows.
- `report`: the markdown table written to ``benchmarks/RESULTS.md``.
- `run`: the command-line entry point that runs each (library, problem) pair in
  its own single-threaded subprocess (``--device gpu`` on an accelerator).
- `cache`: the persistent compilation cache behind the warm-cache first calls.
- `device`: which device JAX and torch see, checked before any unit runs.
- `syncs`: loops, conditionals and device-to-host copies of compiled programs.
- `gpu`: one command for the GPU subset, ``python3 -m benchmarks.gpu``, which
  writes ``benchmarks/RESULTS-gpu.md``.
"""
