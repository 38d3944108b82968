"""Command line: ``grokinterp train | sweep | analyze | report | runs``. ``main(argv)`` returns the exit code (2 for
bad input)."""

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from grokinterp.checkpoints import DEFAULT_ROOT, find_runs, first_step_reaching, load_run, resolve_run_path
from grokinterp.config import DEFAULT_PRESET, MAX_SEED, PRESETS, SECTIONS, RunConfig, field_docs, get_preset
from grokinterp.errors import GrokinterpError, RunError
from grokinterp.tasks import OPERATIONS

log = logging.getLogger("grokinterp")


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2, like ours
        raise UsageError(message)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, with the field's docstring as help; defaults come from the preset."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} (override the preset)")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f"{docs.get(f.name, '')} [bare default: {f.default}]"
            if f.type is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                   help=help_text)
            else:
                group.add_argument(flag, dest=f.name, type=_typed(f.type, flag), default=None,
                                   metavar=f.type.__name__.upper(), help=help_text)


def _typed(kind: type, flag: str):
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {kind.__name__}, got {text!r}") from None

    convert.__name__ = kind.__name__
    return convert


def _workers(text: str) -> int:
    workers = _typed(int, "--workers")(text)
    if workers < 1:
        raise argparse.ArgumentTypeError(f"--workers must be at least 1, got {workers}")
    return workers


