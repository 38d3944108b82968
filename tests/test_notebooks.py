"""Every notebook runs top to bottom in a fresh kernel; their cells assert what they show."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_modp_geometry.ipynb", "03_sn_geometry.ipynb",
                                          "04_transition.ipynb"]


# Seconds per cell. Measured on 2 cores that three other test suites kept busy (load average 8), with one thread
# per kernel: the slowest cell of each notebook took 121 s (04_transition, its sharpness analysis), 37 s, 14 s and
# 14 s, so this leaves 5x headroom over the slowest.
CELL_TIMEOUT = 600


class _HeadlessClient(NotebookClient):
    """nbclient without its imitation of a front end's Output widget.

    nbclient answers each Output widget's state with a comm message of its own, sent on the shell socket from the
    task that reads IOPub while another task polls that socket for the cell's execute_reply. The send can swallow the
    socket's edge-triggered wake-up: the reply then waits, unread, until the poll times out (CELL_TIMEOUT), and a
    notebook with three slider cells stalled for up to half an hour (kernel and client both idle). Measured with
    nbclient 0.11 / pyzmq 27: 40 cells of ``interactive(fig)`` stalled once per run for the full timeout with the
    imitation (3 runs out of 3) and never without it. Our notebooks only need the widgets built in the kernel; what
    the Output widget shows lands in the cell's outputs instead.
    """

    def on_comm_open_jupyter_widget(self, msg):
        return None


def _execute(notebook: nbformat.NotebookNode, folder: Path) -> _HeadlessClient:
    """Run every cell of ``notebook`` in a fresh kernel started in ``folder``; its outputs land in the notebook."""
    client = _HeadlessClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                             resources={"metadata": {"path": str(folder)}})
    client.execute()
    return client


def _widget_views(cells) -> list[dict]:
    """The outputs of ``cells`` that show a widget (what a front end renders a slider from)."""
    return [out for cell in cells for out in cell.get("outputs", ())
            if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "stored with outputs"
    # One torch thread in the kernel: on 2 busy cores two OpenMP threads wait at every op's barrier for whichever of
    # them is descheduled. Measured there, 04_transition took 145 s with one thread and did not finish in 17 min
    # with two (its sharpness cell alone passed the old 300 s timeout).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _execute(notebook, tmp_path)
    if any("interactive(" in cell.source for cell in notebook.cells):  # the slider was built, in the kernel
        assert _widget_views(notebook.cells), "no widget view among the outputs of a notebook that calls interactive()"


def test_the_client_sends_nothing_of_its_own_on_the_shell_socket(tmp_path, monkeypatch):
    """The stall's mechanism, checked without a clock: nbclient's Output-widget imitation is what sent comm messages
    on the shell socket while a cell's reply was awaited there. With it off, a slider cell leaves no such object
    behind (the plain NotebookClient keeps one per Output widget, and would fail this)."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(
        "import plotly.graph_objects as go\n"
        "from grokinterp.explore import frames_figure, interactive\n"
        "interactive(frames_figure([0, 5], lambda s: [go.Scatter(x=[s], y=[s])], 't'))")]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = _execute(notebook, tmp_path)
    assert _widget_views(notebook.cells)
    assert client.comm_objects == {}


def test_static_fallback_outside_a_kernel():
    import plotly.graph_objects as go

    from grokinterp.explore import frames_figure, interactive

    fig = frames_figure([0, 5, 10], lambda s: [go.Scatter(x=[s], y=[s])], "t")
    assert len(fig.frames) == 3 and len(fig.layout.sliders[0].steps) == 3
    assert interactive(fig) is fig  # no Jupyter kernel here: the plotly slider is the view
