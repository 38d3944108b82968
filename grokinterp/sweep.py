"""Populations of runs: a grid over any config fields, trained (stacked where they can be) and saved apart, and the
results table and figures of Power et al.'s Fig. 2.

A sweep is a folder: ``sweep.json`` (the base config, the grid and every member's full config) beside one ordinary
run directory per member. Members that differ only in ``trainer.MEMBER_FIELDS`` (seeds, training fraction, weight
decay, noise scales, the stop rule) and start from the same step share one stack (``trainer.train_group``); the
rest are trained one group after another. A sweep continues where it stopped: finished members are skipped,
unfinished ones resume from their last checkpoint, bit-exactly (``run_members``).

Stacking pays where one model's step leaves the hardware idle: on a GPU (a step is a few dozen tiny kernels) and
for small tables, where per-step overhead dominates. Where one model's step already keeps the CPU busy (nanda2023 on
the fast path runs near the core's float32 peak) stacking shares no arithmetic and gains little.
"""

import itertools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from grokinterp.checkpoints import first_step_reaching, load_run, write_text_atomic
from grokinterp.config import FIELD_SECTION, SECTIONS, ConfigError, RunConfig
from grokinterp.errors import RunError
from grokinterp.resources import check_fits
from grokinterp.tasks import get_operation
from grokinterp.trainer import REACHED, TrainResult, resolve_device, stack_key, train_group, training_mode

log = logging.getLogger(__name__)

MANIFEST_FILE = "sweep.json"
RESULTS = "results"
SEED = "seed"
"""Grid pseudo-field: sets both model_seed and data_seed, so seeds vary the split and the initialization together,
as independent repeats should."""
GridAxis = tuple[str, list[Any]]


# -- the grid ---------------------------------------------------------------------------------------------------
def _field_type(name: str) -> type:
    if name == SEED:
        return int
    section = SECTIONS[FIELD_SECTION[name]]
    return next(f.type for f in section.__dataclass_fields__.values() if f.name == name)


def _parse_value(text: str, kind: type, where: str) -> Any:
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{where} expects true or false, got {text!r}")
    try:
        value = kind(text)
    except ValueError:
        noun = {int: "whole numbers", float: "numbers"}.get(kind, "values")
        raise ConfigError(f"{where} expects {noun}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where} expects finite numbers, got {text!r}")
    return value


def parse_grid_axis(spec: str) -> GridAxis:
    """One ``--grid`` axis: ``FIELD=V1,V2,...`` or, for numbers, ``FIELD=START:STOP:STEP`` (STOP included). Any
    config field (dashes or underscores), or ``seed`` for model_seed and data_seed together."""
    if "=" not in spec:
        raise ConfigError(f"--grid expects FIELD=VALUES such as frac_train=0.3,0.5 or frac_train=0.2:0.8:0.1, got "
                          f"{spec!r}")
    name, text = (part.strip() for part in spec.split("=", 1))
    name = name.replace("-", "_")
    if name != SEED and name not in FIELD_SECTION:
        raise ConfigError(f"--grid: unknown config field {name!r}; any field of `grokinterp train --help` (or seed) "
                          "can be gridded")
    kind = _field_type(name)
    where = f"--grid {name}"
    if text.count(":") == 2 and kind in (int, float):
        start, stop, step = (_parse_value(t.strip(), kind, where) for t in text.split(":"))
        if not step > 0 or stop < start:
            raise ConfigError(f"{where}={text}: a range START:STOP:STEP needs STEP > 0 and STOP >= START")
        count = math.floor((stop - start) / step + 1e-9) + 1
        values = [kind(round(start + i * step, 12)) for i in range(count)]
    else:
        items = [item.strip() for item in text.split(",")]
        if not text.strip() or any(not item for item in items):
            raise ConfigError(f"{where} expects a comma-separated list such as {name}=1,2, got {text!r}")
        values = [_parse_value(item, kind, where) for item in items]
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None:
        raise ConfigError(f"{where} lists {repeated!r} twice; give each value once")
    if kind is int and name == SEED and any(v < 0 for v in values):
        raise ConfigError(f"{where} takes whole numbers >= 0")
    return name, values


