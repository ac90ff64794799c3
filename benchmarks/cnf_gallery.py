"""The CNF on every 2-D toy density: ``python -m benchmarks.cnf_gallery``.

Trains ``python -m neuralode cnf --data NAME`` with the default settings for
each of the seven `toy_2d` densities (one at a time, each in its own process,
into ``RUNS/NAME``; a finished run there is reused, never retrained), then
writes

- ``benchmarks/CNF_GALLERY.md``: test NLL against the density's entropy
  (closed form, or quadrature with its error bar:
  `neuralode.datasets._toy_entropy`), the gap, training and wall time, NFE;
- ``benchmarks/cnf_gallery.png``: data, samples and learned density, one row
  per density.

``--runs DIR`` (default ``runs/gallery``) holds the runs; ``--no-train`` only
collects what is there. Run it under ``nice`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
TABLE = HERE / "CNF_GALLERY.md"
FIGURE = HERE / "cnf_gallery.png"
TARGET_GAP = 0.05  # nats
COLUMNS = (
    "density",
    "test NLL (nats)",
    "entropy (nats)",
    "gap",
    "within 0.05",
    "train s",
    "run wall s",
    "NFE fwd/bwd",
)


def train(name: str, runs: Path) -> float | None:
    """Train the default cnf run of `name` into `runs/name` unless it is there.

    Returns the wall time of the command, or None for a reused run.
    """
    out = runs / name
    if (out / "metrics.json").is_file():
        return None
    cmd = [sys.executable, "-m", "neuralode", "cnf", "--data", name]
    tic = time.perf_counter()
    subprocess.run([*cmd, "--out", str(out), "--no-progress"], check=True)
    return time.perf_counter() - tic


def row(name: str, metrics: dict[str, Any], wall: float | None) -> dict[str, Any]:
    """One line of the table from a run's metrics and its entropy."""
    from neuralode.datasets._toy_entropy import toy_2d_entropy_with_error

    entropy = toy_2d_entropy_with_error(name)
    gap = metrics["test_nll"] - entropy.value
    # The gap's uncertainty: the test NLL's standard error and the entropy's bar.
    err = float(np.hypot(metrics["test_nll_stderr"], entropy.error))
    return {
        "name": name,
        "test_nll": metrics["test_nll"],
        "test_nll_stderr": metrics["test_nll_stderr"],
        "entropy": entropy.value,
        "entropy_error": entropy.error,
        "entropy_method": entropy.method,
        "gap": gap,
        "gap_error": err,
        "met": gap <= TARGET_GAP,
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": wall,
        "nfe": (metrics["nfe_forward"], metrics["nfe_backward"]),
    }


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    """The table of `rows` as Markdown, with the command that made it."""
    lines = [
        "# The CNF on every 2-D toy density",
        "",
        f"Made by `{command}` (each density: `python -m neuralode cnf --data NAME`,",
        "default settings). Entropy: closed form where the density has one,",
        "otherwise quadrature of the density (`neuralode/datasets/_toy_entropy.py`)",
        "with its error bar; gap = test NLL - entropy, ± the test NLL's standard",
        "error and the entropy's error bar combined. Target: gap <= 0.05 nats.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        entropy = f"{r['entropy']:.4f}" + (
            f" ± {r['entropy_error']:.1g}" if r["entropy_error"] else " (closed form)"
        )
        wall = "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
        cells = [
            r["name"],
            f"{r['test_nll']:.4f} ± {r['test_nll_stderr']:.4f}",
            entropy,
            f"{r['gap']:+.4f} ± {r['gap_error']:.4f}",
            "yes" if r["met"] else "no",
            f"{r['train_seconds']:.0f}",
            wall,
            f"{r['nfe'][0]}/{r['nfe'][1]}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load_flow(run: Path):
    """The trained flow of a cnf run directory, rebuilt from its config."""
    import equinox as eqx
    import jax.random as jr

    from neuralode.experiments import cnf
    from neuralode.experiments._checkpoint import initial_state, load_checkpoint

    config = json.loads((run / "config.json").read_text())
    args = argparse.Namespace(**config)
    flow, optimiser = cnf.build(args, jr.key(args.seed))
    template = initial_state(flow, optimiser.init(eqx.filter(flow, eqx.is_array)))
    return load_checkpoint(run / "checkpoint.eqx", template, "cnf").model


def figure(names: list[str], runs: Path, path: Path, *, grid: int = 100) -> None:
    """Data, samples and learned density of every run, one row per density."""
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr

    import neuralode as no
    from neuralode.experiments._plotting import new_figure, save_figure

    limit = 4.5
    axis = np.linspace(-limit, limit, grid, dtype=np.float32)
    points = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    log_prob = eqx.filter_jit(lambda f, x: f.log_prob(x))
    sample = eqx.filter_jit(lambda f, k: f.sample(k, 2000, dtype=jnp.float32))
    fig, axes = new_figure(3, size=2.2, nrows=len(names))
    for i, name in enumerate(names):
        flow = _load_flow(runs / name)
        data = np.asarray(no.datasets.toy_2d(name, 2000, key=jr.key(1)))
        samples = np.asarray(sample(flow, jr.key(2)))
        density = np.exp(np.asarray(log_prob(flow, jnp.asarray(points))))
        row_axes = axes[3 * i : 3 * i + 3]
        row_axes[0].scatter(*data.T, s=0.5, alpha=0.5)
        row_axes[1].scatter(*samples.T, s=0.5, alpha=0.5, color="C1")
        row_axes[2].imshow(
            density.reshape(grid, grid),
            origin="lower",
            extent=(-limit, limit, -limit, limit),
            cmap="magma",
        )
        row_axes[0].set_ylabel(name)
        for ax in row_axes:
            ax.set_xlim(-limit, limit)
            ax.set_ylim(-limit, limit)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    titles = ("data", "CNF samples", "learned density")
    for ax, title in zip(axes[:3], titles, strict=True):
        ax.set_title(title)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from neuralode.datasets import TOY_2D_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/gallery", help="run directories")
    parser.add_argument(
        "--no-train", dest="train", action="store_false", help="only collect"
    )
    parser.add_argument("--table", default=str(TABLE), help="Markdown output")
    parser.add_argument("--figure", default=str(FIGURE), help="PNG output")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    rows, walls = [], {}
    for name in TOY_2D_NAMES:
        if args.train:
            walls[name] = train(name, runs)
        path = runs / name / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"cnf_gallery: no finished run at {path}")
    # Wall times of the runs made earlier are kept next to them.
    walls_file = runs / "walltimes.json"
    if walls_file.is_file():
        earlier = json.loads(walls_file.read_text())
        walls = {n: walls.get(n) or earlier.get(n) for n in TOY_2D_NAMES}
    if any(walls.values()):
        walls_file.write_text(json.dumps(walls, indent=1) + "\n")
    for name in TOY_2D_NAMES:
        metrics = json.loads((runs / name / "metrics.json").read_text())
        rows.append(row(name, metrics, walls.get(name)))
        print(f"{name}: gap {rows[-1]['gap']:+.4f}", flush=True)
    command = "python -m benchmarks.cnf_gallery" + (
        "" if args.runs == "runs/gallery" else f" --runs {args.runs}"
    )
    Path(args.table).write_text(markdown(rows, command))
    figure(list(TOY_2D_NAMES), runs, Path(args.figure))
    print(f"wrote {args.table} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
