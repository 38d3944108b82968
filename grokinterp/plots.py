"""Plotly figures built from tables (metrics log, analysis tables), never from models."""

import math
import re
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from grokinterp.metrics.phases import Phases

PHASE_COLOURS = {"memorization": "rgba(255,160,0,0.10)", "plateau": "rgba(200,0,0,0.08)",
                 "transition": "rgba(0,120,255,0.10)", "generalized": "rgba(0,170,0,0.08)"}
PANEL_HEIGHT = 200


ERROR_SUFFIXES = ("_se", "_err")
"""A column ``X_se`` (standard error) or ``X_err`` (an error bound) is drawn as X's error bars, not as a panel."""
CHANCE_SUFFIX = "_chance"
"""A column ``PREFIX_chance`` is drawn as a dashed line (with ``PREFIX_chance_sd`` as a band) on the panel of every
column that starts with ``PREFIX_``."""


CHAIN_PATTERN = r"(.+)_chain(\d+)"
"""Columns ``X_chain0``, ``X_chain1``, ... (one estimate per chain) are drawn as faint markers on X's panel."""


def _is_annotation(col: str, table: pd.DataFrame) -> bool:
    """Error and chance columns that decorate another column's panel instead of getting their own."""
    for suffix in ERROR_SUFFIXES:
        if col.endswith(suffix) and col[: -len(suffix)] in table.columns:
            return True
    chain = re.fullmatch(CHAIN_PATTERN, col)
    return CHANCE_SUFFIX in col or (chain is not None and chain.group(1) in table.columns)


def _series_groups(table: pd.DataFrame) -> tuple[list[str], dict[str, list[str]]]:
    """Scalar columns to draw as lines, and families of per-index columns (``embed_power_k1..``) as heatmaps."""
    families: dict[str, list[str]] = {}
    lines = []
    for col in table.columns:
        if col == "step" or not pd.api.types.is_numeric_dtype(table[col]) or table[col].nunique() <= 1:
            continue  # constant columns (e.g. the number of rows used) say nothing over time
        if _is_annotation(col, table):
            continue
        match = re.fullmatch(r"(.+_k)(\d+)", col)
        if match and col.startswith("embed_power"):
            families.setdefault(match.group(1), []).append(col)
        else:
            lines.append(col)
    return lines, families


LABEL_PX_PER_CHAR = 6.5  # width of a 10-px label's character, for laying the phase labels out
PLOT_WIDTH_PX = 900  # the width a figure's plot area is assumed to have when labels are laid out
LABEL_ROW_PX = 13  # vertical step between rows of phase labels


def label_rows(centres: Sequence[float], widths: Sequence[float]) -> list[int]:
    """A row (0 = top) for each label centred at ``centres`` with ``widths`` (same units), so that labels in one row
    never overlap: each label, left to right, takes the highest row whose last label ends before it begins."""
    ends: list[float] = []  # right edge of the last label in each row
    rows = [0] * len(centres)
    for i in sorted(range(len(centres)), key=lambda i: centres[i]):
        left = centres[i] - widths[i] / 2
        row = next((r for r, end in enumerate(ends) if end <= left), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = centres[i] + widths[i] / 2
        rows[i] = row
    return rows


def shade_phases(fig: go.Figure, phases: Phases | None) -> None:
    """Shade the phases across every panel and label them on the top one; labels of short phases that would
    overlap go on rows below one another instead of on top of each other."""
    if phases is None:
        return
    spans = phases.spans()
    if not spans:
        return
    # one rectangle per phase over the whole height of the figure (the panels share their step axis), and the
    # labels, each added in one layout update: add_vrect per panel took 10 s of `analyze --metric all` (50 ms a call)
    fig.update_layout(shapes=[*fig.layout.shapes, *(
        {"type": "rect", "xref": "x", "yref": "paper", "x0": max(start, 1), "x1": max(end, 1), "y0": 0, "y1": 1,
         "fillcolor": PHASE_COLOURS[name], "line": {"width": 0}, "layer": "below"} for name, start, end in spans)])
    centres = [_log_mid(max(start, 1), max(end, 1)) for _, start, end in spans]
    decades = max(math.log10(max(spans[-1][2], 10)), 1.0)  # the log axis runs from step 1 to the last step
    widths = [len(name) * LABEL_PX_PER_CHAR / PLOT_WIDTH_PX * decades for name, _, _ in spans]
    fig.update_layout(annotations=[*fig.layout.annotations, *(
        {"x": centre, "y": 1.0, "xref": "x", "yref": "y domain", "text": name, "showarrow": False,
         "font": {"size": 10}, "yshift": -LABEL_ROW_PX * level}
        for (name, _, _), centre, level in zip(spans, centres, label_rows(centres, widths)))])


def _log_mid(a: int, b: int) -> float:
    return math.log10(math.sqrt(a * b)) if a > 0 and b > 0 else 0.0


def _positive_steps(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["step"] > 0]  # a log step axis cannot show step 0


def add_training_curves(fig: go.Figure, log: pd.DataFrame, row: int) -> None:
    if log.empty:  # a run whose metrics log is empty (or was lost) still gets its metric panels
        return
    log = _positive_steps(log)
    for col, colour in (("train_acc", "#1f77b4"), ("val_acc", "#d62728")):
        fig.add_trace(go.Scatter(x=log["step"], y=log[col], name=col, line={"color": colour}), row=row, col=1)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], row=row, col=1)


