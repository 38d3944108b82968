"""Speed of the analyses, timed here rather than in the tests (a wall-clock bound in a test flakes on a busy
machine and means nothing on another CPU).

    python benchmarks/analysis_speed.py
    python benchmarks/analysis_speed.py --run checkpoints/<nanda2023 run> --checkpoints 12
    python benchmarks/analysis_speed.py --run checkpoints/<nanda2023 run> --whole 150 --only-run

* With ``--run``: every metric of ``--metric all`` (and ``llc`` with ``--llc``) at ``--checkpoints`` checkpoints
  spread evenly (in log steps and linear steps alike: every k-th of the run's checkpoints) over the run, at the
  default parameters and error targets; seconds per checkpoint per metric, and the whole of ``--metric all``
  projected to the run's checkpoints and to 150 (issue 12's target: under 120 s on 2 cores).

* With ``--run`` and ``--whole N``: the command ``grokinterp analyze RUN --metric all`` itself (a new process, into
  a temporary folder: imports and figures included) over N checkpoints spread evenly over the run, first with the default
  workers and then in one process (``workers=1``), wall-clock seconds and their ratio; issue 12's target is
  N = 150 in under 120 s on 2 cores.

* S5 group: the first build of ``SymmetricGroup(5)``'s irreps, character table and conjugacy classes in a process.
* S5 checkpoint rows: ``irrep_metrics`` and ``coset_metrics`` of one checkpoint of the default model (d_model 128,
  d_mlp 512) on the whole S5 table, with the group already built.

The rows are the median of five repeats, beside the CPU they ran on.
"""

import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)

from train_speed import cpu_model  # noqa: E402  (run as a script, benchmarks/ is on sys.path)

from grokinterp.config import ModelConfig, RunConfig, TaskConfig  # noqa: E402
from grokinterp.groups import SymmetricGroup  # noqa: E402
from grokinterp.metrics.base import Checkpoint  # noqa: E402
from grokinterp.metrics.sn import coset_metrics, irrep_metrics  # noqa: E402
from grokinterp.model import build_model  # noqa: E402
from grokinterp.tasks import build_task  # noqa: E402


