"""Command-line options shared by every experiment, and a run's bookkeeping."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax.random as jr
from jaxtyping import PRNGKeyArray

from ._checkpoint import CONFIG, TrainState, checkpoint_path, load_checkpoint
from ._devices import DataParallel
from ._output import run_directory, write_json

# Options that say where and how to run, not what to train: never restored
# from a saved configuration on --resume.
RUNTIME_OPTIONS = ("command", "resume", "out", "devices", "progress")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --seed, --steps, --quick, --out, --resume, --devices, --no-progress."""
    group = parser.add_argument_group("common options")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="total training steps (default: the experiment's; with --resume, "
        "training continues up to this many steps)",
    )
    group.add_argument(
        "--quick", action="store_true", help="a tiny run, for smoke tests"
    )
    group.add_argument(
        "--out",
        default=None,
        help="output directory (default runs/<experiment>-<timestamp>/; with "
        "--resume, the resumed run's directory)",
    )
    group.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue from the checkpoint in this run directory (or file); the "
        "run's saved options are the defaults",
    )
    group.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        metavar="N",
        help="data-parallel over N devices (on CPU, N virtual host devices)",
    )
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide the progress bar",
    )


@dataclasses.dataclass
class Run:
    """A started run: where it writes, its key, its devices, its options."""

    name: str
    args: argparse.Namespace
    directory: Path
    key: PRNGKeyArray
    parallel: DataParallel

    def restore(self, state: TrainState) -> TrainState:
        """Load the `--resume` checkpoint into `state` (returned as is without)."""
        if self.args.resume is None:
            return state
        state = load_checkpoint(checkpoint_path(self.args.resume), state)
        print(
            f"Resumed {self.name} from {self.args.resume} at step {int(state.step)}.",
            file=sys.stderr,
        )
        return state

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write `metrics.json` and print a one-line-per-figure summary."""
        metrics = {"experiment": self.name, **metrics}
        write_json(self.directory / "metrics.json", metrics)
        print(f"{self.name}: results in {self.directory}")
        for k, v in metrics.items():
            if isinstance(v, int | float | str) or v is None:
                print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
        return metrics


def start_run(name: str, args: argparse.Namespace) -> Run:
    """Create the run directory, save the options and set up the devices."""
    out = args.out
    if out is None and args.resume is not None:
        out = str(checkpoint_path(args.resume).parent)
    directory = run_directory(name, out)
    config = {k: v for k, v in vars(args).items() if k not in RUNTIME_OPTIONS}
    write_json(directory / CONFIG, {"experiment": name, **config})
    return Run(
        name=name,
        args=args,
        directory=directory,
        key=jr.key(args.seed),
        parallel=DataParallel(args.devices),
    )


def config_option_defaults(resume: str) -> dict[str, Any]:
    """The saved options of the run named by `--resume`, to use as defaults."""
    from ._checkpoint import saved_config

    saved = saved_config(resume)
    return {
        k: v for k, v in saved.items() if k not in RUNTIME_OPTIONS + ("experiment",)
    }