def grid_configs(base: RunConfig, grid: Sequence[GridAxis]) -> list[tuple[str, RunConfig, dict[str, Any]]]:
    """Every combination of the grid's values over ``base``, the first axis slowest: (member name, config, the
    grid's values). A bad value is refused in one line naming the member."""
    names = [name for name, _ in grid]
    if not grid:
        raise ConfigError("a sweep needs a grid: give --grid FIELD=VALUES (or --seeds, --fracs, --weight-decays)")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise ConfigError(f"--grid sets {repeated} twice; give each field one axis")
    if SEED in names and ({"model_seed", "data_seed"} & set(names)):
        raise ConfigError("--grid seed sets model_seed and data_seed; do not grid those too")
    members = []
    for combo in itertools.product(*(values for _, values in grid)):
        values = dict(zip(names, combo))
        overrides = {k: v for k, v in values.items() if k != SEED}
        if SEED in values:
            overrides.update(model_seed=values[SEED], data_seed=values[SEED])
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        try:
            config = base.replace(**overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep member {label}: {err}") from None
        if "op" in values:
            values["op"] = config.task.op  # the registry name, so "x-y" and "sub" are one member
        members.append((member_name(values), config, values))
    taken = [name for name, _, _ in members]
    if len(set(taken)) != len(taken):  # e.g. 0.333 and 0.3333 round alike: fall back to numbered names
        members = [(f"m{i:04d}_{name}", c, v) for i, (name, c, v) in enumerate(members)]
    return members


def sweep_configs(base: RunConfig, seeds: Iterable[int], fracs: Iterable[float],
                  weight_decays: Iterable[float]) -> list[RunConfig]:
    """Every (frac, weight decay, seed) combination of ``base``, fraction-major (the grid of ``--fracs``,
    ``--weight-decays`` and ``--seeds``)."""
    grid = shorthand_grid(list(seeds), list(fracs), list(weight_decays))
    return [config for _, config, _ in grid_configs(base, grid)]


_SHORTHANDS = (("--fracs", "frac_train"), ("--weight-decays", "weight_decay"), ("--seeds", SEED))


def shorthand_grid(seeds: list | None, fracs: list | None, weight_decays: list | None) -> list[GridAxis]:
    """The grid axes of the shorthand flags, in the order frac, weight decay, seed (those given)."""
    given = {"--fracs": fracs, "--weight-decays": weight_decays, "--seeds": seeds}
    axes = []
    for flag, name in _SHORTHANDS:
        values = given[flag]
        if values is None:
            continue
        if not values:
            raise ConfigError(f"{flag} is empty; give at least one value, e.g. {flag} {_EXAMPLES[flag]}")
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            raise ConfigError(f"{flag} lists {repeated:g} twice; each grid value once")
        for v in values:
            if flag == "--seeds" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"--seeds takes whole numbers >= 0, got {v!r}")
            if flag == "--fracs" and not 0 < v < 1:
                raise ConfigError(f"--fracs: {v:g} is not a training fraction; each must lie strictly between 0 and 1")
            if flag == "--weight-decays" and not v >= 0:
                raise ConfigError(f"--weight-decays: {v:g} is negative; weight decay must be >= 0")
        axes.append((name, [float(v) if name != SEED else v for v in values]))
    return axes


_EXAMPLES = {"--seeds": "0,1,2", "--fracs": "0.3,0.5,0.7", "--weight-decays": "0.3,1"}


