"""Command-line options shared by every experiment, and a run's bookkeeping.

A run is prepared before anything is written: `option_defaults` gives the
defaults of `--quick` and of a resumed run, `prepare_run` checks the options,
the output directory and any checkpoint and builds the training state; only
then does `Run.start` create the directory and write `config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import equinox as eqx
import jax.random as jr
import optax
from jaxtyping import PRNGKeyArray

from ._checkpoint import (
    History,
    TrainState,
    checkpoint_path,
    initial_state,
    load_checkpoint,
    load_history,
    saved_config,
)
from ._devices import DataParallel
from ._output import (
    CONFIG,
    HISTORY,
    RUN_FILES,
    UsageError,
    default_directory,
    is_run_directory,
    write_json,
)
from ._training import BatchFn, StepFn, train

# Options that say where and how to run, not what to train: not saved in
# config.json and never restored from it on --resume.
RUNTIME_OPTIONS = ("command", "resume", "out", "overwrite", "devices", "progress")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: appended unless the help names it.

    Flags (options without a value) and options whose default is None say in
    their help what happens without them instead.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default == argparse.SUPPRESS
        if action.nargs == 0 or no_default or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


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


def add_tolerance_arguments(
    parser: argparse.ArgumentParser, *, rtol: float, atol: float
) -> None:
    """Add --rtol and --atol, the solver's tolerances, with these defaults."""
    parser.add_argument(
        "--rtol", type=positive_float, default=rtol, help="solver relative tolerance"
    )
    parser.add_argument(
        "--atol", type=positive_float, default=atol, help="solver absolute tolerance"
    )


def add_common_arguments(
    parser: argparse.ArgumentParser, *, steps: int, quick_steps: int
) -> None:
    """Add --seed, --steps, --quick, --out, --overwrite, --resume, --devices and
    --no-progress; `steps` and `quick_steps` are the experiment's defaults."""
    group = parser.add_argument_group("common options")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument(
        "--steps",
        type=positive_int,
        default=steps,
        help=f"total training steps (default: {steps}, or {quick_steps} with "
        "--quick); with --resume, training continues up to this step",
    )
    group.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run for smoke tests: a small model, data set and --steps, "
        "unless given explicitly (off by default)",
    )
    group.add_argument(
        "--out",
        default=None,
        help="output directory (default: runs/<experiment>-<timestamp>/, or with "
        "--resume the resumed run's directory); refuses a directory that holds "
        "another run unless --overwrite is given",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out replace the run already in that directory (off by default)",
    )
    group.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue from the checkpoint in this run directory (or file), with "
        "that run's saved options unless given explicitly (default: start a new "
        "run)",
    )
    group.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        metavar="N",
        help="data-parallel over N devices (on CPU, N virtual host devices); N "
        "must divide --batch-size",
    )
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide the progress bar (shown by default)",
    )


