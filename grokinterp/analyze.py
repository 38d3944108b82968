"""Run a registered metric over a run's checkpoints and write ``analyses/<run>/<metric>.csv`` plus a figure.

Rows are cached per checkpoint in ``analyses/<run>/.cache/<metric>.jsonl`` (appended as each step finishes, tagged
with the metric's parameters), so re-running computes only new checkpoints and an interrupted analysis keeps what
it finished. One process at a time analyses a given run folder and metric (a lock), and the CSV and HTML are
written whole or not at all.
"""

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from grokinterp.checkpoints import Run, RunError, write_text_atomic
from grokinterp.errors import AnalysisError
from grokinterp.metrics import METRICS, Metric
from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.phases import Phases, phases_from_log
from grokinterp.plots import metric_figure, points_figure, training_figure
from grokinterp.tasks import OPERATIONS

log = logging.getLogger(__name__)

DEFAULT_ANALYSES = Path("analyses")



@dataclass
class AnalysisResult:
    metric: str
    table: pd.DataFrame
    csv_path: Path
    html_path: Path
    computed: int
    """Checkpoints computed in this call (the rest came from the cache)."""
    skipped: list[int]


def get_metric(name: str, run: Run) -> Metric:
    if name not in METRICS:
        raise AnalysisError(f"unknown metric {name!r}; choose one of: {', '.join(METRICS)}, all")
    metric = METRICS[name]
    family = run.config.task.family
    if family not in metric.families:
        raise AnalysisError(f"metric {name!r} applies to {'/'.join(metric.families)} tasks, but run {run.name} "
                            f"is {run.config.task.op} ({family}); choose another metric")
    return metric


def metrics_for(run: Run) -> list[str]:
    """Every registered metric that applies to the run's task."""
    family = run.config.task.family
    return [name for name, m in METRICS.items() if family in m.families]


