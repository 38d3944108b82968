"""Every notebook runs top to bottom in a fresh kernel; their cells assert what they show."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_modp_geometry.ipynb", "03_sn_geometry.ipynb",
                                          "04_transition.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "stored with outputs"
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()


def test_static_fallback_outside_a_kernel():
    import plotly.graph_objects as go

    from grokinterp.explore import frames_figure, interactive

    fig = frames_figure([0, 5, 10], lambda s: [go.Scatter(x=[s], y=[s])], "t")
    assert len(fig.frames) == 3 and len(fig.layout.sliders[0].steps) == 3
    assert interactive(fig) is fig  # no Jupyter kernel here: the plotly slider is the view