def metric_figure(title: str, table: pd.DataFrame, log: pd.DataFrame, phases: Phases | None) -> go.Figure:
    """Train/val accuracy on top, then one panel per scalar column and a heatmap per per-frequency family, all on
    a shared log-scaled step axis with the phases shaded."""
    lines, families = _series_groups(table)
    n_rows = 1 + len(lines) + len(families)
    fig = make_subplots(rows=n_rows, cols=1, shared_xaxes=True, vertical_spacing=min(0.04, 0.3 / n_rows),
                        subplot_titles=["accuracy", *lines, *(f"{f}* (fraction of power)" for f in families)])
    add_training_curves(fig, log, row=1)
    data = _positive_steps(table)
    for i, col in enumerate(lines, start=2):
        error = next((data[col + s] for s in ERROR_SUFFIXES if col + s in data.columns), None)
        fig.add_trace(go.Scatter(x=data["step"], y=data[col], name=col, mode="lines+markers",
                                 marker={"size": 3}, showlegend=False,
                                 error_y=None if error is None else {"type": "data", "array": error, "thickness": 1}),
                      row=i, col=1)
        _add_chance(fig, data, col, row=i)
        for chain in (c for c in data.columns if re.fullmatch(CHAIN_PATTERN, c) and c.rsplit("_chain", 1)[0] == col):
            fig.add_trace(go.Scatter(x=data["step"], y=data[chain], name=chain, mode="markers", showlegend=False,
                                     marker={"size": 3, "color": "rgba(120,120,120,0.5)"}), row=i, col=1)
    for i, (family, cols) in enumerate(families.items(), start=2 + len(lines)):
        ks = [int(c[len(family):]) for c in cols]
        fig.add_trace(go.Heatmap(x=data["step"], y=ks, z=data[cols].to_numpy().T, colorscale="Viridis",
                                 showscale=False, name=family), row=i, col=1)
        fig.update_yaxes(title_text="frequency k", row=i, col=1)
    fig.update_xaxes(type="log", row=n_rows, col=1, title_text="step (log scale)")
    for r in range(1, n_rows):
        fig.update_xaxes(type="log", row=r, col=1)
    shade_phases(fig, phases)
    fig.update_layout(title=title, height=PANEL_HEIGHT * n_rows + 120, template="plotly_white",
                      legend={"orientation": "h", "y": 1.0 + 40 / (PANEL_HEIGHT * n_rows), "x": 0})
    return fig


def _add_chance(fig: go.Figure, data: pd.DataFrame, col: str, row: int) -> None:
    """The chance level that applies to ``col`` (``PREFIX_chance`` for a column ``PREFIX_...``), dashed, with
    ± its ``_sd`` band where the table has one."""
    prefix = col.split("_", 1)[0]
    chance = f"{prefix}{CHANCE_SUFFIX}"
    if "_" not in col or chance not in data.columns or data.empty:
        return
    level = float(data[chance].mean())
    fig.add_hline(y=level, line={"dash": "dash", "color": "grey", "width": 1}, row=row, col=1,
                  annotation_text="chance", annotation_font_size=9)
    if f"{chance}_sd" in data.columns:
        sd = float(data[f"{chance}_sd"].mean())
        fig.add_hrect(y0=level - sd, y1=level + sd, fillcolor="grey", opacity=0.12, line_width=0, row=row, col=1)


