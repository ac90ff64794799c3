"""The markdown report: one table per problem group plus a target check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .problems import GROUP_NOTES
from .runners import LIBRARY_LABELS
from .runners.common import LOOSE_BACKSOLVE, LOOSE_INTERPOLATING

_COLUMNS = (
    "library",
    "variant",
    "task",
    "median [min–max]",
    "first call",
    "first call (warm cache)",
    "NFE fwd",
    "NFE bwd",
    "steps",
    "rel. error",
    "time / limit",
    "temp mem",
    "note",
)


def fmt_time(seconds: float | None) -> str:
    """Seconds as µs / ms / s with three significant digits."""
    if seconds is None:
        return "—"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= 0.9995 * scale:  # so that 0.9996 s prints as 1 s
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e6:.3g} µs"


def fmt_bytes(n: int | None) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"


def _fmt(value: Any, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def _row_cells(row: dict) -> list[str]:
    if row["status"] == "skipped":
        timing = "skipped"
    elif row.get("time_median_s") is None:
        timing = "**failed**"
    else:
        timing = (
            f"{fmt_time(row['time_median_s'])} "
            f"[{fmt_time(row['time_min_s'])}–{fmt_time(row['time_max_s'])}]"
        )
        if row["status"] == "failed":
            timing = f"**failed** {timing}"
    ratio = row.get("time_over_limit")
    return [
        LIBRARY_LABELS.get(row["library"], row["library"]),
        row["variant"],
        row["task"],
        timing,
        fmt_time(row.get("first_call_s")),
        fmt_time(row.get("first_call_warm_s")),
        _fmt(row.get("nfe_fwd")),
        _fmt(row.get("nfe_bwd")),
        _fmt(row.get("steps")),
        _fmt(row.get("error"), ".2e"),
        "—" if ratio is None else f"{ratio:.2f}×",
        fmt_bytes(row.get("temp_bytes")),
        (row.get("message") or "").replace("|", "/"),
    ]


def _table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    return lines


def _find(
    rows: list[dict], problem: str, library: str, variant: str, task: str
) -> dict | None:
    for row in rows:
        if (row["problem"], row["library"], row["variant"], row["task"]) == (
            problem,
            library,
            variant,
            task,
        ):
            return row if row.get("time_median_s") is not None else None
    return None


def _check(
    label: str, value: float | None, bound: float, unit: str = "", note: str = ""
) -> dict:
    if value is None:
        return {"target": label, "value": "n/a", "met": None}
    shown = f"{value:.3g}{unit}" + (f" ({note})" if note else "")
    return {"target": label, "value": shown, "met": value <= bound}


def _backsolve_at_equal_error(rows: list[dict]) -> dict:
    """mlp-grad: the fastest neuralode backsolve whose gradient error is at most
    diffrax's, against diffrax's backsolve (the issue: "at an equal or smaller
    gradient error"); the value also names the default-tolerance ratio."""
    label = (
        "mlp-grad grad (backsolve): time ≤ 0.8× diffrax backsolve "
        "at an equal or smaller gradient error"
    )
    theirs = _find(rows, "mlp-grad", "diffrax", "backsolve", "grad")
    if theirs is None or theirs.get("error") is None:
        return _check(label, None, 0.8)
    ratio = {}
    for variant in ("backsolve", LOOSE_BACKSOLVE):
        mine = _find(rows, "mlp-grad", "neuralode", variant, "grad")
        if mine and mine.get("error") is not None and mine["error"] <= theirs["error"]:
            ratio[variant] = mine["time_median_s"] / theirs["time_median_s"]
    if not ratio:
        return _check(label, None, 0.8)
    best = min(ratio, key=ratio.__getitem__)
    mine = _find(rows, "mlp-grad", "neuralode", best, "grad")
    note = f"{best}, error {mine['error']:.2g} vs diffrax {theirs['error']:.2g}"
    if best != "backsolve" and "backsolve" in ratio:
        note += f"; default tolerances {ratio['backsolve']:.3g}×"
    return _check(label, ratio[best], 0.8, "×", note)


#: neuralode's programs whose first call in a second process (warm persistent
#: compilation cache) has a target: (problem, variant, task).
WARM_CACHE_PROGRAMS: tuple[tuple[str, str, str], ...] = (
    ("mlp-fwd", "dopri5", "fwd"),
    ("big-fwd", "dopri5", "fwd"),
    ("vdp-dense", "dopri5", "fwd"),
    ("mlp-grad", "backsolve", "grad"),
    ("mlp-grad", "checkpoint", "grad"),
    ("cnf", "backsolve", "logp"),
    ("cnf", "backsolve", "grad"),
    ("cnf", "checkpoint", "logp"),
    ("cnf", "checkpoint", "grad"),
    ("cnf", "CNF", "logp"),
    ("cnf", "CNF", "grad"),
)


def target_checks(rows: list[dict]) -> list[dict]:
    """neuralode's targets, each with its measured value and whether it is met."""
    checks = []
    for problem, bound in (("mlp-fwd", 1.05), ("big-fwd", 1.05), ("vdp-dense", 3.0)):
        row = _find(rows, problem, "neuralode", "dopri5", "fwd")
        ratio = row.get("time_over_limit") if row else None
        checks.append(_check(f"{problem}: time ≤ {bound:g}× limit", ratio, bound, "×"))

    def relative(
        problem: str, variant: str, rival: str, task: str, key: str, bound: float
    ) -> None:
        mine = _find(rows, problem, "neuralode", variant, task)
        theirs = _find(rows, problem, "diffrax", rival, task)
        ratio, note = None, ""
        if mine and theirs and mine.get(key) and theirs.get(key):
            ratio = mine[key] / theirs[key]
            if key == "time_median_s":  # minima are less disturbed by other load
                note = f"by min: {mine['time_min_s'] / theirs['time_min_s']:.3g}×"
        name = "time" if key == "time_median_s" else "first call"
        label = f"{problem} {task} ({variant}): {name} ≤ {bound:g}× diffrax {rival}"
        checks.append(_check(label, ratio, bound, "×", note))

    checks.append(_backsolve_at_equal_error(rows))
    relative("mlp-grad", "backsolve", "backsolve", "grad", "first_call_s", 0.5)
    for key, bound in (("time_median_s", 0.8), ("first_call_s", 0.5)):
        relative("mlp-grad", "checkpoint", "recursive-checkpoint", "grad", key, bound)
    cnf_rivals = {
        "backsolve": "backsolve",
        "checkpoint": "recursive-checkpoint",
        "CNF": "backsolve",  # neuralode.CNF defaults to a backsolve adjoint
    }
    for variant, rival in cnf_rivals.items():
        grad = _find(rows, "cnf", "neuralode", variant, "grad")
        logp = _find(rows, "cnf", "neuralode", variant, "logp")
        ratio = grad["time_median_s"] / logp["time_median_s"] if grad and logp else None
        checks.append(_check(f"cnf ({variant}): gradient ≤ 6× log p", ratio, 6.0, "×"))
        relative("cnf", variant, rival, "grad", "time_median_s", 0.3)
    for problem in ("mlp-fwd", "big-fwd", "vdp-dense"):
        relative(problem, "dopri5", "dopri5", "fwd", "first_call_s", 0.5)
    for variant, rival in cnf_rivals.items():
        for task in ("logp", "grad"):
            relative("cnf", variant, rival, task, "first_call_s", 0.5)
    for problem, variant in (
        ("mlp-grad", "backsolve"),
        ("mlp-grad", "checkpoint"),
        ("cnf", "backsolve"),
        ("cnf", "checkpoint"),
        ("cnf", "CNF"),
    ):
        row = _find(rows, problem, "neuralode", variant, "grad")
        first = row.get("first_call_s") if row else None
        label = f"{problem} grad ({variant}): first call ≤ 1.5 s"
        checks.append(_check(label, first, 1.5, " s"))
    for problem, variant, task in WARM_CACHE_PROGRAMS:
        row = _find(rows, problem, "neuralode", variant, task)
        warm = row.get("first_call_warm_s") if row else None
        label = f"{problem} {task} ({variant}): first call (warm cache) ≤ 0.3 s"
        checks.append(_check(label, warm, 0.3, " s"))
    for variant in ("backsolve", "checkpoint"):
        row = _find(rows, "mem-T100", "neuralode", variant, "grad")
        ok = row is not None and row["status"] == "ok"
        error = row.get("error") if ok else None
        label = f"mem-T100 ({variant}): completes, grad error ≤ 1e-3"
        checks.append(_check(label, error, 1e-3))
    short = _find(rows, "mem-T1", "neuralode", "backsolve", "grad")
    long = _find(rows, "mem-T100", "neuralode", "backsolve", "grad")
    growth = None
    if short and long and short.get("temp_bytes") and long.get("temp_bytes"):
        growth = long["temp_bytes"] / short["temp_bytes"]
    label = "mem-T100 (backsolve): temp mem ≤ 2× that at T = 1"
    checks.append(_check(label, growth, 2.0, "×"))
    checks += _reversible_checks(rows)
    checks += _interpolating_checks(rows)
    return checks


def _reversible_checks(rows: list[dict]) -> list[dict]:
    """Issue #16's ReversibleAdjoint targets at every horizon: temporary memory
    ≤ backsolve's, gradient error ≤ checkpoint's, time ≤ 1.3× checkpoint's."""
    checks = []
    for problem in ("mem-T1", "mem-T10", "mem-T100"):
        mine = _find(rows, problem, "neuralode", "reversible", "grad")
        ok = mine is not None and mine["status"] == "ok"
        for rival, key, bound, name in (
            ("backsolve", "temp_bytes", 1.0, "temp mem ≤ backsolve's"),
            ("checkpoint", "error", 1.0, "grad error ≤ checkpoint's"),
            ("checkpoint", "time_median_s", 1.3, "time ≤ 1.3× checkpoint's"),
        ):
            theirs = _find(rows, problem, "neuralode", rival, "grad")
            ratio = None
            if ok and theirs and mine.get(key) is not None and theirs.get(key):
                ratio = mine[key] / theirs[key]
            elif mine is not None and mine["status"] == "failed" and key == "error":
                ratio = float("inf")  # a refused gradient misses the target
            label = f"{problem} grad (reversible): {name}"
            checks.append(_check(label, ratio, bound, "×"))
    return checks


def _interpolating_checks(rows: list[dict]) -> list[dict]:
    """Issue #16's InterpolatingAdjoint targets: at every horizon a gradient
    error ≤ 1e-5 and adjoint-solve evaluations ≤ 1.5× the forward ones and ≤
    diffrax backsolve's backward ones; at T = 100 a time ≤ 0.8× diffrax
    backsolve's. The harness counts every evaluation of the gradient call
    after the forward one, which for this adjoint includes recomputing the
    forward steps (about the forward's evaluations, plain ones, not VJPs):
    the adjoint solve's count is taken as NFE bwd - NFE fwd."""
    checks = []
    for problem in ("mem-T1", "mem-T10", "mem-T100"):
        mine = _find(rows, problem, "neuralode", "interpolating", "grad")
        theirs = _find(rows, problem, "diffrax", "backsolve", "grad")
        ok = mine is not None and mine["status"] == "ok"
        label = f"{problem} grad (interpolating)"
        error = mine.get("error") if ok else None
        checks.append(_check(f"{label}: grad error ≤ 1e-5", error, 1e-5))
        fwd, bwd = (mine.get("nfe_fwd"), mine.get("nfe_bwd")) if ok else (0, 0)
        adjoint = bwd - fwd if fwd and bwd else None
        name = "adjoint-solve evaluations (NFE bwd − NFE fwd)"
        ratio = adjoint / fwd if adjoint is not None else None
        checks.append(_check(f"{label}: {name} ≤ 1.5× NFE fwd", ratio, 1.5, "×"))
        ratio = None
        if adjoint is not None and theirs and theirs.get("nfe_bwd"):
            ratio = adjoint / theirs["nfe_bwd"]
        checks.append(
            _check(f"{label}: {name} ≤ diffrax backsolve's NFE bwd", ratio, 1.0, "×")
        )
    theirs = _find(rows, "mem-T100", "diffrax", "backsolve", "grad")
    for variant in ("interpolating", LOOSE_INTERPOLATING):
        mine = _find(rows, "mem-T100", "neuralode", variant, "grad")
        ratio, note = None, ""
        key = "time_median_s"
        if mine and theirs and mine.get(key) and theirs.get(key):
            ratio = mine[key] / theirs[key]
            note = f"error {mine.get('error', float('nan')):.2g}"
        label = f"mem-T100 grad ({variant}): time ≤ 0.8× diffrax backsolve"
        checks.append(_check(label, ratio, 0.8, "×", note))
    return checks


def _checks_table(checks: list[dict]) -> list[str]:
    mark: dict[Any, str] = {True: "met", False: "**missed**", None: "n/a"}
    lines = ["| target | neuralode | status |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['value']} | {mark[c['met']]} |" for c in checks]
    return lines


def _header(results: dict) -> list[str]:
    machine = results["machine"]
    versions = ", ".join(
        f"{name} {version}" for name, version in results["versions"].items() if version
    )
    missing = [name for name, version in results["versions"].items() if not version]
    load = results.get("load_average") or {"before": None, "after": None}
    lines = [
        "# neuralode benchmarks",
        "",
        f"Produced by `{results['command']}` on {results['date']}"
        f" in {results['wall_s']:.0f} s.",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['platform']}, Python {machine['python']}.",
        *_device_lines(results),
        f"- Versions: {versions}."
        + (f" Not installed: {', '.join(missing)}." if missing else ""),
        f"- Load average (1, 5, 15 min) before / after: {load['before']} / "
        f"{load['after']} (other work on the machine inflates times; ratios "
        "measured in the same process, such as time / limit, suffer less).",
        "- Dopri5 everywhere, same weights, initial values and tolerances in every "
        "library; float32 unless stated.",
        "- Time: median of R repeats after a separately timed first call (trace + "
        "compile + first run for JAX, with no persistent compilation cache; eager "
        "for torch). *first call (warm cache)*: the first call again, in a second "
        "fresh process whose persistent compilation cache (`jax_compilation_cache_"
        "dir`, every program cached) holds what the first process compiled, as in "
        "a user's second run; JAX never caches a program with a host callback "
        "(the note says so). *limit*: the same number of "
        "vector-field evaluations in a bare jitted `lax.fori_loop`, timed "
        "interleaved with the solver. For "
        "gradients the limit is the forward evaluations plus one VJP of the field "
        "per backward evaluation (continuous adjoints) or per forward evaluation "
        "(discretise-then-optimise: checkpoint, recursive-checkpoint; their "
        "recomputation is overhead). *backsolve-loose*: neuralode's "
        "`BacksolveAdjoint(rtol=10·rtol, atol=10·atol)`, backward tolerances 10× "
        "the forward ones (the issue compares backsolve times at an equal or "
        "smaller gradient error). *NFE*: counted in separate counting "
        "runs (backward = gradient call − forward call). *rel. error*: relative "
        "2-norm error against a float64 reference (SciPy DOP853 at rtol 1e-12 for "
        "solutions; fine-step float64 RK4 discretise-then-optimise for gradients). "
        "*temp mem*: XLA's compiled temporary buffer size.",
        "",
    ]
    return lines


