"""The chapters: each notebook runs top to bottom in quick mode and writes
its figures; the committed notebooks carry no outputs; chapters import the
package instead of redefining its functions.

Executing a notebook starts a Jupyter kernel ("python3"), which runs the
Python of the current environment, so the chapters see the same minimask
as the tests.
"""
import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))


def _code_cells(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell):
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_the_first_chapters_are_there():
    names = {p.name for p in CHAPTERS}
    for name in ["01_retinamask.ipynb", "02_convolution.ipynb",
                 "03_roi_align.ipynb", "04_losses.ipynb"]:
        assert name in names, f"{name} missing from {sorted(names)}"


@pytest.mark.notebook
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_runs_in_quick_mode(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # the kernel is a child process: it inherits these
    monkeypatch.setenv("MINIMASK_QUICK", "1")
    monkeypatch.setenv("MINIMASK_FIGURES", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [o for c in nb.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    figures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert figures, f"{path.name} wrote no figure to MINIMASK_FIGURES"
    prefix = path.name.split("_")[0] + "_"
    assert all(name.startswith(prefix) for name in figures), figures


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_committed_chapter_has_no_outputs(path):
    for i, cell in enumerate(_code_cells(path)):
        assert cell.get("outputs") == [], f"{path.name}: code cell {i} has outputs"
        assert cell.get("execution_count") is None, \
            f"{path.name}: code cell {i} has execution count {cell.get('execution_count')}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_has_quick_mode_figures_check_and_exercises(path):
    cells = _code_cells(path)
    first = _source(cells[0])
    assert 'QUICK = os.environ.get("MINIMASK_QUICK", "0") == "1"' in first
    assert 'FIGURES = Path(os.environ.get("MINIMASK_FIGURES", "../figures"))' in first
    code = "\n".join(_source(c) for c in cells)
    assert "assert " in code, f"{path.name} checks nothing"
    assert "savefig(FIGURES" in code, f"{path.name} saves no figure to FIGURES"
    text = json.loads(path.read_text(encoding="utf-8"))
    markdown = "\n".join(_source(c) for c in text["cells"] if c["cell_type"] == "markdown")
    assert "## Summary" in markdown and "## Exercises" in markdown
    assert "$" in markdown, f"{path.name} shows no equation"


def _package_function_names():
    """Top-level functions and classes of every minimask module, read from the
    source (no import), leaving out private ones."""
    names = set()
    for module in (ROOT / "minimask").rglob("*.py"):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                names.add(node.name)
    return names


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_does_not_redefine_package_functions(path):
    package = _package_function_names()
    assert "background_fraction" in package  # the scan sees the package
    defined = set()
    for cell in _code_cells(path):
        # IPython magics are not Python; drop those lines before parsing
        lines = [ln for ln in _source(cell).splitlines() if not ln.lstrip().startswith(("%", "!"))]
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
    clash = defined & package
    assert not clash, f"{path.name} redefines {sorted(clash)}; import them from minimask"
