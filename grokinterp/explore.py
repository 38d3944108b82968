"""Views over a run's checkpoints for notebooks.

Each view is a plotly figure with one frame per checkpoint and plotly's own slider, so it works in any HTML
render (no widget front end needed). ``interactive(fig)`` wraps such a figure in an ipywidgets slider when a
Jupyter kernel with widget support is running, and returns the static figure otherwise.
"""

import numpy as np
import plotly.graph_objects as go
import torch

from grokinterp.checkpoints import Run
from grokinterp.metrics.fourier import fourier_plane_basis, frequency_power
from grokinterp.metrics.phases import phases_from_log
from grokinterp.metrics.sn import irrep_fve, symmetric_group


def frames_figure(steps: list[int], traces_at, title: str, **layout) -> go.Figure:
    """A figure whose frame i shows ``traces_at(steps[i])`` (a list of traces), with a step slider."""
    frames = [go.Frame(data=traces_at(step), name=str(step)) for step in steps]
    fig = go.Figure(data=frames[0].data, frames=frames)
    slider = {"active": 0, "currentvalue": {"prefix": "step "},
              "steps": [{"label": str(s), "method": "animate",
                         "args": [[str(s)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True}}]}
                        for s in steps]}
    fig.update_layout(title=title, sliders=[slider], template="plotly_white", **layout)
    for axis in ("x", "y"):  # plotly keeps the first frame's axis ranges while scrubbing: fix them to fit all
        if f"{axis}axis_range" in layout or f"{axis}axis_type" in layout:
            continue
        arrays = [np.asarray(getattr(trace, axis), dtype=float) for frame in frames for trace in frame.data
                  if isinstance(trace, go.Scatter) and getattr(trace, axis) is not None]
        values = np.concatenate([a.ravel() for a in arrays]) if arrays else np.array([])
        if values.size:
            lo, hi = float(values.min()), float(values.max())
            pad = 0.05 * (hi - lo or 1.0)
            fig.update_layout({f"{axis}axis_range": [lo - pad, hi + pad]})
    return fig


def has_widget_frontend() -> bool:
    """Whether code runs in a Jupyter kernel (where ipywidgets can render)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def interactive(fig: go.Figure):
    """An ipywidgets slider over the figure's frames in a Jupyter kernel; the static figure elsewhere."""
    if not has_widget_frontend() or not fig.frames:
        return fig
    import ipywidgets

    names = [frame.name for frame in fig.frames]
    slider = ipywidgets.SelectionSlider(options=names, value=names[-1], description="step",
                                        layout={"width": "80%"})
    output = ipywidgets.Output()

    def show(name: str) -> None:
        frame = fig.frames[names.index(name)]
        layout = fig.layout.to_plotly_json()
        layout.pop("sliders", None)  # the widget slider replaces plotly's
        static = go.Figure(data=frame.data, layout=layout)
        static.update_layout(title=f"{fig.layout.title.text} (step {name})")
        with output:
            output.clear_output(wait=True)
            static.show()

    slider.observe(lambda change: show(change["new"]), names="value")
    show(names[-1])
    return ipywidgets.VBox([slider, output])


def _embedding(run: Run, step: int, rows: int) -> torch.Tensor:
    return run.state_dict(step)["embed.W_E"][:rows].double()


def spectrum_frames(run: Run, steps: list[int] | None = None) -> go.Figure:
    """Fraction of the embedding's Fourier power at each frequency, per checkpoint (mod-p runs)."""
    steps = steps or run.steps
    p = run.data.n_symbols

    def traces(step: int):
        power = frequency_power(_embedding(run, step, p))
        return [go.Bar(x=np.arange(1, len(power) + 1), y=(power / power.sum()).numpy(), marker_color="#636efa")]

    return frames_figure(steps, traces, "Fourier power of W_E by frequency", xaxis_title="frequency k",
                         yaxis_title="fraction of power", yaxis_range=[0, 1])


def circle_frames(run: Run, k: int, steps: list[int] | None = None) -> go.Figure:
    """The embedding projected on the plane of its frequency-k Fourier directions at the last checkpoint, per
    checkpoint: the tokens close into a circle, in the order k·x mod p, as the run groks."""
    steps = steps or run.steps
    p = run.data.n_symbols
    plane = fourier_plane_basis(_embedding(run, run.steps[-1], p), k)  # [d_model, 2], the last checkpoint's
    colour = (k * np.arange(p)) % p

    def traces(step: int):
        E = _embedding(run, step, p)
        xy = ((E - E.mean(dim=0)) @ plane).numpy()
        return [go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers", text=[f"token {x}" for x in range(p)],
                           marker={"color": colour, "colorscale": "Phase", "size": 8})]

    return frames_figure(steps, traces, f"W_E on the frequency-{k} plane (colour: {k}·x mod {p})",
                         yaxis_scaleanchor="x")


def accuracy_frames(run: Run, steps: list[int] | None = None) -> go.Figure:
    """Train/validation accuracy over the run, the phases shaded and the current checkpoint marked."""
    steps = steps or run.steps
    log = run.metrics
    log = log[log.step > 0]
    curves = [go.Scatter(x=log.step, y=log[col], name=col, line={"color": colour})
              for col, colour in (("train_acc", "#1f77b4"), ("val_acc", "#d62728"))]

    def traces(step: int):
        return [*curves, go.Scatter(x=[max(step, 1)] * 2, y=[0, 1.02], mode="lines", name="checkpoint",
                                    line={"color": "black", "dash": "dash"})]

    fig = frames_figure(steps, traces, "accuracy", xaxis_type="log", xaxis_title="step (log scale)",
                        yaxis_range=[0, 1.02])
    phases = phases_from_log(run.store.read_metrics())
    for name, start, end in phases.spans():
        fig.add_vrect(x0=max(start, 1), x1=max(end, 1), fillcolor="rgba(0,0,0,0.05)", line_width=0,
                      annotation_text=name, annotation_position="top left", layer="below")
    return fig


def coset_frames(run: Run, steps: list[int] | None = None) -> go.Figure:
    """The first two principal components of W_E per checkpoint (S_n runs), coloured by left coset of the point
    stabilizer of n-1: points of one colour gather as the run learns the coset structure."""
    steps = steps or run.steps
    group = symmetric_group(run.config.task.n)
    labels = group.left_cosets(group.point_stabilizer(group.n - 1))

    def traces(step: int):
        E = _embedding(run, step, group.order)
        u, s, _ = torch.linalg.svd(E - E.mean(dim=0), full_matrices=False)
        xy = (u[:, :2] * s[:2]).numpy()
        return [go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers", text=[f"element {g}" for g in range(group.order)],
                           marker={"color": labels, "colorscale": "Turbo", "size": 8})]

    return frames_figure(steps, traces, f"W_E, first two PCs, coloured by left coset of Stab({group.n - 1})")


def irrep_frames(run: Run, steps: list[int] | None = None) -> go.Figure:
    """Fraction of W_E's variance in each irreducible representation, per checkpoint (S_n runs)."""
    steps = steps or run.steps
    group = symmetric_group(run.config.task.n)

    def traces(step: int):
        fve = irrep_fve(_embedding(run, step, group.order).numpy(), group)
        names = [n for n in fve if n != "trivial"]
        return [go.Bar(x=names, y=[fve[n] for n in names], marker_color="#00cc96")]

    return frames_figure(steps, traces, "fraction of W_E variance per irrep", yaxis_range=[0, 1])