def option_defaults(module: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    """The defaults that replace the parser's for this command line.

    With `--quick`, the experiment's `QUICK` settings; with `--resume`, the
    resumed run's saved options on top (after checking that it is a run of
    this experiment). Options given explicitly win over both.
    """
    saved = _resumed_config(module.NAME, args.resume) if args.resume else {}
    defaults = dict(module.QUICK) if args.quick or saved.get("quick") else {}
    options = set(vars(args)) - set(RUNTIME_OPTIONS)
    defaults |= {k: v for k, v in saved.items() if k in options and v is not None}
    return defaults


def _resumed_config(name: str, resume: str) -> dict[str, Any]:
    saved = saved_config(resume)
    found = saved.get("experiment", name)
    if found != name:
        raise UsageError(
            f"--resume {resume} is a {found} run, not a {name} run "
            f"(resume it with `neuralode {found} --resume {resume}`)"
        )
    return saved


@dataclasses.dataclass
class Run:
    """A prepared run: its options, directory, key, devices and initial state.

    `state` is the freshly built state, or the checkpoint's when resuming, and
    `history` the rows logged up to its step; `optimiser` is the one that
    `state.opt_state` belongs to.
    """

    name: str
    args: argparse.Namespace
    directory: Path
    key: PRNGKeyArray
    parallel: DataParallel
    state: TrainState
    optimiser: optax.GradientTransformation
    history: History = dataclasses.field(default_factory=list)
    replaces_run: bool = False

    def config(self) -> dict[str, Any]:
        """The settings of the run, as written to `config.json`."""
        options = {k: v for k, v in vars(self.args).items() if k not in RUNTIME_OPTIONS}
        return {"experiment": self.name, **options}

    def start(self) -> None:
        """Create the run directory and write `config.json`.

        With --overwrite, the files of the run being replaced go first, so that
        its checkpoint or history can never be mistaken for this run's.
        """
        if self.replaces_run:
            for name in (*RUN_FILES, HISTORY):
                (self.directory / name).unlink(missing_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json(self.directory / CONFIG, self.config())
        if self.args.resume is not None:
            print(
                f"Resumed {self.name} from {self.args.resume} at step "
                f"{int(self.state.step)}.",
                file=sys.stderr,
            )

    def train(
        self, state: TrainState, step_fn: StepFn, batch_fn: BatchFn, key: PRNGKeyArray
    ) -> tuple[TrainState, dict[str, Any]]:
        """`train` up to --steps, checkpointing into the run directory."""
        return train(
            state,
            step_fn,
            batch_fn,
            num_steps=self.args.steps,
            key=key,
            desc=self.name,
            directory=self.directory,
            progress=self.args.progress,
            history=self.history,
        )

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write `metrics.json` and print a one-line-per-figure summary."""
        metrics = {"experiment": self.name, **metrics}
        write_json(self.directory / "metrics.json", metrics)
        print(f"{self.name}: results in {self.directory}")
        for k, v in metrics.items():
            if isinstance(v, int | float | str) or v is None:
                print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
        return metrics


def prepare_run(module: ModuleType, args: argparse.Namespace) -> Run:
    """Check everything and build the initial or resumed state; write nothing.

    Raises `UsageError` for an --out that holds another run (without
    --overwrite), settings the experiment rejects, --devices that do not divide
    the batch size, and a checkpoint that is not this experiment's, does not
    fit the model these options build, or is already at --steps.
    """
    resumed = checkpoint_path(args.resume) if args.resume is not None else None
    directory, replaces_run = _output_directory(module.NAME, args, resumed)
    module.configure(args)
    parallel = _data_parallel(args.devices, args.batch_size)
    key = jr.key(args.seed)
    model, optimiser = module.build(args, key)
    state = initial_state(model, optimiser.init(eqx.filter(model, eqx.is_array)))
    history: History = []
    if resumed is not None:
        state = load_checkpoint(resumed, state, module.NAME)
        _check_steps(args.steps, int(state.step), resumed)
        history = load_history(resumed.parent, int(state.step))
    return Run(
        name=module.NAME,
        args=args,
        directory=directory,
        key=key,
        parallel=parallel,
        state=state,
        optimiser=optimiser,
        history=history,
        replaces_run=replaces_run,
    )


def _output_directory(
    name: str, args: argparse.Namespace, resumed: Path | None
) -> tuple[Path, bool]:
    """The run directory, and whether it replaces another run (--overwrite)."""
    if args.out is None:
        return (default_directory(name) if resumed is None else resumed.parent), False
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    own = resumed is not None and out.resolve() == resumed.parent.resolve()
    if own or not is_run_directory(out):
        return out, False
    if not args.overwrite:
        raise UsageError(
            f"--out {out} already holds a run (its metrics.json, config.json or "
            "checkpoint.eqx); pass --overwrite to replace it or choose another --out"
        )
    return out, True


def _data_parallel(devices: int, batch_size: int) -> DataParallel:
    """The devices of the run, or a `UsageError` if they cannot split the batch."""
    if batch_size % devices:
        raise UsageError(
            f"the batch size {batch_size} is not a multiple of --devices {devices}; "
            "change --devices or --batch-size"
        )
    try:
        return DataParallel(devices)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_steps(steps: int, step: int, path: Path) -> None:
    if steps <= step:
        raise UsageError(
            f"--steps {steps} is at or below the step {step} of the checkpoint "
            f"{path}: nothing to train; pass --steps above {step} to continue"
        )