def parse_values(text: str, flag: str, kind: type) -> list:
    """A comma-separated command-line list ('0.3,0.5') as ``kind`` values; a ConfigError names the bad item."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(f"{flag} expects a comma-separated list such as {_EXAMPLES.get(flag, '1,2')}, got {text!r}")
    out = []
    for item in items:
        try:
            value = kind(item)
        except ValueError:
            noun = "whole numbers" if kind is int else "numbers"
            raise ConfigError(f"{flag} expects {noun} such as {_EXAMPLES.get(flag, '1,2')}, got {item!r}") from None
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{flag} expects finite numbers, got {item!r}")
        out.append(value)
    return out


_ABBREVIATIONS = {"frac_train": "frac", "weight_decay": "wd", SEED: "seed", "model_seed": "mseed",
                  "data_seed": "dseed", "op": ""}


def member_name(values: dict[str, Any]) -> str:
    """Run directory name of a sweep member from its grid values, e.g. 'frac0.30_wd1_seed0' or
    'div_weight_noise0.01_seed2'."""
    parts = []
    for name, value in values.items():
        if name == "frac_train":
            text = f"{value:.2f}" if float(f"{value:.2f}") == value else f"{value:g}"  # 0.333 and 0.334 stay apart
        elif isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = str(value)
        parts.append(_ABBREVIATIONS.get(name, name) + text)
    return "_".join(parts)


# -- the manifest -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    name: str
    config: RunConfig
    grid: dict[str, Any]


def write_manifest(folder: Path, base: RunConfig, grid: Sequence[GridAxis],
                   members: Sequence[tuple[str, RunConfig, dict[str, Any]]]) -> Path:
    """``<folder>/sweep.json``: the base config, the grid and every member's name, grid values and full config, so
    a sweep can be read back, continued or redone as one thing."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "base": base.to_dict(),
        "grid": [[name, values] for name, values in grid],
        "members": [{"name": name, "grid": values, "config": config.to_dict()} for name, config, values in members],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = folder / MANIFEST_FILE
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(folder: str | os.PathLike) -> list[Member]:
    """The members of the sweep in ``folder``, as its ``sweep.json`` lists them."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise RunError(f"{folder} is not a sweep folder (it has no {MANIFEST_FILE}); give the folder "
                       "`grokinterp sweep` made")
    try:
        manifest = json.loads(path.read_text())
        if "config" not in manifest["members"][0]:  # written before grids: base + (frac, wd, seed) per member
            base = RunConfig.from_dict(manifest["base"])
            return [Member(m["name"], base.replace(frac_train=m["frac_train"], weight_decay=m["weight_decay"],
                                                   model_seed=m["seed"], data_seed=m["seed"]),
                           {"frac_train": m["frac_train"], "weight_decay": m["weight_decay"], SEED: m["seed"]})
                    for m in manifest["members"]]
        return [Member(m["name"], RunConfig.from_dict(m["config"]), dict(m["grid"])) for m in manifest["members"]]
    except (ValueError, KeyError, TypeError, IndexError, ConfigError) as err:
        raise RunError(f"{path} is damaged ({type(err).__name__}: {err}); restore it from the sweep's command") from None


def same_grid(folder: Path, members: Sequence[tuple[str, RunConfig, dict[str, Any]]]) -> bool:
    """Whether the sweep in ``folder`` has exactly these members (so running the command again continues it)."""
    try:
        saved = read_manifest(folder)
    except RunError:
        return False
    return [(m.name, m.config) for m in saved] == [(name, config) for name, config, _ in members]


def member_state(folder: str | os.PathLike, name: str, budget: int | None = None) -> str:
    """'new' (no run directory yet), 'finished' (budget spent or stop rule met), or 'partial' (started). With
    ``budget`` (the member's budget in sweep.json), a run that spent a smaller one is 'partial': the sweep's budget
    was raised since (``raise_budget``)."""
    path = Path(folder) / name
    if not path.exists():
        return "new"
    try:
        from grokinterp.checkpoints import RunStore

        state = RunStore(path).read_trainer_state()
    except RunError:
        return "partial"
    return "finished" if _finished(state, budget) else "partial"


def _finished(state, budget: int | None) -> bool:
    """Whether a run with trainer state ``state`` (None: no checkpoint yet) is done: its budget spent or its stop rule
    met, and, given the sweep's ``budget``, not a run whose budget was raised since."""
    if state is None or not state.finished:
        return False
    return budget is None or state.stop_reason != "budget" or state.step >= budget


def raise_budget(folder: str | os.PathLike, steps: int, *, write: bool) -> list[Member]:
    """The sweep's members with every budget raised to ``steps`` (``sweep --resume SWEEP --steps N``), and with
    ``write`` their sweep.json rewritten so. Members that spent their old budget train on from their last checkpoint,
    bit-for-bit as if the budget had been ``steps`` from the start; members that met their stop rule stay finished.
    Refuses, in one line, a budget below a member's own or a sweep whose grid sets the budget."""
    folder = Path(folder)
    members = read_manifest(folder)
    if any("steps" in m.grid for m in members):
        raise ConfigError("this sweep's grid sets --steps per run; its budgets cannot all be raised to one value")
    smaller = [m for m in members if steps < m.config.train.steps]
    if smaller:
        raise ConfigError(f"--steps {steps} is below the budget of {smaller[0].name} ({smaller[0].config.train.steps}"
                          "); a resumed sweep's budget can only grow")
    raised = [Member(m.name, m.config.replace(steps=steps), m.grid) for m in members]
    if write:
        path = folder / MANIFEST_FILE
        manifest = json.loads(path.read_text())
        if "config" not in manifest["members"][0]:  # written before grids: rewritten in today's form
            manifest["members"] = [{"name": m.name, "grid": m.grid} for m in members]
        manifest["base"]["train"]["steps"] = steps
        for entry, m in zip(manifest["members"], raised):
            entry["config"] = m.config.to_dict()
        write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return raised


# -- training ---------------------------------------------------------------------------------------------------
def train_many(
    configs: Sequence[RunConfig],
    run_dirs: Sequence[str | os.PathLike],
    *,
    device: str = "auto",
    progress: bool = True,
    group_size: int = 16,
    on_step: Callable[[int], None] | None = None,
) -> list[TrainResult]:
    """Train each config into its own new run directory, up to ``group_size`` of them at once in one stack
    (``group_size=1``: one ordinary run after another). Configs that cannot share a stack are trained in separate
    groups. Returns one result per started run, in the order given; after Ctrl-C the running group is saved as
    'interrupted' and later groups are not started. ``on_step`` is called after each update of each group."""
    configs, run_dirs = list(configs), [Path(d) for d in run_dirs]
    if len(configs) != len(run_dirs):
        raise RunError(f"train_many got {len(configs)} configs but {len(run_dirs)} run directories")
    if group_size < 1:
        raise ConfigError(f"--group-size must be at least 1, got {group_size}")
    if len(set(run_dirs)) != len(run_dirs):
        raise RunError("two sweep members would share a run directory; give each config its own")
    for run_dir in run_dirs:
        if run_dir.exists():
            raise RunError(f"run directory {run_dir} already exists; pick another --name")
    dev = resolve_device(device)
    check_group_fits(configs, run_dirs[0].parent, dev, group_size)
    return _train_in_groups(configs, run_dirs, [False] * len(configs), dev, progress, group_size, on_step,
                            (signal.SIGINT,))[0]


def run_members(folder: str | os.PathLike, names: Sequence[str] | None = None, *, device: str = "auto",
                progress: bool = True, group_size: int = 16, signals: tuple[int, ...] = (signal.SIGINT,),
                on_step: Callable[[int], None] | None = None) -> list[TrainResult]:
    """Train the named members (None: all) of the sweep in ``folder``: a finished member is skipped, an unfinished
    one resumes from its last checkpoint (bit-exact), a missing one starts; members are stacked where they can be.
    When one of ``signals`` arrives, every member in training is saved at its current step as 'interrupted' and
    the function returns. Each member's run lock is taken while it trains."""
    return train_members(folder, names, device=device, progress=progress, group_size=group_size, signals=signals,
                         on_step=on_step).results


@dataclass(frozen=True)
class MembersTrained:
    results: list[TrainResult]
    """One per member trained (finished members are skipped), in the order asked."""
    stopped_by: int | None
    """The signal that stopped the training (None: every member ran to its end)."""


def train_members(folder: str | os.PathLike, names: Sequence[str] | None = None, *, device: str = "auto",
                  progress: bool = True, group_size: int = 16, signals: tuple[int, ...] = (signal.SIGINT,),
                  on_step: Callable[[int], None] | None = None) -> MembersTrained:
    """``run_members``, also saying which signal stopped it: a SLURM job requeues itself on one signal and merely
    ends on another (``grokinterp.slurm``)."""
    folder = Path(folder)
    members = read_manifest(folder)
    by_name = {m.name: m for m in members}
    if names is None:
        names = [m.name for m in members]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise RunError(f"{folder} has no member {unknown[0]!r}; see {folder / MANIFEST_FILE}")
    states = {n: member_state(folder, n, by_name[n].config.train.steps) for n in names}
    todo = [by_name[n] for n in names if states[n] != "finished"]
    if not todo:
        return MembersTrained([], None)
    if group_size < 1:
        raise ConfigError(f"--group-size must be at least 1, got {group_size}")
    dev = resolve_device(device)
    check_group_fits([m.config for m in todo], folder, dev, group_size)
    resume = [states[m.name] == "partial" for m in todo]
    results, stopped_by = _train_in_groups([m.config for m in todo], [folder / m.name for m in todo], resume, dev,
                                           progress, group_size, on_step, signals)
    return MembersTrained(results, stopped_by)


def check_group_fits(configs: Sequence[RunConfig], out: Path, dev: torch.device, group_size: int) -> None:
    """Refuse, before anything is written, a group that cannot fit: the largest config at the largest group."""
    biggest = max(configs, key=lambda c: (c.task.n_symbols, c.model.d_model * c.model.d_mlp, c.task.frac_train))
    check_fits(biggest, out, dev.type, models=min(group_size, len(configs)))


def _start_step(run_dir: Path, resume: bool) -> int:
    if not resume:
        return 0
    from grokinterp.checkpoints import RunStore

    try:
        state = RunStore(run_dir).read_trainer_state()
    except RunError:
        return 0  # train_group reports the damage in one line when it opens the run
    return 0 if state is None else state.step


def plan_groups(configs: Sequence[RunConfig], run_dirs: Sequence[Path], resume: Sequence[bool],
                group_size: int) -> list[list[int]]:
    """The stacks to train, as indices into ``configs``: runs with the same stack key and starting step, by training
    fraction (so a stack pads little), up to ``group_size`` in each."""
    keys: dict[tuple[str, int], list[int]] = {}
    for i, (config, run_dir, again) in enumerate(zip(configs, run_dirs, resume)):
        keys.setdefault((stack_key(config), _start_step(run_dir, again)), []).append(i)
    groups = []
    for index in keys.values():
        index.sort(key=lambda i: configs[i].task.frac_train)
        groups += [index[i : i + group_size] for i in range(0, len(index), group_size)]
    return groups


def _train_in_groups(configs: list[RunConfig], run_dirs: list[Path], resume: list[bool], dev: torch.device,
                     progress: bool, group_size: int, on_step, signals) -> tuple[list[TrainResult], int | None]:
    """Train group after group (``plan_groups``); returns the results and the signal that stopped them, if any."""
    groups = plan_groups(configs, run_dirs, resume, group_size)
    results: dict[int, TrainResult] = {}
    with training_mode(dev, signals) as interrupt:
        for g, group in enumerate(groups):
            if interrupt.requested:
                break
            label = None if len(group) == 1 else "sweep" if len(groups) == 1 else f"sweep {g + 1}/{len(groups)}"
            done = train_group([configs[i] for i in group], [run_dirs[i] for i in group], [resume[i] for i in group],
                               dev, interrupt=interrupt, progress=progress, on_step=on_step, label=label)
            results.update(zip(group, done))
    return [results[i] for i in sorted(results)], interrupt.signum


# -- results (Power et al. 2022, Fig. 2) ------------------------------------------------------------------------
RESULT_COLUMNS = ["run", "op", "commutative", "frac_train", "seed", "setting", "train_99_step", "val_99_step",
                  "best_val_acc", "final_weight_norm", "steps_trained", "budget", "finished", "stop_reason"]


def is_commutative(op: str, size: int) -> bool:
    """Whether x∘y = y∘x on the whole table (where both are defined)."""
    table = get_operation(op).table(size)
    defined = (table >= 0) & (table.T >= 0)
    return bool((table == table.T)[defined].all())


def _setting(values: dict[str, Any]) -> str:
    """What a member's grid values say beyond its operation, fraction and seeds: the intervention it tests."""
    rest = {k: v for k, v in values.items() if k not in ("op", "frac_train", SEED, "model_seed", "data_seed")}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in rest.items()) or "baseline"


