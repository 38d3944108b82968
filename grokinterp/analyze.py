"""Run a registered metric over a run's checkpoints and write ``analyses/<run>/<metric>.csv`` plus a figure.

``<run>`` is the run's path under ``checkpoints/`` (``analysis_dir``). Rows are cached per checkpoint in
``analyses/<run>/.cache/<metric>.jsonl``, appended as each step finishes, so re-running computes only new
checkpoints and an interrupted analysis keeps what it finished. A cached row is used only when its key matches what
is being analysed: the run's identity, the checkpoint's weights digest, the metric's version, its effective
parameters (defaults included) and the seed; anything else (another run's rows, an older format) is recomputed.
One process at a time analyses a given run folder and metric (a lock), and the CSV and HTML are written whole or
not at all.
"""

import fcntl
import hashlib
import inspect
import json
import logging
import math
import os
import types
import typing
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from grokinterp.checkpoints import DEFAULT_ROOT, RESUMABLE_FIELDS, Run, RunError, write_text_atomic
from grokinterp.config import RunConfig
from grokinterp.errors import AnalysisError
from grokinterp.metrics import METRICS, Metric
from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.phases import Phases, phases_from_log
from grokinterp.plots import llc_calibration_figure, metric_figure, points_figure, training_figure
from grokinterp.sweep import MANIFEST_FILE
from grokinterp.tasks import OPERATIONS

log = logging.getLogger(__name__)

DEFAULT_ANALYSES = Path("analyses")
CACHE_FORMAT = 2
"""Format of a cache line, part of its key: lines of format 1 (a bare hash of the parameters, with no run or
weights in it) matched another run's rows and are never trusted."""


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
    if metric.ops is not None and run.config.task.op not in metric.ops:
        formulas = ", ".join(OPERATIONS[op].formula for op in metric.ops)
        raise AnalysisError(f"metric {name!r} applies to {formulas} only, but run {run.name} is "
                            f"{run.config.task.op} ({OPERATIONS[run.config.task.op].formula}); choose another metric")
    return metric


def metrics_for(run: Run) -> list[str]:
    """Every registered metric that applies to the run's task and runs with ``--metric all`` (``Metric.in_all``)."""
    family = run.config.task.family
    op = run.config.task.op
    return [name for name, m in METRICS.items()
            if family in m.families and (m.ops is None or op in m.ops) and m.in_all]


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