def select_steps(available: list[int], spec: str | None) -> list[int]:
    """Checkpointed steps picked by ``spec``: None or 'all'; a comma list of steps and START:END ranges
    (inclusive, either end may be empty), e.g. '0,100,1000:5000'."""
    if spec is None or spec == "all":
        return list(available)
    def as_int(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise AnalysisError(f"--steps {spec!r}: use 'all', steps like 0,100 and ranges like 1000:5000") from None

    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if ":" in part:
            lo, hi = part.split(":", 1)
            lo_v = as_int(lo) if lo else 0
            hi_v = as_int(hi) if hi else max(available, default=0)
            chosen.update(s for s in available if lo_v <= s <= hi_v)
            continue
        step = as_int(part)
        if step not in available:
            near = min(available, key=lambda s: abs(s - step)) if available else None
            raise AnalysisError(f"step {step} has no checkpoint; the nearest is {near}")
        chosen.add(step)
    if not chosen:
        raise AnalysisError(f"--steps {spec!r} selects no checkpoint")
    return sorted(chosen)


def _params_key(params: dict[str, Any], seed: int) -> str:
    text = json.dumps({"params": params, "seed": seed}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _read_cache(path: Path, key: str) -> dict[int, dict[str, Any]]:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from an interrupted analysis
        if row.pop("_key", None) == key:
            rows[int(row["step"])] = row
    return rows


@contextmanager
def _exclusive(path: Path, what: str):
    """Hold an exclusive lock on ``path`` (created if missing), waiting for another process that holds it: two
    analyses of one run would each compute every row and append it to the cache."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is analysing %s; waiting for it, then using its rows", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_html(figures: list, path: Path, header: str = "") -> None:
    """One self-contained page (plotly.js inlined once) holding the figures."""
    parts = [fig.to_html(include_plotlyjs=(i == 0), full_html=False) for i, fig in enumerate(figures)]
    write_text_atomic(path, f"<html><head><meta charset='utf-8'><title>{path.stem}</title></head><body>{header}"
                      + "".join(parts) + "</body></html>")


def snapshot_steps(available: list[int], phases: Phases) -> dict[int, str]:
    """Checkpoints nearest to the start, the phase boundaries and the end, with their labels."""
    marks = {"init": 0, "train 99%": phases.train_99, "val 50%": phases.val_50, "val 99%": phases.val_99,
             "last": available[-1]}
    out: dict[int, str] = {}
    for label, step in marks.items():
        if step is None:
            continue
        nearest = min(available, key=lambda s: abs(s - step))
        out[nearest] = f"{out[nearest]}, {label}" if nearest in out else label
    return dict(sorted(out.items()))


def analysis_dir(run: Run, out_root: str | os.PathLike = DEFAULT_ANALYSES) -> Path:
    return Path(out_root) / run.name


def analyze(
    run: Run,
    metric_name: str,
    *,
    steps: str | None = None,
    out_root: str | os.PathLike = DEFAULT_ANALYSES,
    device: str = "cpu",
    seed: int = 0,
    skip_corrupt: bool = False,
    progress: bool = True,
) -> AnalysisResult:
    """Compute ``metric_name`` on the selected checkpoints of ``run``; write its table and figure."""
    metric = get_metric(metric_name, run)
    log_rows = run.store.read_metrics()
    phases = phases_from_log(log_rows)
    log_frame = pd.DataFrame(log_rows)
    out = analysis_dir(run, out_root)
    csv_path, html_path = out / f"{metric.name}.csv", out / f"{metric.name}.html"

    if metric.fn is None:  # phases: a table of boundaries, and the training curves with them shaded
        table = pd.DataFrame([phases.as_row()])
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(csv_path, table.to_csv(index=False))
        _write_html([training_figure(f"{run.name}: phases", log_frame, phases)], html_path)
        return AnalysisResult(metric.name, table, csv_path, html_path, 0, [])

    available = run.steps
    if not available:
        raise AnalysisError(f"run {run.name} has no checkpoints yet")
    chosen = select_steps(available, steps)
    data = run.data.to(device)

    def checkpoint(step: int) -> Checkpoint:
        return Checkpoint(step=step, model=run.model(step, device=device), data=data, config=run.config, seed=seed)

    params = metric.prepare(checkpoint(available[-1])) if metric.prepare else {}
    key = _params_key(params, seed)
    cache_path = out / ".cache" / f"{metric.name}.jsonl"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache_path.with_suffix(".lock"), f"{run.path} for {metric.name}"):
        cached = _read_cache(cache_path, key)
        todo = [s for s in chosen if s not in cached]
        skipped: list[int] = []
        bar = _bar(progress, len(todo), f"{run.name} {metric.name}")
        with open(cache_path, "a") as cache_file:
            for step in todo:
                try:
                    ckpt = checkpoint(step)
                except RunError as err:
                    if not skip_corrupt:
                        raise
                    log.warning("skipping step %d: %s", step, err)
                    skipped.append(step)
                    continue
                row = {"step": step, **metric.fn(ckpt, **params)}
                cached[step] = row
                cache_file.write(json.dumps({**row, "_key": key}) + "\n")
                cache_file.flush()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

        table = pd.DataFrame([cached[s] for s in sorted(cached)])
        title = f"{run.name}: {metric.name}" + (f"  ({_describe_params(params)})" if params else "")
        figures = [metric_figure(title, table, log_frame, phases)]
        if metric.points is not None:
            labels = snapshot_steps(sorted(cached), phases)  # only checkpoints that were read successfully
            points = pd.DataFrame([{"step": step, **p} for step in labels
                                   for p in metric.points(checkpoint(step), **params)])
            write_text_atomic(out / f"{metric.name}_points.csv", points.to_csv(index=False))
            figures.append(points_figure(f"{run.name}: {metric.name} at the phase boundaries", points, labels))
        write_text_atomic(csv_path, table.to_csv(index=False))
        _write_html(figures, html_path)
    return AnalysisResult(metric.name, table, csv_path, html_path, len(todo) - len(skipped), skipped)


def _describe_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _bar(enabled: bool, total: int, desc: str):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ckpt", mininterval=0.5, dynamic_ncols=True)


def phases_of(run: Run) -> Phases:
    return phases_from_log(run.store.read_metrics())


def report(run: Run, out_root: str | os.PathLike = DEFAULT_ANALYSES) -> Path:
    """One HTML page: the training curves, then every metric already computed for the run (its CSV under
    analyses/<run>/), on the same log-scaled step axis with the phases shaded."""
    out = analysis_dir(run, out_root)
    log_frame = pd.DataFrame(run.store.read_metrics())
    phases = phases_of(run)
    figures = [training_figure(f"{run.name}: training", log_frame, phases)]
    for name, metric in METRICS.items():
        csv = out / f"{name}.csv"
        if metric.fn is None or not csv.exists():
            continue
        figures.append(metric_figure(f"{run.name}: {name}", pd.read_csv(csv), log_frame, phases))
    summary = phases.as_row()
    header = (f"<h1>grokinterp report: {run.name}</h1><p>{run.config.task.op} "
              f"({OPERATIONS[run.config.task.op].formula}); phases: "
              + ", ".join(f"{k} = {v}" for k, v in summary.items()) + "</p>")
    if len(figures) == 1:
        header += "<p>No analyses yet: run <code>grokinterp analyze RUN --metric all</code> first.</p>"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    _write_html(figures, path, header=header)
    return path