def _device_lines(results: dict) -> list[str]:
    """How the run used its device (results without these keys: a CPU run)."""
    settings = results["settings"]
    device = results.get("device") or {}
    kind = device.get("device_kind")
    lines = []
    if kind:
        count = device.get("device_count", 1)
        lines.append(
            f"- JAX device: {kind} (platform {device.get('platform')}, "
            f"{count} device{'s' if count != 1 else ''}, jax {device.get('jax')})."
        )
    if settings.get("device", "cpu") == "cpu":
        lines.append(
            f"- Single thread: `XLA_FLAGS={settings['single_thread']}`, "
            "`torch.set_num_threads(1)`, one subprocess per (library, problem, "
            "variant)."
        )
    else:
        torch_gpu = device.get("torch_cuda")
        torch_note = f"on {torch_gpu}" if torch_gpu else "skipped (no CUDA torch)"
        lines.append(
            f"- GPU run: `JAX_PLATFORMS={settings.get('jax_platforms')}`, no XLA "
            "CPU thread flags, one subprocess per (library, problem, variant); "
            f"torchdiffeq {torch_note}, every call synchronised "
            "(`block_until_ready`, `torch.cuda.synchronize`)."
        )
    precision = settings.get("matmul_precision", "default")
    if precision != "default":
        lines.append(f"- `jax_default_matmul_precision={precision}` in every worker.")
    if settings.get("deadline_s"):
        lines.append(
            f"- Time budget: no unit started after {settings['deadline_s']:g} s "
            "(later units are skipped rows)."
        )
    return lines