def run_identity(run: Run) -> str:
    """SHA-256 of what the run is: its config and its task table with the split (the data file's stored digest).

    The budget and stop rule (``RESUMABLE_FIELDS``) are left out: ``train --resume --steps N`` rewrites them without
    touching a checkpoint, and must not throw away a long analysis. What training did is pinned anyway by each
    checkpoint's own weights digest, the other half of a cache row's key."""
    config = run.config.to_dict()
    config["train"] = {k: v for k, v in config["train"].items() if k not in RESUMABLE_FIELDS}
    text = json.dumps({"config": config, "table": run.data_digest()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _parameter_names(fn) -> list[str]:
    """Every parameter of a metric function after the checkpoint."""
    return list(inspect.signature(fn).parameters)[1:]


def effective_params(metric: Metric, prepared: dict[str, Any] | None = None,
                     overrides: dict[str, Any] | None = None, config: RunConfig | None = None) -> dict[str, Any]:
    """The parameters ``metric.fn`` is called with: its own defaults, then what ``prepare`` computed for the run,
    then ``overrides``, each checked against the parameter's type and range (``check_param``), and all of them
    together against the run's ``config`` (``Metric.check``) when it is given. Defaults are spelled out so that
    changing one in the code changes the cache key."""
    names = _parameter_names(metric.fn)
    unknown = [k for k in overrides or {} if k not in names]
    if unknown:
        raise AnalysisError(f"metric {metric.name!r} has no parameter {unknown[0]!r}; its parameters: "
                            f"{', '.join(names) or 'none'}")
    for name, value in (overrides or {}).items():
        check_param(metric, name, value)
    defaults = {name: p.default for name, p in inspect.signature(metric.fn).parameters.items()
                if name in names and p.default is not inspect.Parameter.empty}
    params = {**defaults, **(prepared or {}), **(overrides or {})}
    problem = metric.check(params, config) if metric.check is not None and config is not None else None
    if problem:
        raise AnalysisError(f"metric {metric.name!r}: {problem}")
    return params


# What a numeric parameter (or each item of a list) must satisfy: "positive" unless the metric names another rule.
_RULES = {
    "positive": (lambda v: v > 0, "> 0"),
    "nonnegative": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


class NameList(list):
    """The kind of a parameter annotated ``list[str]`` (e.g. irrep names), as ``param_type`` reports it."""


def param_type(metric: Metric, name: str) -> tuple[type, bool]:
    """(the type of parameter ``name`` of ``metric.fn``, whether None is allowed): int, float or list (of ints),
    from the annotation, else from the default's type."""
    parameter = inspect.signature(metric.fn).parameters[name]
    try:
        hint = typing.get_type_hints(metric.fn).get(name)
    except (NameError, TypeError):  # an annotation that does not resolve: fall back on the default's type
        hint = None
    if hint is None:
        default = parameter.default
        return (float if default is inspect.Parameter.empty or default is None else type(default)), default is None
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    base = next(a for a in args if a is not type(None))
    if typing.get_origin(base) is list:
        return (NameList if typing.get_args(base) == (str,) else list), type(None) in args
    return base, type(None) in args


def _type_words(kind: type, optional: bool) -> str:
    words = {int: "an integer", float: "a number", list: "a comma list of integers",
             NameList: "a comma list of names"}.get(kind, kind.__name__)
    return words + (" or none" if optional else "")


def check_param(metric: Metric, name: str, value: Any) -> None:
    """Refuse, in one line, a value of the wrong type or out of the parameter's range (``metric.param_rules``)."""
    kind, optional = param_type(metric, name)
    if value is None and optional:
        return
    if kind is NameList:
        if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            raise AnalysisError(f"metric {metric.name!r}: {name} takes {_type_words(kind, optional)}, got {value!r}")
        return
    if kind not in (int, float, list):  # no rule for other kinds of parameter
        return
    items = value if kind is list and isinstance(value, list) and value else [value]
    numeric = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items)
    if kind is float:
        typed = numeric and all(math.isfinite(item) for item in items)
    else:  # int, or a list of ints: whole numbers
        typed = numeric and all(float(item).is_integer() for item in items)
    if not typed or (kind is list) != isinstance(value, list):
        raise AnalysisError(f"metric {metric.name!r}: {name} takes {_type_words(kind, optional)}, got {value!r}")
    rule, bound = _RULES[metric.param_rules.get(name, "positive")]
    if not all(rule(item) for item in items):
        raise AnalysisError(f"metric {metric.name!r}: {name} must be {bound}, got {value!r}")


def parse_param(metric: Metric, name: str, text: str) -> Any:
    """The value of ``--param name=text`` for ``metric``, typed as its function declares ('none', or 'all', for
    None where allowed: all rows, no chunking, each checkpoint's own key frequencies; comma lists for lists),
    checked; a bad one is refused in one line that shows the form."""
    kind, optional = param_type(metric, name)
    text = text.strip()
    try:
        if optional and text.lower() in ("all", "none"):
            value = None
        elif kind is list:
            value = [int(item) for item in text.split(",")]
        elif kind is NameList:
            value = [item.strip() for item in text.split(",") if item.strip()]
        elif kind is int:
            value = int(text)
        else:
            value = float(text)
    except ValueError:
        example = {int: "64", float: "0.01", list: "1,14,35", NameList: "standard,sign"}.get(kind, "1")
        raise AnalysisError(f"--param {name}={text}: {metric.name}'s {name} takes {_type_words(kind, optional)}, "
                            f"e.g. --param {name}={example}") from None
    check_param(metric, name, value)
    return value


def metric_parameter_names(metric: Metric) -> list[str]:
    """The parameters ``--param`` may set (none for metrics read off the log)."""
    return [] if metric.fn is None else _parameter_names(metric.fn)


def metric_parameters(metric: Metric) -> list[str]:
    """``name=TYPE`` for every parameter of the metric, for ``analyze --help``."""
    forms = {int: "INT", float: "FLOAT", list: "INTS", NameList: "NAMES"}
    out = []
    for name in metric_parameter_names(metric):
        kind, optional = param_type(metric, name)
        out.append(f"{name}={forms.get(kind, 'VALUE')}{'|none' if optional else ''}")
    return out


def _accepted(fn, params: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` that ``fn`` takes (a metric's ``points`` takes fewer than its ``fn``)."""
    names = _parameter_names(fn)
    return {k: v for k, v in params.items() if k in names}


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def _read_cache(path: Path, key: dict[str, Any], digests: dict[int, str]) -> dict[int, dict[str, Any]]:
    """Cached rows, by step, whose key is ``key`` plus that step's weights digest; every other line is ignored."""
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            step, stored = int(entry["row"]["step"]), entry["key"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a torn line from an interrupted analysis, or a line of an older format
        if step in digests and _canonical(stored) == _canonical({**key, "weights": digests[step]}):
            rows[step] = entry["row"]
    return rows


def _ends_a_line(path: Path) -> bool:
    """Whether the file is empty or ends with a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


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


def analysis_dir(run: Run | str | os.PathLike, out_root: str | os.PathLike = DEFAULT_ANALYSES) -> Path:
    """Where the analyses of a run (or a sweep folder) go: its path under ``checkpoints/``, so that
    ``checkpoints/swA/frac0.30_wd1_seed0`` -> ``analyses/swA/frac0.30_wd1_seed0``. A folder outside
    ``checkpoints/`` gets its name and a short digest of its absolute path (``/data/r`` -> ``analyses/r-1a2b3c4d``),
    and a sweep's members go inside their sweep's folder, beside its results table (``/data/sw/m`` ->
    ``analyses/sw-5e6f7a8b/m``). Two runs of one name never share a folder."""
    path = Path(run.path if isinstance(run, Run) else run).resolve()
    if (path.parent / MANIFEST_FILE).is_file():
        return analysis_dir(path.parent, out_root) / path.name
    root = DEFAULT_ROOT.resolve()
    if path != root and path.is_relative_to(root):
        return Path(out_root) / path.relative_to(root)
    return Path(out_root) / f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


@dataclass
class _Job:
    """One metric's share of an analysis: its parameters and cache key, the rows it has, the steps it lacks."""

    metric: Metric
    shown: dict[str, Any]
    """The parameters named in the figure's title: what ``prepare`` computed and what the caller overrode."""
    params: dict[str, Any]
    key: dict[str, Any]
    cache_path: Path
    cached: dict[int, dict[str, Any]]
    todo: set[int]
    computed: int = 0


def analyze(
    run: Run,
    metric_name: str,
    *,
    steps: str | None = None,
    out_root: str | os.PathLike = DEFAULT_ANALYSES,
    device: str = "cpu",
    seed: int = 0,
    params: dict[str, Any] | None = None,
    skip_corrupt: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> AnalysisResult:
    """Compute ``metric_name`` on the selected checkpoints of ``run``; write its table and figure. ``params``
    overrides the metric function's keyword parameters (see ``effective_params``); ``workers`` as in
    ``analyze_metrics``."""
    return analyze_metrics(run, [metric_name], steps=steps, out_root=out_root, device=device, seed=seed,
                           params={metric_name: params or {}}, skip_corrupt=skip_corrupt, progress=progress,
                           workers=workers)[0]


def analyze_metrics(
    run: Run,
    metric_names: list[str],
    *,
    steps: str | None = None,
    out_root: str | os.PathLike = DEFAULT_ANALYSES,
    device: str = "cpu",
    seed: int = 0,
    params: dict[str, dict[str, Any]] | None = None,
    skip_corrupt: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> list[AnalysisResult]:
    """Compute each metric of ``metric_names`` on the selected checkpoints of ``run``, and write each one's table
    and figure; ``params`` maps a metric's name to its overrides. One result per metric, in the order given.

    The loop runs over checkpoints, not metrics: each checkpoint is read once and every metric that lacks its row
    gets the same ``Checkpoint``, so they share its forward passes (``Checkpoint.train_logits``,
    ``table_logits``). Every parameter of every metric is checked before any work.

    ``workers``: processes that compute checkpoints side by side, each on one CPU thread (``default_workers``
    when None: as many as torch has threads, on a CPU under Linux). These models are too small for a matmul to
    keep two threads busy: on 2 cores, two one-thread workers analyse 1.4x the checkpoints a second that one
    process on two threads does. The workers are forked, so they start at once and share what this process has
    loaded; only this process writes the cache. A row is the same function of its checkpoint whichever process
    computes it, to float rounding (a matmul's sums may group differently on one thread than on two)."""
    metrics = [get_metric(name, run) for name in metric_names]
    _check_workers(workers, device)
    overrides = {m.name: (params or {}).get(m.name, {}) for m in metrics}
    log_rows = run.store.read_metrics()
    phases = phases_from_log(log_rows)
    log_frame = pd.DataFrame(log_rows)
    out = analysis_dir(run, out_root)
    results: dict[str, AnalysisResult] = {}

    for metric in (m for m in metrics if m.fn is None):  # phases: a table of boundaries, and the training curves
        if overrides[metric.name]:
            raise AnalysisError(f"metric {metric.name!r} has no parameters; drop {', '.join(overrides[metric.name])}")
    per_checkpoint = [m for m in metrics if m.fn is not None]
    for metric in per_checkpoint:  # refuse a bad parameter before any work
        effective_params(metric, overrides=overrides[metric.name], config=run.config)
    if per_checkpoint and not run.steps:
        raise AnalysisError(f"run {run.name} has no checkpoints yet")
    for metric in (m for m in metrics if m.fn is None):
        table = pd.DataFrame([phases.as_row()])
        csv_path, html_path = out / f"{metric.name}.csv", out / f"{metric.name}.html"
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(csv_path, table.to_csv(index=False))
        _write_html([training_figure(f"{run.name}: phases", log_frame, phases)], html_path)
        results[metric.name] = AnalysisResult(metric.name, table, csv_path, html_path, 0, [])
    if per_checkpoint:
        results.update(_analyze_checkpoints(run, per_checkpoint, overrides, steps=steps, out=out, device=device,
                                            seed=seed, skip_corrupt=skip_corrupt, progress=progress,
                                            log_frame=log_frame, phases=phases, workers=workers))
    return [results[m.name] for m in metrics]


def _analyze_checkpoints(run: Run, metrics: list[Metric], overrides: dict[str, dict[str, Any]], *, steps: str | None,
                         out: Path, device: str, seed: int, skip_corrupt: bool, progress: bool,
                         log_frame: pd.DataFrame, phases: Phases, workers: int | None) -> dict[str, AnalysisResult]:
    available = run.steps
    chosen = select_steps(available, steps)
    data = run.data.to(device)

    def checkpoint(step: int) -> Checkpoint:
        return Checkpoint(step=step, model=run.model(step, device=device), data=data, config=run.config, seed=seed)

    last = checkpoint(available[-1])
    jobs: list[_Job] = []
    for metric in metrics:
        prepared = metric.prepare(last) if metric.prepare else {}
        params = effective_params(metric, prepared, overrides[metric.name], run.config)
        key = {"format": CACHE_FORMAT, "run": run_identity(run), "metric": metric.name, "version": metric.version,
               "params": params, "seed": seed}
        jobs.append(_Job(metric, {**prepared, **overrides[metric.name]}, params, key,
                         out / ".cache" / f"{metric.name}.jsonl", {}, set()))
    del last
    (out / ".cache").mkdir(parents=True, exist_ok=True)
    skipped: list[int] = []

    def skip(step: int, err: RunError) -> None:
        if not skip_corrupt:
            raise err
        log.warning("skipping step %d: %s", step, err)
        skipped.append(step)

    with ExitStack() as stack:
        for job in sorted(jobs, key=lambda j: j.metric.name):  # one order for every process: no deadlock
            stack.enter_context(_exclusive(job.cache_path.with_suffix(".lock"), f"{run.path} for {job.metric.name}"))
        digests: dict[int, str] = {}
        wanted = set(chosen)
        for step in available:
            try:
                digests[step] = run.weights_digest(step)
            except RunError as err:
                if step in wanted:
                    skip(step, err)  # an unselected step with a bad header is simply not in the table
        files = {}
        for job in jobs:
            job.cached = _read_cache(job.cache_path, job.key, digests)
            job.todo = {s for s in chosen if s not in job.cached and s in digests}
            files[job.metric.name] = stack.enter_context(open(job.cache_path, "a"))
            if not _ends_a_line(job.cache_path):
                files[job.metric.name].write("\n")  # end a killed writer's torn line: the next row starts afresh
        todo = sorted(set().union(*(job.todo for job in jobs)))
        n_workers = default_workers(device, len(todo)) if workers is None else workers
        bar = _bar(progress, len(todo), f"{run.name} {', '.join(job.metric.name for job in jobs)}")
        work = [(step, [job.metric.name for job in jobs if step in job.todo]) for step in todo]
        by_name = {job.metric.name: job for job in jobs}
        for step, rows in _computed_rows(work, _StepWork(checkpoint, by_name), n_workers):
            if isinstance(rows, RunError):
                skip(step, rows)
                continue
            for name, row in rows.items():
                job = by_name[name]
                job.cached[step] = row
                job.computed += 1
                files[name].write(json.dumps({"key": {**job.key, "weights": digests[step]}, "row": row}) + "\n")
                files[name].flush()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return {job.metric.name: _write_outputs(run, job, out, checkpoint, log_frame, phases, skipped) for job in jobs}


def _check_workers(workers: int | None, device: str) -> None:
    import multiprocessing

    import torch

    if workers is None or workers == 1:
        return
    if workers < 1:
        raise AnalysisError(f"workers must be at least 1, got {workers}")
    if torch.device(device).type != "cpu":
        raise AnalysisError(f"workers analyse on CPU threads; on {device} use one (--workers 1)")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise AnalysisError("workers are forked processes, which this system does not have; use --workers 1")


def default_workers(device: str, n_checkpoints: int) -> int:
    """Worker processes ``analyze_metrics`` uses when not told: one per torch thread (so ``OMP_NUM_THREADS=1``
    gives one), at most 8 and at most one per 4 checkpoints, on a CPU under Linux (the workers are forked); else 1
    (a GPU is shared better by one process)."""
    import sys

    import torch

    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return 1
    return max(1, min(torch.get_num_threads(), 8, n_checkpoints // 4))


@dataclass
class _StepWork:
    """The rows of one checkpoint for the metrics named: what a worker (or this process) computes per step."""

    checkpoint: Any
    """step -> Checkpoint (raises RunError for an unreadable one)."""
    jobs: dict[str, _Job]

    def __call__(self, item: tuple[int, list[str]]) -> tuple[int, dict[str, dict[str, Any]] | RunError]:
        step, names = item
        try:
            ckpt = self.checkpoint(step)
        except RunError as err:
            return step, err
        return step, {name: {"step": step, **self.jobs[name].metric.fn(ckpt, **self.jobs[name].params)}
                      for name in names}


_FORKED_WORK: _StepWork | None = None
"""What forked workers compute with: set by the parent just before it forks, inherited (never pickled)."""


def _forked_worker_start() -> None:
    import signal

    import torch

    torch.set_num_threads(1)  # one thread a worker: also keeps a forked child out of OpenMP's inherited pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends the pool; no tracebacks


def _forked_step(item: tuple[int, list[str]]):
    return _FORKED_WORK(item)


def _computed_rows(work: list[tuple[int, list[str]]], compute: _StepWork, workers: int):
    """(step, rows or RunError) for every item of ``work``, in order of completion: here, or in ``workers``
    forked processes."""
    global _FORKED_WORK
    if workers <= 1 or len(work) <= 1:
        yield from map(compute, work)
        return
    import multiprocessing

    _FORKED_WORK = compute
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(work)), _forked_worker_start) as pool:
            yield from pool.imap_unordered(_forked_step, work)
    finally:
        _FORKED_WORK = None


def _write_outputs(run: Run, job: _Job, out: Path, checkpoint, log_frame: pd.DataFrame, phases: Phases,
                   skipped: list[int]) -> AnalysisResult:
    """The metric's table (every checkpoint of the run with a row for its key, also those of an earlier
    ``--steps``) and its figure, each written whole or not at all."""
    metric = job.metric
    csv_path, html_path = out / f"{metric.name}.csv", out / f"{metric.name}.html"
    table = pd.DataFrame([job.cached[s] for s in sorted(job.cached)])
    title = f"{run.name}: {metric.name}" + (f"  ({_describe_params(job.shown)})" if job.shown else "")
    figures = [metric_figure(title, table, log_frame, phases)]
    if metric.points is not None:
        labels = snapshot_steps(sorted(job.cached), phases)  # only checkpoints that were read successfully
        points = pd.DataFrame([{"step": step, **p} for step in labels
                               for p in metric.points(checkpoint(step), **_accepted(metric.points, job.params))])
        write_text_atomic(out / f"{metric.name}_points.csv", points.to_csv(index=False))
        figures.append(points_figure(f"{run.name}: {metric.name} at the phase boundaries", points, labels))
    write_text_atomic(csv_path, table.to_csv(index=False))
    _write_html(figures, html_path)
    return AnalysisResult(metric.name, table, csv_path, html_path, job.computed, list(skipped))


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
    ``analysis_dir(run)``), on the same log-scaled step axis with the phases shaded."""
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


@dataclass
class LLCCalibration:
    summary: pd.DataFrame
    """One row per (step_size, nbeta): llc, llc_se, drift, diverged, the chains' estimates."""
    csv_path: Path
    traces_path: Path
    html_path: Path


def calibrate_llc(
    run: Run,
    step: int | None = None,
    *,
    step_sizes: list[float],
    nbetas: list[float] | None = None,
    out_root: str | os.PathLike = DEFAULT_ANALYSES,
    device: str = "cpu",
    seed: int = 0,
    params: dict[str, Any] | None = None,
    progress: bool = True,
) -> LLCCalibration:
    """Run the LLC estimator at one checkpoint (default: the last) for every step size ε × nβ (default: nβ of
    ``default_nbeta``), with the ``llc`` metric's other parameters (``params`` overrides them, checked as for
    ``analyze``). Writes ``llc_calibration.csv`` (λ̂, se, drift, divergence per setting),
    ``llc_calibration_traces.csv`` (every chain's running λ̂ trace) and ``llc_calibration.html`` under the run's
    analysis folder. Pick the setting whose traces are flat after the burn-in, then pass it to
    ``analyze(run, "llc", params={"step_size": ..., "nbeta": ...})``."""
    from grokinterp.metrics.llc import default_nbeta, estimate_llc

    metric = get_metric("llc", run)
    overrides = dict(params or {})
    for fixed in ("step_size", "nbeta"):
        if fixed in overrides:
            raise AnalysisError(f"calibrate-llc sweeps {fixed}; give it as a list of values, not as --param")
    for fixed in ("rel_error", "max_chains"):
        if fixed in overrides:
            raise AnalysisError(f"calibrate-llc runs n_chains chains at every setting; drop {fixed} (set n_chains)")
    for name, values in (("step size", step_sizes), ("nbeta", nbetas or [])):
        if any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0) for v in values):
            raise AnalysisError(f"every {name} must be a positive number, got {values}")
    if not step_sizes:
        raise AnalysisError("give at least one step size, e.g. 1e-5,1e-4,1e-3")
    effective = effective_params(metric, overrides=overrides, config=run.config)
    available = run.steps
    if not available:
        raise AnalysisError(f"run {run.name} has no checkpoints yet")
    step = available[-1] if step is None else select_steps(available, str(step))[0]
    data = run.data.to(device)
    ckpt = Checkpoint(step=step, model=run.model(step, device=device), data=data, config=run.config, seed=seed)
    tokens, labels = ckpt.training_rows(effective["max_rows"])
    nbetas = nbetas or [default_nbeta(len(labels))]
    settings = [(eps, nbeta) for nbeta in nbetas for eps in sorted(step_sizes)]
    chain_params = {k: effective[k] for k in ("gamma", "n_chains", "n_draws", "n_burnin", "batch_size")}
    rows, traces = [], []
    bar = _bar(progress, len(settings), f"{run.name} llc calibration at step {step}")
    for eps, nbeta in settings:
        est = estimate_llc(ckpt.model, tokens, labels, generator=ckpt.generator(4), step_size=eps, nbeta=nbeta,
                           **chain_params)
        rows.append({"step": step, "step_size": eps, "nbeta": nbeta, "llc": est.value, "llc_se": est.se,
                     "drift": est.drift, "diverged": est.diverged, "init_loss": est.init_loss, **chain_params,
                     **{f"llc_chain{c}": v for c, v in enumerate(est.per_chain)}})
        running = nbeta * (est.traces - est.init_loss)
        traces += [{"step_size": eps, "nbeta": nbeta, "chain": c, "draw": t, "llc_trace": float(running[c, t])}
                   for c in range(running.shape[0]) for t in range(running.shape[1])]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summary, trace_table = pd.DataFrame(rows), pd.DataFrame(traces)
    out = analysis_dir(run, out_root)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, traces_path, html_path = (out / "llc_calibration.csv", out / "llc_calibration_traces.csv",
                                        out / "llc_calibration.html")
    write_text_atomic(csv_path, summary.to_csv(index=False))
    write_text_atomic(traces_path, trace_table.to_csv(index=False))
    title = f"{run.name}: LLC calibration at step {step} ({_describe_params(chain_params)})"
    _write_html([llc_calibration_figure(title, summary, trace_table)], html_path)
    return LLCCalibration(summary, csv_path, traces_path, html_path)
