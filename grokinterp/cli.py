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


def _seed(text: str) -> int:
    seed = _typed(int, "--seed")(text)
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed must lie in [0, {MAX_SEED}], got {seed}")
    return seed


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
                                         "and .html (cached per checkpoint).")
    analyze.add_argument("run", help="run directory (or name under checkpoints/)")
    analyze.add_argument("--metric", required=True,
                         help="a metric name, or 'all' for every metric of the task (an unknown name lists them)")
    analyze.add_argument("--steps", default=None,
                         help="checkpoints to analyse: all (default), or steps and START:END ranges, e.g. 0,100,1000:")
    analyze.add_argument("--out", default="analyses", help="folder for analysis outputs (default %(default)s)")
    analyze.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    analyze.add_argument("--seed", type=_seed, default=0, help="seed of sampling metrics (sharpness probes)")
    analyze.add_argument("--skip-corrupt", action="store_true",
                         help="skip unreadable checkpoints with a warning instead of stopping")
    analyze.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    report = sub.add_parser("report", help="one HTML page with every computed metric of a run")
    report.add_argument("run", help="run directory (or name under checkpoints/)")
    report.add_argument("--out", default="analyses", help="folder of analysis outputs (default %(default)s)")

    runs = sub.add_parser("runs", help="list runs with steps trained and when they reached 99%% accuracy")
    runs.add_argument("root", nargs="?", default=None, help=f"folder of runs (default {DEFAULT_ROOT})")

    sweep = sub.add_parser(
        "sweep", help="train a grid of seeds x training fractions x weight decays, many runs at once",
        description="Train every (training fraction, weight decay, seed) combination of a config together, with "
                    "stacked parameters; each is saved as its own run, <out>/<name>/frac0.30_wd1_seed0 and so on, "
                    "beside a sweep.json manifest, and the data-efficiency table and figure go to "
                    "<analyses-out>/<name>/. A seed sets both --model-seed and --data-seed. A whole sweep does not "
                    "resume; continue any member (interrupted, or with a larger budget) on its own with "
                    "`grokinterp train --resume <out>/<name>/<member> [--steps N]`.")
    sweep.add_argument("--preset", default=None,
                       help=f"starting config: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    sweep.add_argument("--name", default=None, help="sweep folder name (default: <preset>_<op>_sweep_<time>)")
    sweep.add_argument("--out", default=str(DEFAULT_ROOT),
                       help="folder that holds the sweep folder (default %(default)s)")
    sweep.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 0,1,2")
    sweep.add_argument("--fracs", required=True, help="comma-separated training fractions, e.g. 0.3,0.5,0.7")
    sweep.add_argument("--weight-decays", required=True, help="comma-separated weight decays, e.g. 0.3,1")
    sweep.add_argument("--group-size", type=int, default=16,
                       help="most runs trained at once; larger grids train in consecutive groups; 1 trains one "
                            "ordinary run after another, the faster choice on a CPU for nanda2023-sized models "
                            "(default %(default)s)")
    sweep.add_argument("--analyses-out", default="analyses",
                       help="folder for the data-efficiency table and figure (default %(default)s)")
    sweep.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_config_flags(sweep)
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


def cmd_sweep(args: argparse.Namespace) -> int:
    import pandas as pd

    from grokinterp.analyze import analysis_dir
    from grokinterp.resources import check_fits
    from grokinterp.sweep import (  # heavy imports only when training
        check_stackable,
        member_name,
        parse_values,
        sweep_configs,
        train_many,
        write_data_efficiency,
        write_manifest,
    )
    from grokinterp.trainer import resolve_device

    overrides = _overrides(args)
    gridded = [k for k in ("frac_train", "weight_decay", "model_seed", "data_seed") if k in overrides]
    if gridded:
        raise UsageError(f"--{gridded[0].replace('_', '-')} is set by the sweep's grid; use --fracs, --weight-decays "
                         "and --seeds")
    seeds = parse_values(args.seeds, "--seeds", int)
    fracs = parse_values(args.fracs, "--fracs", float)
    weight_decays = parse_values(args.weight_decays, "--weight-decays", float)
    preset = args.preset or DEFAULT_PRESET
    base = get_preset(preset).replace(**overrides)
    configs = sweep_configs(base, seeds, fracs, weight_decays)
    check_stackable(configs)
    if args.group_size < 1:
        raise UsageError(f"--group-size must be at least 1, got {args.group_size}")
    name = _plain_name(args.name or f"{preset}_{base.task.op}_sweep_{time.strftime('%Y%m%d-%H%M%S')}")
    folder = Path(args.out) / name
    device = resolve_device(args.device)  # refuse a bad --device before writing anything
    _check_output_folder(analysis_dir(folder, args.analyses_out), "--analyses-out")
    check_fits(configs[0], Path(args.out), device.type, models=min(args.group_size, len(configs)))  # one group at once
    if folder.exists():
        raise UsageError(f"sweep folder {folder} already exists; pick another --name (continue one of its runs "
                         f"with `grokinterp train --resume {folder}/MEMBER`)")

    print(f"Sweep {folder} on {device}: {len(configs)} runs ({len(fracs)} training fractions x {len(weight_decays)} "
          f"weight decays x {len(seeds)} seeds), up to {args.group_size} at once", file=sys.stderr)
    write_manifest(folder, base, seeds, fracs, weight_decays, configs)
    results = train_many(configs, [folder / member_name(c) for c in configs], device=str(device),
                         progress=not args.no_progress, group_size=args.group_size)
    interrupted = [r for r in results if r.stop_reason == "interrupted"]
    if results:
        table, csv_path, html_path = write_data_efficiency(
            [r.run for r in results], analysis_dir(folder, args.analyses_out),
            f"{name}: steps to 99% validation accuracy")
        header = ("frac", "wd", "seed", "val 99%", "steps")
        rows = [(f"{r.frac_train:g}", f"{r.weight_decay:g}", str(r.seed),
                 _fmt(None if pd.isna(r.val_99_step) else int(r.val_99_step)), str(r.steps_trained))
                for r in table.itertuples()]
        print()
        _print_table(header, rows)
        print(f"\nRuns: {folder} ({len(results)} of {len(configs)})")
        print(f"Data efficiency: {csv_path}\n                 {html_path}")
    if interrupted or len(results) < len(configs):
        print(f"Interrupted; continue a run with:  grokinterp train --resume {folder}/MEMBER")
        return 130
    print(f"Next:  grokinterp runs {folder}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    root = Path(args.root or DEFAULT_ROOT)
    if args.root is not None and not root.exists():  # a folder asked for by name must be there (the default need not)
        raise UsageError(f"no folder {root}; give a folder of runs, e.g. `grokinterp runs {DEFAULT_ROOT}`")
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is a file, not a folder of runs; give the folder that holds run folders")
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


def cmd_analyze(args: argparse.Namespace) -> int:
    import pandas as pd

    from grokinterp.analyze import analyze, get_metric, metrics_for
    from grokinterp.trainer import resolve_device

    run = load_run(args.run)
    names = metrics_for(run) if args.metric == "all" else [get_metric(args.metric, run).name]
    device = str(resolve_device(args.device))
    for name in names:
        result = analyze(run, name, steps=args.steps, out_root=args.out, device=device, seed=args.seed,
                         skip_corrupt=args.skip_corrupt, progress=not args.no_progress)
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
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
        commands = {"train": cmd_train, "analyze": cmd_analyze, "report": cmd_report, "runs": cmd_runs,
                    "sweep": cmd_sweep}
        return commands[args.command](args)
    except (UsageError, GrokinterpError) as err:
        _print_error(str(err))
        return 2
    except OSError as err:  # a path the system refuses (too long, no permission, disk full): say which, no traceback
        where = f"{err.filename}: " if err.filename else ""
        _print_error(f"{where}{err.strerror or err}; check the path and free space")
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training: checkpoints written so far are complete
        print("\ngrokinterp: interrupted; resume a run with `grokinterp train --resume RUN`", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)


if __name__ == "__main__":
    sys.exit(main())