def _syncs_note(syncs: dict) -> str:
    """An error, or the device events seen when none was a device-to-host copy."""
    if syncs.get("error"):
        return syncs["error"]
    if syncs.get("d2h_copies") == 0 and syncs.get("device_events"):
        names = ", ".join(list(syncs["device_events"])[:4])
        return f"no copy among the device events ({names}, …)"
    return ""


def _syncs_table(rows: list[dict]) -> list[str]:
    """Loops, conditionals and device-to-host copies of the forward programs."""
    measured = [r for r in rows if r.get("syncs")]
    if not measured:
        return []
    lines = [
        "## Device-to-host synchronisations of the forward programs",
        "",
        "On a GPU each `while` iteration and each `conditional` costs a "
        "device-to-host copy of its predicate and a wait (JAX #2491). *loops*, "
        "*depth*, *cond. in loops*, *loops in loops*: counted in the optimised "
        "HLO of the compiled program; *D2H / call*: device-to-host copies in a "
        "profile of one call (GPU only); *per step*: that over the attempted "
        "steps, NFE / 6.",
        "",
        "| problem | library | variant | task | loops | depth | cond. in loops "
        "| loops in loops | D2H / call | per step | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in measured:
        sy = row["syncs"]
        per_step = sy.get("d2h_per_step")
        cells = [
            row["problem"],
            LIBRARY_LABELS.get(row["library"], row["library"]),
            row["variant"],
            row["task"],
            _fmt(sy.get("loops")),
            _fmt(sy.get("max_depth")),
            _fmt(sy.get("conditionals_in_loops")),
            _fmt(sy.get("loops_in_loops")),
            _fmt(sy.get("d2h_copies")),
            "—" if per_step is None else f"{per_step:.2f}",
            _syncs_note(sy).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(results: dict) -> str:
    """The whole report as markdown text."""
    rows = results["rows"]
    lines = _header(results)
    lines += ["## Targets for neuralode", "", *_checks_table(target_checks(rows)), ""]
    lines += [
        "What bounds each missed target, as measured (profiles, compiled HLO), "
        "is in [BOUNDS.md](BOUNDS.md).",
        "",
    ]
    groups: list[str] = []
    for row in rows:
        if row["group"] not in groups:
            groups.append(row["group"])
    for group in groups:
        lines += [f"## {group}: {GROUP_NOTES.get(group, '')}", ""]
        group_rows = [r for r in rows if r["group"] == group]
        for name in dict.fromkeys(r["problem"] for r in group_rows):
            info = results["problems"].get(name, {})
            lines += [f"**{name}**: {info.get('description', '')}", ""]
            lines += _table([r for r in group_rows if r["problem"] == name]) + [""]
    lines += _syncs_table(rows)
    return "\n".join(lines)


def write_markdown(
    results: dict, path: Path, render: Callable[[dict], str] = render_markdown
) -> None:
    """Write the report to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results) + "\n")