def training_figure(title: str, log: pd.DataFrame, phases: Phases | None) -> go.Figure:
    """Accuracy and loss (log) against steps, phases shaded."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, subplot_titles=["accuracy", "loss"])
    add_training_curves(fig, log, row=1)
    data = _positive_steps(log)
    for col, colour in (("train_loss", "#1f77b4"), ("val_loss", "#d62728")):
        fig.add_trace(go.Scatter(x=data["step"], y=data[col], name=col, line={"color": colour, "dash": "dot"}),
                      row=2, col=1)
    fig.update_yaxes(type="log", title_text="loss", row=2, col=1)
    fig.update_xaxes(type="log", row=1, col=1)
    fig.update_xaxes(type="log", title_text="step (log scale)", row=2, col=1)
    shade_phases(fig, phases)
    fig.update_layout(title=title, height=600, template="plotly_white")
    return fig


def points_figure(title: str, points: pd.DataFrame, step_labels: dict[int, str]) -> go.Figure:
    """Scatter panels of per-token 2D points (columns panel, step, token, x, y, colour, note): one row per panel,
    one column per snapshot step; the note shows on hover."""
    panels = list(dict.fromkeys(points["panel"]))
    steps = sorted(points["step"].unique())
    fig = make_subplots(rows=len(panels), cols=len(steps), horizontal_spacing=0.02,
                        vertical_spacing=min(0.08, 0.4 / max(len(panels), 1)),
                        column_titles=[f"step {s} ({step_labels.get(s, '')})" for s in steps], row_titles=panels)
    for r, panel in enumerate(panels, start=1):
        for c, step in enumerate(steps, start=1):
            sel = points[(points["panel"] == panel) & (points["step"] == step)]
            text = [f"token {t}: {note}" for t, note in zip(sel["token"], sel["note"])]
            fig.add_trace(go.Scatter(x=sel["x"], y=sel["y"], mode="markers", text=text,
                                     marker={"color": sel["colour"], "colorscale": "Phase", "size": 6},
                                     showlegend=False, hovertemplate="%{text}<extra></extra>"), row=r, col=c)
            fig.update_xaxes(showticklabels=False, row=r, col=c)
            fig.update_yaxes(showticklabels=False, row=r, col=c)
    fig.update_layout(title=title, height=260 * len(panels) + 120, width=max(900, 240 * len(steps)),
                      template="plotly_white")
    return fig


SEED_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "triangle-down", "star", "hexagon", "pentagon")
WEIGHT_DECAY_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def censored_median(steps: Sequence[int | None]) -> float | None:
    """Median of steps-to-threshold where None means 'not reached within the budget' (larger than any reached
    value): defined only while fewer than half the runs are missing, else None."""
    values = sorted(math.inf if s is None else float(s) for s in steps)
    if not values:
        return None
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return None if math.isinf(median) else median


def steps_figure(title: str, table: pd.DataFrame, series: str = "series") -> go.Figure:
    """Steps to 99% validation accuracy against the training fraction (Power et al. 2022, Fig. 1 right), from a
    sweep's results table (``sweep.results_table``): a colour per value of the ``series`` column (by default the
    operation and setting), a marker per seed, a line through the median of the seeds, and runs that never got
    there as open markers at the steps they trained (a lower bound, not a value)."""
    table = _with_series(table) if series == "series" else table
    fig = go.Figure()
    seeds = sorted(table["seed"].unique())
    symbol = {s: SEED_SYMBOLS[i % len(SEED_SYMBOLS)] for i, s in enumerate(seeds)}
    for i, label in enumerate(sorted(table[series].unique(), key=str)):
        colour = WEIGHT_DECAY_COLOURS[i % len(WEIGHT_DECAY_COLOURS)]
        runs = table[table[series] == label]
        fracs = sorted(runs["frac_train"].unique())
        steps_at = [[None if pd.isna(s) else int(s) for s in runs[runs["frac_train"] == f]["val_99_step"]]
                    for f in fracs]
        medians = [censored_median(steps) for steps in steps_at]
        # a dash at each median, joined where neighbouring fractions have one (a lone median is still drawn)
        fig.add_trace(go.Scatter(x=fracs, y=medians, mode="lines+markers", line={"color": colour},
                                 marker={"symbol": "line-ew", "size": 16, "line": {"width": 2.5, "color": colour}},
                                 legendgroup=str(label), name=f"{label} (median)", connectgaps=False))
        for seed in seeds:
            mine = runs[runs["seed"] == seed]
            reached, missed = mine[mine["val_99_step"].notna()], mine[mine["val_99_step"].isna()]
            for part, y, open_ in ((reached, "val_99_step", False), (missed, "steps_trained", True)):
                if len(part) == 0:
                    continue
                note = "not reached by step" if open_ else "val acc 99% at step"
                fig.add_trace(go.Scatter(
                    x=part["frac_train"], y=part[y].astype(float), mode="markers", legendgroup=str(label),
                    showlegend=False, text=[f"{r}: {note} {s}" for r, s in zip(part["run"], part[y])],
                    hovertemplate="%{text}<extra></extra>",
                    marker={"color": colour, "size": 9, "symbol": symbol[seed] + ("-open" if open_ else ""),
                            "line": {"width": 1.5, "color": colour}}))
    for seed in seeds:  # legend-only entries: which marker is which seed
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"seed {seed}",
                                 marker={"color": "grey", "size": 9, "symbol": symbol[seed]}))
    if table["val_99_step"].isna().any():
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="not reached (drawn at its budget)",
                                 marker={"color": "grey", "size": 9, "symbol": "circle-open"}))
    fig.update_xaxes(title_text="training fraction", tickformat=".0%")
    fig.update_yaxes(title_text="steps to 99% validation accuracy", type="log")
    fig.update_layout(title=title, height=520, template="plotly_white")
    return fig


def _with_series(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a ``series`` column: the operation, and the setting where a sweep has more than one."""
    several = table["setting"].nunique() > 1
    ops = table["op"].nunique() > 1 or not several
    label = [" · ".join(part for part in ((op if ops else ""), (setting if several else "")) if part)
             for op, setting in zip(table["op"], table["setting"])]
    return table.assign(series=label)