def results_table(folder: str | os.PathLike) -> pd.DataFrame:
    """One row per member of the sweep in ``folder``: its grid values, the first logged steps where train and
    validation accuracy reached 99% (<NA> if never), the best validation accuracy within the steps trained, the
    final ‖θ‖, the steps trained and the budget, and whether it finished. Members not started or unreadable are
    rows with finished False and no numbers."""
    folder = Path(folder)
    members = read_manifest(folder)
    grid_fields = list(dict.fromkeys(k for m in members for k in m.grid))
    commutative: dict[tuple[str, int], bool] = {}
    rows = []
    for m in members:
        t = m.config.task
        size = t.p if t.family == "mod" else t.n
        if (t.op, size) not in commutative:
            commutative[(t.op, size)] = is_commutative(t.op, size)
        row = {"run": m.name, "op": t.op, "commutative": commutative[(t.op, size)], "frac_train": t.frac_train,
               "seed": m.config.model.model_seed, "setting": _setting(m.grid), **m.grid,
               "budget": m.config.train.steps, "finished": False, "stop_reason": "not started"}
        if (folder / m.name).exists():
            try:
                run = load_run(folder / m.name)
                log_rows = run.store.read_metrics()
                state = run.store.read_trainer_state()
            except RunError as err:
                row["stop_reason"] = f"unreadable: {err}"
            else:
                row.update(
                    train_99_step=first_step_reaching(log_rows, "train_acc", REACHED),
                    val_99_step=first_step_reaching(log_rows, "val_acc", REACHED),
                    best_val_acc=max((r["val_acc"] for r in log_rows), default=None),
                    final_weight_norm=math.sqrt(log_rows[-1]["weight_norm_sq"]) if log_rows else None,
                    steps_trained=int(log_rows[-1]["step"]) if log_rows else 0,
                    finished=_finished(state, m.config.train.steps),
                    stop_reason=(state.stop_reason or "partial") if state is not None else "partial")
        rows.append(row)
    columns = RESULT_COLUMNS[:6] + [f for f in grid_fields if f not in RESULT_COLUMNS] + RESULT_COLUMNS[6:]
    frame = pd.DataFrame(rows).reindex(columns=columns)
    for col in ("train_99_step", "val_99_step", "steps_trained"):
        frame[col] = pd.array([None if pd.isna(v) else int(v) for v in frame[col]], dtype="Int64")
    return frame


FIGURES = {
    "min-fraction": "for each operation, the smallest training fraction reaching 99% validation accuracy within the "
                    "budget (Power et al. Fig. 2 left)",
    "best-val": "best validation accuracy within the budget against the training fraction, per intervention "
                "(Fig. 2 center)",
    "steps": "steps to 99% validation accuracy against the training fraction, one line per operation and setting",
}


def write_results(folder: str | os.PathLike, analyses_out: str | os.PathLike,
                  figures: Iterable[str] = tuple(FIGURES)) -> tuple[pd.DataFrame, list[Path]]:
    """Write ``results.csv`` and the named figures (self-contained HTML) into the sweep's analysis folder; returns
    the table and the paths written. Built from whatever exists: the figures say how many members are missing."""
    from grokinterp.analyze import analysis_dir
    from grokinterp.plots import sweep_figure

    folder = Path(folder)
    table = results_table(folder)
    out = analysis_dir(folder, analyses_out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{RESULTS}.csv"]
    write_text_atomic(paths[0], table.to_csv(index=False))
    for kind in figures:
        path = out / f"{kind}.html"
        write_text_atomic(path, sweep_figure(kind, folder.name, table).to_html(include_plotlyjs=True, full_html=True))
        paths.append(path)
    return table, paths
