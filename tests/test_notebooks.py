"""The notebooks run top to bottom: the cheapest one at its default (full)
size, the others in their small mode (NEURALODE_SMALL=1)."""

from pathlib import Path

import pytest

from .conftest import FAST_COMPILE

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

# The cheapest notebook at its full size: 30-60 s on 2 cores (the others take
# 1-3 minutes each), so CI also sees the default experiment sizes work.
FULL_SIZE = "03_odenet_digits"


def run_notebook(path: Path, small: bool, timeout: int, monkeypatch) -> None:
    """Execute the notebook in a fresh kernel; fail on any error output."""
    if small:
        monkeypatch.setenv("NEURALODE_SMALL", "1")
    else:
        monkeypatch.delenv("NEURALODE_SMALL", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel is a fresh process: no strict dtype promotion, no x64 unless
    # the notebook turns it on; no XLA flags but the tests' fast compilation.
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
    notebook = nbformat.read(path, as_version=4)
    # A last cell checks that the kernel ran in the intended mode.
    notebook.cells.append(nbformat.v4.new_code_cell(f"assert SMALL is {small}, SMALL"))
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    errors = [
        out
        for cell in code_cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, [f"{e['ename']}: {e['evalue']}" for e in errors]


def test_notebooks_found():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    assert FULL_SIZE in [p.stem for p in NOTEBOOKS]


@pytest.mark.slow
@pytest.mark.parametrize(
    # The full-size notebook runs below, which covers its small mode's code.
    "path",
    [p for p in NOTEBOOKS if p.stem != FULL_SIZE],
    ids=lambda p: p.stem,
)
def test_notebook_runs_small(path, monkeypatch):
    run_notebook(path, small=True, timeout=300, monkeypatch=monkeypatch)


@pytest.mark.slow
def test_notebook_runs_full_size(monkeypatch):
    path = next(p for p in NOTEBOOKS if p.stem == FULL_SIZE)
    run_notebook(path, small=False, timeout=600, monkeypatch=monkeypatch)