def min_fraction(table: pd.DataFrame) -> pd.DataFrame:
    """Per (op, setting): the smallest training fraction at which at least half the seeds reached 99% validation
    accuracy within the budget (NaN if none did), and the range of each seed's own smallest such fraction."""
    rows = []
    for (op, setting), runs in table.groupby(["op", "setting"], sort=True):
        reached = runs.assign(hit=runs["val_99_step"].notna())
        share = reached.groupby("frac_train")["hit"].mean()
        enough = share[share >= 0.5]
        per_seed = reached[reached["hit"]].groupby("seed")["frac_train"].min()
        rows.append({"op": op, "setting": setting, "commutative": bool(runs["commutative"].iloc[0]),
                     "min_frac": float(enough.index.min()) if len(enough) else math.nan,
                     "seed_low": float(per_seed.min()) if len(per_seed) else math.nan,
                     "seed_high": float(per_seed.max()) if len(per_seed) else math.nan,
                     "fracs_tried": ", ".join(f"{f:g}" for f in sorted(runs["frac_train"].unique())),
                     "seeds": runs["seed"].nunique()})
    return pd.DataFrame(rows)


def sweep_figure(kind: str, name: str, table: pd.DataFrame) -> go.Figure:
    """One of the sweep figures (``sweep.FIGURES``) from a results table, drawn from the finished members; the
    title names how many are missing."""
    done = table[table["finished"].astype(bool)]
    missing = table[~table["finished"].astype(bool)]
    note = "" if missing.empty else (f" — {len(missing)} of {len(table)} members not finished and left out: "
                                     + ", ".join(missing["run"].head(5)) + (" …" if len(missing) > 5 else ""))
    if kind == "steps":
        return steps_figure(f"{name}: steps to 99% validation accuracy{note}", done)
    fig = go.Figure()
    if kind == "min-fraction":
        summary = min_fraction(done) if len(done) else pd.DataFrame(columns=["op", "setting"])
        settings = sorted(summary["setting"].unique())
        ops = sorted(summary["op"].unique(), key=lambda op: (not summary[summary.op == op].commutative.iloc[0], op))
        for i, setting in enumerate(settings):
            part = summary[summary["setting"] == setting].set_index("op").reindex(ops)
            fig.add_trace(go.Bar(
                x=[f"{op}{' (c)' if c else ''}" for op, c in zip(ops, part["commutative"])], y=part["min_frac"],
                name=setting, marker_color=WEIGHT_DECAY_COLOURS[i % len(WEIGHT_DECAY_COLOURS)],
                error_y={"type": "data", "symmetric": False, "array": part["seed_high"] - part["min_frac"],
                         "arrayminus": part["min_frac"] - part["seed_low"]},
                text=["none" if math.isnan(v) else f"{v:.0%}" for v in part["min_frac"]], textposition="outside",
                hovertemplate="%{x}: %{y:.0%} (fractions tried: %{customdata})<extra>" + setting + "</extra>",
                customdata=part["fracs_tried"]))
        fig.update_yaxes(title_text="smallest training fraction reaching 99% val acc", tickformat=".0%",
                         range=[0, 1.05])
        fig.update_xaxes(title_text="operation ((c): commutative); error bars: range of the seeds' own smallest")
        title = f"{name}: data needed to generalize within the budget{note}"
    elif kind == "best-val":
        for i, (label, runs) in enumerate(_with_series(done).groupby("series", sort=True)):
            stats = runs.groupby("frac_train")["best_val_acc"].agg(["mean", "std", "count"]).reset_index()
            se = (stats["std"] / stats["count"] ** 0.5).fillna(0.0)
            fig.add_trace(go.Scatter(x=stats["frac_train"], y=stats["mean"], error_y={"type": "data", "array": se},
                                     mode="lines+markers", name=label,
                                     line={"color": WEIGHT_DECAY_COLOURS[i % len(WEIGHT_DECAY_COLOURS)]}))
        fig.update_xaxes(title_text="training fraction", tickformat=".0%")
        fig.update_yaxes(title_text="best validation accuracy within the budget (mean ± s.e. over seeds)",
                         tickformat=".0%", range=[0, 1.05])
        title = f"{name}: best validation accuracy per intervention{note}"
    else:
        raise ValueError(f"unknown sweep figure {kind!r}")
    fig.update_layout(title=title, height=520, template="plotly_white", barmode="group")
    return fig