def _number_list(flag: str):
    def convert(text: str) -> list[float]:
        try:
            return [float(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes numbers separated by commas, e.g. 1e-5,1e-4; got "
                                             f"{text!r}") from None

    convert.__name__ = "numbers"
    return convert


def _seed(text: str) -> int:
    seed = _typed(int, "--seed")(text)
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed must lie in [0, {MAX_SEED}], got {seed}")
    return seed


def _metric_catalogue() -> str:
    """The epilog of ``analyze --help``: every registered metric, its description and its parameters."""
    import textwrap

    from grokinterp.analyze import metric_parameters
    from grokinterp.metrics import METRICS

    lines = ["metrics (--metric NAME, or all for every metric of the run's task but the slow llc):"]
    width = max(len(name) for name in METRICS) + 4
    for name, metric in METRICS.items():
        if metric.ops is not None:
            text = metric.description + f" [{', '.join(OPERATIONS[op].formula for op in metric.ops)} only]"
        else:
            text = metric.description + ("" if metric.families == ("mod", "perm") else
                                         f" [{'/'.join(metric.families)} tasks]")
        params = metric_parameters(metric)
        if params:
            text += "; --param " + ", ".join(params)
        lines += textwrap.wrap(text, 110, initial_indent=f"  {name:<{width - 2}}", subsequent_indent=" " * width)
    lines += textwrap.wrap("A parameter that may be none (or all) takes the metric's own choice: every training row "
                           "for max_rows, no chunking for vmap_chunk, each checkpoint's own key frequencies for "
                           "key_freqs (and key irreps for key_irreps), n/log n of the n rows used for nbeta.", 110)
    return "\n".join(lines) + "\n"


def _param_items(items: list[str]) -> list[tuple[str, str]]:
    """``--param`` values as (name, text); one line for a malformed one."""
    out = []
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise UsageError(f"--param {item!r}: write NAME=VALUE, e.g. --param max_rows=all "
                             "(grokinterp analyze --help lists each metric's parameters)")
        out.append((name.strip().replace("-", "_"), text))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="grokinterp", description="Train small transformers that grok and replay the transition.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a run and save dense checkpoints",
                           description="Train a HookedTransformer on a binary-operation table.")
    train.add_argument("--preset", default=None,
                       help=f"starting config: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    train.add_argument("--name", default=None, help="run directory name (default: <preset>_<op>_<time>)")
    train.add_argument("--out", default=str(DEFAULT_ROOT), help="folder that holds run directories (default %(default)s)")
    train.add_argument("--resume", metavar="RUN", default=None,
                       help="continue the run at this path (or name under --out) from its latest checkpoint")
    train.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--rebuild-log", action="store_true",
                       help="with --resume: re-evaluate the checkpoints a truncated metrics.jsonl lacks rows for "
                            "(rows between checkpoints are lost), then train on")
    _add_config_flags(train)

    analyze = sub.add_parser("analyze", help="run a metric over every checkpoint of a run",
                             description="Compute a metric at each checkpoint; write analyses/<run>/<metric>.csv "
                                         "and .html (cached per checkpoint).",
                             epilog=_metric_catalogue(), formatter_class=argparse.RawDescriptionHelpFormatter)
    analyze.add_argument("run", help="run directory (or name under checkpoints/)")
    analyze.add_argument("--metric", required=True,
                         help="a metric name, or 'all' for every metric of the task (an unknown name lists them)")
    analyze.add_argument("--steps", default=None,
                         help="checkpoints to analyse: all (default), or steps and START:END ranges, e.g. 0,100,1000:")
    analyze.add_argument("--out", default="analyses", help="folder for analysis outputs (default %(default)s)")
    analyze.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    analyze.add_argument("--seed", type=_seed, default=0, help="seed of sampling metrics (sharpness probes)")
    analyze.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="set a metric's parameter (repeatable; listed below), e.g. --param max_rows=all "
                              "--param hutchinson_samples=64; part of each cached row's key")
    analyze.add_argument("--skip-corrupt", action="store_true",
                         help="skip unreadable checkpoints with a warning instead of stopping")
    analyze.add_argument("--workers", type=_workers, default=None,
                         help="processes that analyse checkpoints side by side, one CPU thread each (default: one "
                              "per torch thread on a CPU under Linux, at most 8; 1 on a GPU)")
    analyze.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    calibrate = sub.add_parser(
        "calibrate-llc", help="try SGLD step sizes and nβ for the llc metric at one checkpoint; traces as a figure",
        description="Estimate the local learning coefficient at one checkpoint for every step size x nβ; write "
                    "analyses/<run>/llc_calibration.csv, _traces.csv and .html. Choose the setting whose traces are "
                    "flat after the burn-in, then: grokinterp analyze RUN --metric llc --param step_size=E "
                    "--param nbeta=B.")
    calibrate.add_argument("run", help="run directory (or name under checkpoints/)")
    calibrate.add_argument("--step", type=_typed(int, "--step"), default=None,
                           help="checkpoint to calibrate at (default: the last)")
    calibrate.add_argument("--step-sizes", type=_number_list("--step-sizes"), default=[1e-5, 3e-5, 1e-4, 3e-4],
                           help="SGLD step sizes ε, comma separated (default 1e-5,3e-5,1e-4,3e-4)")
    calibrate.add_argument("--nbetas", type=_number_list("--nbetas"), default=None,
                           help="values of nβ, comma separated (default: n/log n for the n rows used)")
    calibrate.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                           help="another llc parameter (gamma, n_chains, n_draws, n_burnin, batch_size, max_rows)")
    calibrate.add_argument("--out", default="analyses", help="folder for analysis outputs (default %(default)s)")
    calibrate.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    calibrate.add_argument("--seed", type=_seed, default=0, help="seed of the chains")
    calibrate.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    report = sub.add_parser("report", help="one HTML page with every computed metric of a run")
    report.add_argument("run", help="run directory (or name under checkpoints/)")
    report.add_argument("--out", default="analyses", help="folder of analysis outputs (default %(default)s)")

    runs = sub.add_parser("runs", help="list runs with steps trained and when they reached 99%% accuracy")
    runs.add_argument("root", nargs="?", default=None,
                      help=f"folder of runs (default {DEFAULT_ROOT}), or a sweep folder: then each of its runs with "
                           "its status (finished, running, queued, failed, stopped, new) on a SLURM cluster or here")

    sweep = sub.add_parser(
        "sweep", help="train a grid over any config fields (operations, fractions, interventions, seeds)",
        description="Train every combination of the grid's values over a config, stacking the runs that can share "
                    "one stack; each is saved as its own run under <out>/<name>/ beside a sweep.json manifest, and "
                    "the results table (results.csv) and figures go to <analyses-out>/<name>/. Run the same command "
                    "again (or `grokinterp sweep --resume <out>/<name>`) to continue a sweep: finished runs are "
                    "skipped, unfinished ones resume where they stopped.",
        epilog="example: grokinterp sweep --preset quick --p 23 --grid op=add,sub,div --grid frac_train=0.3:0.7:0.2 "
               "--grid seed=0,1,2 --steps 4000")
    sweep.add_argument("--grid", action="append", default=[], metavar="FIELD=VALUES",
                       help="one axis of the grid: any config field with comma-separated values (op=add,div) or a "
                            "range START:STOP:STEP (frac_train=0.2:0.8:0.1, STOP included); seed=0,1,2 sets both "
                            "seeds; repeat for more axes (the first varies slowest)")
    sweep.add_argument("--seeds", default=None, help="shorthand for --grid seed=..., e.g. 0,1,2")
    sweep.add_argument("--fracs", default=None, help="shorthand for --grid frac_train=..., e.g. 0.3,0.5,0.7")
    sweep.add_argument("--weight-decays", default=None, help="shorthand for --grid weight_decay=..., e.g. 0.3,1")
    sweep.add_argument("--resume", metavar="SWEEP", default=None,
                       help="continue the sweep in this folder: skip finished runs, resume the others; with "
                            "--steps N, raise every run's budget to N and train the runs that spent theirs on")
    sweep.add_argument("--preset", default=None,
                       help=f"starting config: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    sweep.add_argument("--name", default=None, help="sweep folder name (default: <preset>_<op>_sweep_<time>)")
    sweep.add_argument("--out", default=str(DEFAULT_ROOT),
                       help="folder that holds the sweep folder (default %(default)s)")
    sweep.add_argument("--group-size", type=int, default=16,
                       help="most runs trained at once in one stack; 1 trains one ordinary run after another, the "
                            "faster choice on a CPU for nanda2023-sized models (default %(default)s)")
    sweep.add_argument("--analyses-out", default="analyses",
                       help="folder for the results table and figures (default %(default)s)")
    sweep.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sweep.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: train here (default); slurm: submit the unfinished runs to a SLURM cluster as a "
                            "job array through submitit (pip install 'grokinterp[slurm]'), logs in <sweep>/slurm/; "
                            "watch with `grokinterp runs <sweep>`")
    cluster = sweep.add_argument_group("--launcher slurm")
    cluster.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    cluster.add_argument("--time-limit", type=int, default=None, metavar="MINUTES",
                         help="time limit of each job; near it a job saves its runs and requeues itself (default 60)")
    cluster.add_argument("--gpus-per-job", type=int, default=None, help="GPUs of each job (default 0)")
    cluster.add_argument("--cpus-per-job", type=int, default=None,
                         help="CPU cores of each job; torch uses as many threads (default 1)")
    cluster.add_argument("--members-per-job", type=int, default=None,
                         help="runs each job trains, --group-size of them stacked at a time (default: --group-size)")
    cluster.add_argument("--array-parallelism", type=int, default=None,
                         help="most jobs of the array running at once (default 64)")
    cluster.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                         help="any further sbatch option, e.g. --slurm-param account=lab --slurm-param qos=low")
    cluster.add_argument("--wait", action="store_true",
                         help="wait for the jobs to end, then write the results table and figures")
    _add_config_flags(sweep)

    plot = sub.add_parser("plot", help="a sweep's results table and one of its figures, from what has finished",
                          description="Rebuild <analyses-out>/<sweep>/results.csv from the sweep's runs and draw one "
                                      "of its figures (self-contained HTML beside it).")
    plot.add_argument("sweep", help="sweep folder (with sweep.json)")
    plot.add_argument("figure", help="min-fraction (the smallest training fraction that generalizes, per operation: "
                                     "Power et al. Fig. 2 left), best-val (best validation accuracy per intervention "
                                     "against the fraction: Fig. 2 center) or steps (steps to 99%% validation "
                                     "accuracy against the fraction, per operation)")
    plot.add_argument("--analyses-out", default="analyses", help="folder of analysis outputs (default %(default)s)")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    names = {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from grokinterp.trainer import resolve_device, train  # heavy imports (torch, transformer_lens) only when training

    overrides = _overrides(args)
    if args.resume:
        if args.name or args.preset:
            raise UsageError("--resume continues an existing run; drop --name and --preset")
        run_dir = resolve_run_path(args.resume)
        if not run_dir.is_dir() and (Path(args.out) / args.resume).is_dir():
            run_dir = Path(args.out) / args.resume
        if not run_dir.is_dir():
            raise UsageError(f"no run to resume at {args.resume}; list runs with `grokinterp runs`")
        config = load_run(run_dir).config.replace(**overrides)
    elif args.rebuild_log:
        raise UsageError("--rebuild-log repairs the metrics log of an existing run; use it with --resume RUN")
    else:
        preset = args.preset or DEFAULT_PRESET
        config = get_preset(preset).replace(**overrides)
        name = _plain_name(args.name or f"{preset}_{config.task.op}_{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir = Path(args.out) / name

    device = resolve_device(args.device)  # refuse a bad --device before announcing anything
    if not args.resume and run_dir.exists():
        raise UsageError(f"run directory {run_dir} already exists; pick another --name, or continue it with "
                         f"--resume {run_dir}")
    print(f"{'Resuming' if args.resume else 'Training'} {run_dir} on {device}: {_describe(config)}", file=sys.stderr)
    result = train(config, run_dir, resume=bool(args.resume), device=str(device), progress=not args.no_progress,
                   rebuild_log=args.rebuild_log)
    run = result.run
    rows = run.store.read_metrics()
    last = rows[-1]
    train99, val99 = first_step_reaching(rows, "train_acc", 0.99), first_step_reaching(rows, "val_acc", 0.99)
    print(
        f"\n{result.stop_reason.replace('_', ' ')} at step {result.step} after {result.seconds:.0f} s: "
        f"train acc {last['train_acc']:.1%}, val acc {last['val_acc']:.1%}; "
        f"train acc reached 99% at step {_fmt(train99)}, val acc at step {_fmt(val99)}."
    )
    print(f"Run: {run.path} ({len(run.steps)} checkpoints)")
    if result.stop_reason == "interrupted":
        print(f"Interrupted; continue with:  grokinterp train --resume {run.path}")
    else:
        print("Next:  grokinterp runs")
        print(f"       python -c \"import grokinterp; run = grokinterp.load_run('{run.path}'); print(run.metrics)\"")
    return 130 if result.stop_reason == "interrupted" else 0


def _describe(config: RunConfig) -> str:
    t, m, tr = config.task, config.model, config.train
    batch = "full batch" if tr.batch_size == 0 else f"batch {tr.batch_size}"
    return (f"{t.op} ({OPERATIONS[t.op].formula}) {t.size_label}, {t.frac_train:.0%} train; {m.n_layers} layer(s) "
            f"d_model {m.d_model}; {tr.optimizer} lr {tr.lr:g} wd {tr.weight_decay:g}, {batch}, {tr.steps} steps")


def _plain_name(name: str) -> str:
    if "/" in name or name.startswith("."):
        raise UsageError(f"--name {name!r} must be a plain folder name (no '/', not starting with '.')")
    if not name.isprintable():  # a line break or tab in a folder name breaks the `runs` table and every shell command
        raise UsageError(f"--name {name!r} contains a control character (a line break, tab or the like); use "
                         "letters, digits, '-', '_' and '.'")
    return name


def _check_output_folder(folder: Path, flag: str) -> None:
    """Refuse an output folder that cannot be made: a file on its way, or no permission to write the nearest
    existing folder. Checked before a long job, so that it does not fail only at the end."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is a file, not a folder; give another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: no permission to write in {existing}; give another {flag}")


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _fmt(step) -> str:
    return "-" if step is None else str(step)


_SLURM_FLAGS = ("partition", "time_limit", "gpus_per_job", "cpus_per_job", "members_per_job", "array_parallelism",
                "slurm_param", "wait")


def cmd_sweep(args: argparse.Namespace) -> int:
    from grokinterp.analyze import analysis_dir
    from grokinterp.sweep import (  # heavy imports only when training
        check_group_fits,
        grid_configs,
        parse_grid_axis,
        parse_values,
        raise_budget,
        read_manifest,
        run_members,
        same_grid,
        shorthand_grid,
        write_manifest,
    )
    from grokinterp.trainer import resolve_device

    overrides = _overrides(args)
    if args.group_size < 1:
        raise UsageError(f"--group-size must be at least 1, got {args.group_size}")
    slurm = _slurm_options(args)  # before anything is written: submitit and sbatch must be there
    if args.resume:
        others = [k for k in overrides if k != "steps"]
        if args.grid or args.seeds or args.fracs or args.weight_decays or others or args.preset or args.name:
            raise UsageError("--resume continues a sweep as its sweep.json says; drop the grid, config flags, "
                             "--preset and --name (only --steps may be given, to raise every run's budget)")
        folder = Path(args.resume)
        if "steps" in overrides:  # checked now, written once every other check has passed
            members = [(m.name, m.config, m.grid) for m in raise_budget(folder, overrides["steps"], write=False)]
        else:
            members = [(m.name, m.config, m.grid) for m in read_manifest(folder)]
    else:
        grid = [parse_grid_axis(spec) for spec in args.grid]
        grid += shorthand_grid(None if args.seeds is None else parse_values(args.seeds, "--seeds", int),
                               None if args.fracs is None else parse_values(args.fracs, "--fracs", float),
                               None if args.weight_decays is None else
                               parse_values(args.weight_decays, "--weight-decays", float))
        gridded = {"model_seed", "data_seed"} if any(n == "seed" for n, _ in grid) else set()
        gridded |= {n for n, _ in grid}
        clash = next((k for k in overrides if k in gridded), None)
        if clash:
            raise UsageError(f"--{clash.replace('_', '-')} is set by the sweep's grid; give it there, or drop it "
                             "from the grid")
        preset = args.preset or DEFAULT_PRESET
        base = get_preset(preset).replace(**overrides)
        members = grid_configs(base, grid)
        name = _plain_name(args.name or f"{preset}_{base.task.op}_sweep_{time.strftime('%Y%m%d-%H%M%S')}")
        folder = Path(args.out) / name
        if folder.exists() and not same_grid(folder, members):
            raise UsageError(f"sweep folder {folder} already exists with another grid; pick another --name, or "
                             f"continue it with `grokinterp sweep --resume {folder}`")
    if slurm is None:
        device = resolve_device(args.device)  # refuse a bad --device before writing anything
    else:  # the device is resolved on the node; here only its spelling is checked
        device = _device_for_cluster(args.device, slurm.gpus_per_job)
    _check_output_folder(analysis_dir(folder, args.analyses_out), "--analyses-out")
    if slurm is None:  # a job checks the memory of its own node
        check_group_fits([c for _, c, _ in members], folder.parent, device, args.group_size)
    continuing = folder.exists()
    if not continuing:
        write_manifest(folder, base, grid, members)
    elif args.resume and "steps" in overrides:
        raise_budget(folder, overrides["steps"], write=True)
    if slurm is not None:
        return _sweep_on_slurm(folder, members, slurm, args, continuing, device)
    print(f"{'Continuing' if continuing else 'Sweep'} {folder} on {device}: {len(members)} runs "
          f"({' x '.join(f'{len(v)} {n}' for n, v in _axes(members))}), up to {args.group_size} at once",
          file=sys.stderr)
    results = run_members(folder, device=str(device), progress=not args.no_progress, group_size=args.group_size)
    return _print_results(folder, args.analyses_out, f"{len(results)} trained now",
                          f"Not finished; continue with:  grokinterp sweep --resume {folder}", 130)


def _print_results(folder: Path, analyses_out: str, trained: str, unfinished: str, code: int) -> int:
    """Write the sweep's results table and figures from what has finished, print the table and name what is
    missing; ``code`` is the exit code when something is."""
    from grokinterp.sweep import write_results

    table, paths = write_results(folder, analyses_out)
    shown = [c for c in table.columns if c not in ("run", "commutative", "setting", "budget", "stop_reason",
                                                   "final_weight_norm", "train_99_step")]
    rows = [tuple(_cell(v) for v in row) for row in table[shown].itertuples(index=False)]
    print()
    _print_table(tuple(c.replace("_", " ") for c in shown), rows)
    done = int(table["finished"].sum())
    print(f"\nRuns: {folder} ({done} of {len(table)} finished; {trained})")
    print("Results: " + "\n         ".join(str(p) for p in paths))
    if done < len(table):
        missing = list(table.loc[~table["finished"].astype(bool), "run"])
        print(f"Missing from the results: {', '.join(missing)}")
        print(unfinished)
        return code
    print(f"Next:  grokinterp runs {folder}")
    return 0


def _slurm_options(args: argparse.Namespace):
    """The SLURM launcher's options (None for --launcher local); refuses slurm flags without it, and a machine
    without submitit or sbatch, before anything is written."""
    given = [f for f in _SLURM_FLAGS if getattr(args, f) not in (None, [], False)]
    if args.launcher != "slurm":
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} is an option of --launcher slurm; add --launcher slurm "
                             "or drop it")
        return None
    from grokinterp.slurm import SlurmOptions, check_available

    check_available()
    for flag, low in (("time_limit", 1), ("gpus_per_job", 0), ("cpus_per_job", 1), ("members_per_job", 1),
                      ("array_parallelism", 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least {low}, got {value}")
    extra = {}
    for spec in args.slurm_param:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--slurm-param expects KEY=VALUE such as account=lab, got {spec!r}")
        extra[key.strip().lstrip("-")] = value.strip()
    defaults = SlurmOptions()
    return SlurmOptions(
        partition=args.partition,
        time_min=args.time_limit or defaults.time_min,
        gpus_per_job=defaults.gpus_per_job if args.gpus_per_job is None else args.gpus_per_job,
        cpus_per_job=args.cpus_per_job or defaults.cpus_per_job,
        array_parallelism=args.array_parallelism or defaults.array_parallelism,
        members_per_job=args.members_per_job or args.group_size,
        extra=extra)


def _device_for_cluster(device: str, gpus: int) -> str:
    """A --device that a node can resolve: its spelling checked here, CUDA only with GPUs asked for."""
    import torch

    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise UsageError(f"unknown --device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
        if kind == "cuda" and gpus < 1:
            raise UsageError(f"--device {device} needs GPUs on the node: add --gpus-per-job 1")
    return device


def _sweep_on_slurm(folder: Path, members, options, args: argparse.Namespace, continuing: bool, device: str) -> int:
    from grokinterp import slurm

    statuses, note = slurm.sweep_status(folder)
    if note:
        raise UsageError(f"cannot tell which runs of {folder} are already queued or running: {note}")
    busy = slurm.live(statuses)
    todo = [s.name for s in statuses if s.state not in ("finished", "queued", "running")]
    if busy:
        print(f"{len(busy)} run(s) already queued or running in job(s) "
              f"{', '.join(sorted({s.job for s in busy}))}; not submitted again", file=sys.stderr)
    if todo:
        jobs = slurm.submit(folder, todo, options, device=device, group_size=args.group_size)
        array = sorted({j.split("_")[0] for j in jobs})
        print(f"{'Continuing' if continuing else 'Sweep'} {folder} on SLURM: {len(todo)} of {len(members)} runs in "
              f"{len(jobs)} job(s) (job {', '.join(array)}; {options.members_per_job} runs per job, "
              f"{options.cpus_per_job} CPU(s), {options.gpus_per_job} GPU(s), {options.time_min} min"
              + (f", partition {options.partition}" if options.partition else "") + ")", file=sys.stderr)
        print(f"Logs: {folder / slurm.JOBS_DIR}/")
    elif not busy:
        return _print_results(folder, args.analyses_out, "nothing left to submit", "", 0)
    waiting = todo + [s.name for s in busy]
    if not args.wait:
        print(f"Watch:  grokinterp runs {folder}\nResults of what has finished:  grokinterp plot {folder} steps"
              f"{'' if args.analyses_out == 'analyses' else ' --analyses-out ' + args.analyses_out}")
        return 0
    try:
        statuses = slurm.wait(folder, waiting)
    except KeyboardInterrupt:
        print(f"\nStopped waiting; the jobs go on. Watch:  grokinterp runs {folder}", file=sys.stderr)
        return 130
    failed = [s for s in statuses if s.state == "failed"]
    for s in failed:
        print(f"failed: {s.name} (job {s.job}): {s.note}", file=sys.stderr)
    return _print_results(folder, args.analyses_out, f"{len(waiting)} trained on SLURM now",
                          f"Not finished; resubmit with:  grokinterp sweep --resume {folder} --launcher slurm", 1)


def _axes(members) -> list[tuple[str, list]]:
    """The grid's axes as its members show them (for the one-line summary)."""
    axes: dict[str, list] = {}
    for _, _, values in members:
        for k, v in values.items():
            if v not in axes.setdefault(k, []):
                axes[k].append(v)
    return list(axes.items())


def _cell(value) -> str:
    import pandas as pd

    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def cmd_plot(args: argparse.Namespace) -> int:
    from grokinterp.sweep import FIGURES, write_results

    if args.figure not in FIGURES:
        raise UsageError(f"unknown figure {args.figure!r}; choose one of: {', '.join(FIGURES)}")
    table, paths = write_results(Path(args.sweep), args.analyses_out, figures=[args.figure])
    missing = list(table.loc[~table["finished"].astype(bool), "run"])
    print(f"{args.figure}: {len(table) - len(missing)} finished run(s)"
          + (f", {len(missing)} missing ({', '.join(missing)})" if missing else "") + f" -> {paths[1]}\nTable: {paths[0]}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    root = Path(args.root or DEFAULT_ROOT)
    if args.root is not None and not root.exists():  # a folder asked for by name must be there (the default need not)
        raise UsageError(f"no folder {root}; give a folder of runs, e.g. `grokinterp runs {DEFAULT_ROOT}`")
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is a file, not a folder of runs; give the folder that holds run folders")
    if (root / "sweep.json").is_file():
        return _print_sweep_status(root)
    paths = find_runs(root)
    if not paths:
        print(f"no runs under {root}; train one with `grokinterp train`")
        return 0
    header = ("run", "op", "size", "steps", "ckpts", "train 99%", "val 99%", "val acc")
    table = []
    for path in paths:
        try:
            run = load_run(path)
            run.store.check_config(run.config, table=False)  # list no value config.json gained after training
            rows = run.store.read_metrics()
        except RunError as err:
            print(f"skipping {path}: {err}", file=sys.stderr)
            continue
        t = run.config.task
        steps = rows[-1]["step"] if rows else 0
        table.append((run.name, t.op, t.size_label, str(steps), str(len(run.steps)),
                      _fmt(first_step_reaching(rows, "train_acc", 0.99)), _fmt(first_step_reaching(rows, "val_acc", 0.99)),
                      f"{rows[-1]['val_acc']:.1%}" if rows else "-"))
    _print_table(header, table)
    return 0


def _print_sweep_status(folder: Path) -> int:
    """A sweep's members: finished, queued, running (SLURM), failed with its job's last line, stopped or new."""
    from grokinterp.slurm import sweep_status
    from grokinterp.sweep import results_table

    statuses, note = sweep_status(folder)
    table = results_table(folder).set_index("run")
    rows = []
    for s in statuses:
        row = table.loc[s.name]
        rows.append((s.name, s.state, f"{s.steps}/{row['budget']}", _fmt(_int(row["val_99_step"])),
                     _cell(row["best_val_acc"]), s.job or "-", s.note))
    _print_table(("run", "status", "steps", "val 99%", "best val", "job", "note"), rows)
    counts = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    order = ("finished", "running", "queued", "failed", "stopped", "new")
    print(f"\n{folder}: " + ", ".join(f"{counts[k]} {k}" for k in order if k in counts))
    if note:
        print(f"({note}: members with a job show as stopped or new)")
    if any(s.state in ("failed", "stopped", "new") for s in statuses):
        submitted = any(s.job for s in statuses)
        print(f"Continue the rest:  grokinterp sweep --resume {folder}" + (" --launcher slurm" if submitted else ""))
    return 0


def _int(value):
    import pandas as pd

    return None if pd.isna(value) else int(value)


def cmd_analyze(args: argparse.Namespace) -> int:
    import pandas as pd

    from grokinterp.analyze import analyze_metrics, get_metric, metrics_for
    from grokinterp.trainer import resolve_device

    run = load_run(args.run)
    names = metrics_for(run) if args.metric == "all" else [get_metric(args.metric, run).name]
    params = _metric_params(names, _param_items(args.param))
    device = str(resolve_device(args.device))
    results = analyze_metrics(run, names, steps=args.steps, out_root=args.out, device=device, seed=args.seed,
                              params=params, skip_corrupt=args.skip_corrupt, progress=not args.no_progress,
                              workers=args.workers)
    for name, result in zip(names, results):
        if name == "phases":
            row = result.table.iloc[0].to_dict()
            print("phases: " + ", ".join(f"{k} {'-' if pd.isna(v) else int(v)}" for k, v in row.items())
                  + f" -> {result.csv_path}, {result.html_path}")
            continue
        cached = len(result.table) - result.computed
        print(f"{name}: {result.computed} checkpoint(s) computed, {cached} from cache"
              + (f", {len(result.skipped)} skipped" if result.skipped else "")
              + f" -> {result.csv_path}, {result.html_path}")
    print(f"Next:  grokinterp report {run.path}")
    return 0


def _metric_params(names: list[str], items: list[tuple[str, str]]) -> dict[str, dict]:
    """Each metric's typed ``--param`` values. With several metrics (``all``), a parameter goes to the metrics that
    take it, and one that none takes is refused; with one metric, any it does not take is."""
    from grokinterp.analyze import metric_parameter_names, parse_param
    from grokinterp.metrics import METRICS

    takes = {name: metric_parameter_names(METRICS[name]) for name in names}
    params: dict[str, dict] = {name: {} for name in names}
    for key, text in items:
        users = [name for name in names if key in takes[name]]
        if not users:
            offered = sorted({p for name in names for p in takes[name]})
            raise UsageError(f"--param {key}: no metric here takes it ({', '.join(names)}); their parameters: "
                             f"{', '.join(offered) or 'none'}")
        for name in users:
            params[name][key] = parse_param(METRICS[name], key, text)
    return params


def cmd_calibrate_llc(args: argparse.Namespace) -> int:
    from grokinterp.analyze import calibrate_llc
    from grokinterp.trainer import resolve_device

    run = load_run(args.run)
    params = _metric_params(["llc"], _param_items(args.param))["llc"]
    result = calibrate_llc(run, args.step, step_sizes=args.step_sizes, nbetas=args.nbetas, out_root=args.out,
                           device=str(resolve_device(args.device)), seed=args.seed, params=params,
                           progress=not args.no_progress)
    for row in result.summary.itertuples():
        state = "diverged" if row.diverged else f"llc {row.llc:.4g} ± {row.llc_se:.2g}, drift {row.drift:+.2f}"
        print(f"step size {row.step_size:g}, nbeta {row.nbeta:.4g}: {state}")
    print(f"-> {result.csv_path}, {result.html_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from grokinterp.analyze import report

    path = report(load_run(args.run), out_root=args.out)
    print(f"Report: {path}")
    return 0


def _print_error(message: str) -> None:
    """One line, even when the message quotes a value with a line break or another control character in it."""
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in message)
    print("grokinterp: error: " + text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    command = None
    try:
        args = parser.parse_args(argv)
        command = args.command
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
        commands = {"train": cmd_train, "analyze": cmd_analyze, "report": cmd_report, "runs": cmd_runs,
                    "sweep": cmd_sweep, "plot": cmd_plot, "calibrate-llc": cmd_calibrate_llc}
        return commands[args.command](args)
    except (UsageError, GrokinterpError) as err:
        _print_error(str(err))
        return 2
    except OSError as err:  # a path the system refuses (too long, no permission, disk full): say which, no traceback
        where = f"{err.filename}: " if err.filename else ""
        _print_error(f"{where}{err.strerror or err}; check the path and free space")
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one during an analysis or a sweep
        hint = {"analyze": "the rows finished so far are cached: the same command again computes only the rest",
                "sweep": "continue with `grokinterp sweep --resume FOLDER`"}.get(
                    command, "resume a run with `grokinterp train --resume RUN`")
        print(f"\ngrokinterp: interrupted; {hint}", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)


if __name__ == "__main__":
    sys.exit(main())