def median_seconds(work, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_ratios(run, steps: list[int], names: list[str]) -> None:
    """Each metric against itself on the model's own forward (the fast path switched off), alternating the two at
    every checkpoint, so a VM whose speed drifts slows both alike: the ratio is the figure to compare across
    machines, the seconds above are this machine's."""
    import grokinterp.metrics.base as base
    import grokinterp.metrics.fourier as fourier
    import grokinterp.metrics.sharpness as sharpness
    from grokinterp.analyze import effective_params
    from grokinterp.metrics import METRICS

    modules = (base, fourier, sharpness)
    applies = base.fast_forward_applies
    for name in names:
        metric = METRICS[name]
        final = Checkpoint(step=run.steps[-1], model=run.model(run.steps[-1]), data=run.data, config=run.config)
        params = effective_params(metric, metric.prepare(final) if metric.prepare else {})
        fast = slow = 0.0
        for step in steps:
            model = run.model(step)
            for switched_off in (False, True):
                for module in modules:
                    module.fast_forward_applies = (lambda m, t: False) if switched_off else applies
                # a Checkpoint of its own each time: it keeps the logits it computed, which the other would reuse
                ckpt = Checkpoint(step=step, model=model, data=run.data, config=run.config)
                start = time.perf_counter()
                metric.fn(ckpt, **params)
                elapsed = time.perf_counter() - start
                fast, slow = (fast, slow + elapsed) if switched_off else (fast + elapsed, slow)
        for module in modules:
            module.fast_forward_applies = applies
        print(f"  {name:18s} fast path {fast / len(steps):.3f} s, model's own forward {slow / len(steps):.3f} s a "
              f"checkpoint: {slow / fast:.1f}x (steps {steps})", flush=True)


def time_run(path: str, n_checkpoints: int, with_llc: bool) -> None:
    from grokinterp.analyze import effective_params, metrics_for
    from grokinterp.checkpoints import load_run
    from grokinterp.metrics import METRICS

    run = load_run(path)
    steps = run.steps[:: max(1, len(run.steps) // n_checkpoints)][:n_checkpoints]
    names = [n for n in metrics_for(run) if METRICS[n].fn is not None] + (["llc"] if with_llc else [])
    print(f"run {run.name}: {len(run.steps)} checkpoints, timing steps {steps}")
    load_seconds = median_seconds(lambda: run.model(steps[-1]), repeats=3)
    print(f"  loading one checkpoint: {load_seconds:.3f} s")
    per_ckpt = {}
    for name in names:
        metric = METRICS[name]
        final = Checkpoint(step=run.steps[-1], model=run.model(run.steps[-1]), data=run.data, config=run.config)
        start = time.perf_counter()
        params = effective_params(metric, metric.prepare(final) if metric.prepare else {})
        prepare_seconds = time.perf_counter() - start
        times = []
        for step in steps:
            ckpt = Checkpoint(step=step, model=run.model(step), data=run.data, config=run.config)
            start = time.perf_counter()
            metric.fn(ckpt, **params)
            times.append(time.perf_counter() - start)
        per_ckpt[name] = statistics.mean(times)
        print(f"  {name:18s} {per_ckpt[name]:7.3f} s per checkpoint (min {min(times):.3f}, max {max(times):.3f}; "
              f"prepare {prepare_seconds:.2f} s)", flush=True)
    reference_ratios(run, steps[: min(3, len(steps))], [n for n in ("fourier", "sharpness", "clock-pizza") if n in names])
    total = sum(v for k, v in per_ckpt.items() if k != "llc") + load_seconds
    verdict = f"{total * 150 / 120:.1f}x over" if total * 150 > 120 else "met"
    print(f"  --metric all in one process, metric by metric: {total:.2f} s per checkpoint -> "
          f"{total * len(run.steps):.0f} s for this run's {len(run.steps)} checkpoints, {total * 150:.0f} s for 150 "
          f"(target 120 s: {verdict}); the command shares forward passes and runs workers: time it with --whole")


def time_whole(path: str, n_checkpoints: int) -> None:
    import subprocess
    import sys
    import tempfile

    from grokinterp.analyze import default_workers
    from grokinterp.checkpoints import load_run

    run = load_run(path)
    picked = run.steps[:: max(1, len(run.steps) // n_checkpoints)][:n_checkpoints]
    seconds = {}
    for workers in (default_workers("cpu", len(picked)), 1):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "grokinterp", "analyze", path, "--metric", "all", "--steps",
                       ",".join(map(str, picked)), "--out", out, "--no-progress", "--workers", str(workers)]
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)  # the command a user runs, imports too
            seconds[workers] = time.perf_counter() - start
        print(f"  analyze --metric all, {len(picked)} checkpoints, {workers} worker(s): {seconds[workers]:.1f} s "
              f"({seconds[workers] / len(picked):.3f} s a checkpoint)", flush=True)
    fast = min(seconds.values())
    if len(seconds) > 1:
        print(f"  workers against one process: {seconds[1] / seconds[max(seconds)]:.2f}x")
    if len(picked) >= 150:
        print(f"  target: 150 checkpoints in under 120 s: {'met' if fast * 150 / len(picked) < 120 else 'not met'}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a trained run to time every metric on")
    parser.add_argument("--checkpoints", type=int, default=12, help="checkpoints of --run to time (default 12)")
    parser.add_argument("--llc", action="store_true", help="also time the llc metric (slow)")
    parser.add_argument("--whole", type=int, default=0, metavar="N",
                        help="time analyze --metric all itself over N checkpoints of --run (with and without workers)")
    parser.add_argument("--only-run", action="store_true", help="skip the S5 rows")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    if args.run and args.whole:
        time_whole(args.run, args.whole)
    elif args.run:
        time_run(args.run, args.checkpoints, args.llc)
    if args.only_run:
        return

    def fresh_group():
        g = SymmetricGroup(5)  # a new instance: nothing cached yet
        return g.irreps, g.character_table, g.conjugacy_classes

    # the first build in a process is the one a user waits for (later instances reuse cached tables)
    print(f"S5 irreps, character table and classes, first build in this process: {median_seconds(fresh_group, 1):.3f} s")

    config = RunConfig(task=TaskConfig(op="perm_mul", n=5, frac_train=0.5), model=ModelConfig())
    data = build_task("perm_mul", 113, 5, 0.5, 0)
    ckpt = Checkpoint(step=0, model=build_model(config.model, data.n_symbols).eval(), data=data, config=config)
    irrep_metrics(ckpt), coset_metrics(ckpt)  # build and cache the group first
    seconds = median_seconds(lambda: (irrep_metrics(ckpt), coset_metrics(ckpt)))
    print(f"S5 checkpoint rows (irreps and cosets, default model, 14,400 pairs): {seconds:.3f} s")


if __name__ == "__main__":
    main()