def llc_calibration_figure(title: str, summary: pd.DataFrame, traces: pd.DataFrame) -> go.Figure:
    """LLC calibration: λ̂ ± se against the step size ε for each nβ (top), then the running λ̂ trace
    nβ·(L_B(w_t) − L(w*)) of every chain for each (ε, nβ), the burn-in shaded; a usable setting's traces are flat
    after the burn-in, neither climbing nor diverging."""
    settings = list(summary[["step_size", "nbeta"]].itertuples(index=False, name=None))
    cols = max(1, len({e for e, _ in settings}))
    trace_rows = math.ceil(len(settings) / cols)
    fig = make_subplots(rows=1 + trace_rows, cols=cols, vertical_spacing=0.08,
                        specs=[[{"colspan": cols}] + [None] * (cols - 1)] + [[{}] * cols for _ in range(trace_rows)],
                        subplot_titles=["λ̂ ± se against the step size", *(
                            f"ε={e:g}, nβ={b:.4g}" + (" (diverged)" if d else f": λ̂={v:.3g}±{se:.2g}")
                            for (e, b), v, se, d in zip(settings, summary["llc"], summary["llc_se"],
                                                        summary["diverged"]))])
    for nbeta, group in summary.groupby("nbeta"):
        fig.add_trace(go.Scatter(x=group["step_size"], y=group["llc"], name=f"nβ={nbeta:.4g}", mode="lines+markers",
                                 error_y={"type": "data", "array": group["llc_se"]}), row=1, col=1)
    fig.update_xaxes(type="log", title_text="step size ε", row=1, col=1)
    burnin = int(summary["n_burnin"].iloc[0]) if len(summary) else 0
    for k, (eps, nbeta) in enumerate(settings):
        r, c = 2 + k // cols, 1 + k % cols
        sel = traces[(traces["step_size"] == eps) & (traces["nbeta"] == nbeta)]
        for chain, rows in sel.groupby("chain"):
            fig.add_trace(go.Scatter(x=rows["draw"], y=rows["llc_trace"], mode="lines", line={"width": 1},
                                     name=f"chain {chain}", showlegend=False), row=r, col=c)
        if burnin:
            fig.add_vrect(x0=0, x1=burnin, fillcolor="rgba(0,0,0,0.06)", line_width=0, row=r, col=c)
    fig.update_layout(title=title, height=320 + 220 * trace_rows, template="plotly_white")
    return fig
