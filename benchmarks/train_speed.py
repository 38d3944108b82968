"""Training speed, side by side in one process: the reference loop against grokinterp, one run and many at once.

    python benchmarks/train_speed.py                 # everything, ~15 min on 2 cores
    python benchmarks/train_speed.py --only single   # just the single-run comparison
    python benchmarks/train_speed.py --only phases --cpu-time   # early vs post-memorization, on a shared machine

What it measures on the ``nanda2023`` configuration (x+y mod 113, 30% data, full batch):

* reference: the loop from the TransformerLens grokking demo: ``HookedTransformer`` forward on the full batch,
  float64 cross-entropy on the last position, AdamW with a 10-step warm-up; nothing else (no evaluation, no saving).
* grokinterp: ``grokinterp.train`` itself, evaluation every 20 steps and checkpoints included, timed between steps
  with its ``on_step`` hook over steps 21-120 of the schedule a run keeps after its first 1,000 steps (one
  checkpoint per 100 steps, 5 evaluations in the window). A second row times the same steps of the real schedule,
  whose log-spaced early checkpoints put 16 saves in that window (a run's first 1,000 steps hold 59 of its 449).
* parity: weights after 100 steps of the fast path against the plain forward (``--no-fast-path``).
* stacked: ``grokinterp.sweep.train_many`` with K = 1, 4, 16 members, in models·steps/s, against one run after
  another with the ordinary trainer, both over the same steps of the same schedule; then the same on a small table
  (x+y mod 23), where one model's step is mostly fixed overhead.
* phases: the reference loop and the trainer (both paths) early, and again started from a post-memorization checkpoint (training
  loss below 1e-6, where d(loss)/d(logits) starts to hold float32 denormals): the benchmark trains nanda2023 with
  the trainer until its first checkpoint past that loss (step 1,200), then times each loop from that
  checkpoint's weights and optimizer state, and the trainer again with denormals kept (``grokinterp.denormals``
  off), which is how it ran before. The whole-run figure for nanda2023's 40,000 steps is the measured time of
  those first steps plus the rest projected at the post-memorization rate (evaluations and checkpoints
  included): after memorization every step has the same shapes and, with denormals flushed, no value-dependent
  cost, so one window stands for the plateau, the cleanup and what follows. ``--whole-run`` trains all 40,000
  steps instead. The reference loop's 40,000 steps are projected from its own early and late rates, so the whole
  run is also given as a ratio, which the machine's drift moves far less than the minutes.
* checkpoint: milliseconds to save one checkpoint (weights and optimizer state, checksummed and fsynced).
* sharpness: seconds to analyse every checkpoint of a short run for sharpness.

Each row also gives the peak resident memory of its phase. The single-run and phase rows are measured in
``--rounds`` interleaved rounds (reference, trainer, ..., then again), and each ratio is the median of the rounds'
ratios with their range: on a VM whose speed drifts by half between minutes, only rates taken seconds apart
compare fairly. The absolute numbers move with whatever else the machine runs (on a machine other jobs share,
``--cpu-time`` times one thread by this process's CPU time instead). The header names
the CPU and the load: the cost of denormals differs a lot between CPU models (a large penalty on Intel cores).
"""

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)

import grokinterp.denormals as denormals  # noqa: E402
from grokinterp.checkpoints import RunStore, checkpoint_schedule  # noqa: E402
from grokinterp.config import get_preset  # noqa: E402
from grokinterp.model import answer_logits, build_model  # noqa: E402
from grokinterp.objective import answer_loss  # noqa: E402
from grokinterp.tasks import build_task  # noqa: E402
from grokinterp.trainer import learning_rate, resolve_device, train  # noqa: E402


class Stop(Exception):
    pass


POST_MEMORIZATION_LOSS = 1e-6  # training loss of the checkpoint the late-phase rows start from
clock = time.perf_counter
"""What steps are timed by: wall time, or with --cpu-time this process's CPU time (see main)."""


class StepTimer:
    """An ``on_step`` hook: times steps start+warmup+1 .. start+warmup+steps, then stops the training by raising
    Stop (``start``: the step a resumed run starts from)."""

    def __init__(self, dev: torch.device, warmup: int, steps: int, start: int = 0):
        self.dev, self.first, self.last, self.marks = dev, start + warmup, start + warmup + steps, {}

    def __call__(self, step: int) -> None:
        if step in (self.first, self.last):
            sync(self.dev)
            self.marks[step] = clock()
        if step == self.last:
            raise Stop

    def rate(self, train_fn, *args, **kwargs) -> float:
        """Steps/s of ``train_fn(*args, on_step=self, **kwargs)`` over the timed steps."""
        try:
            train_fn(*args, on_step=self, **kwargs)
        except Stop:
            pass
        return (self.last - self.first) / (self.marks[self.last] - self.marks[self.first])


class Rates:
    """Each measurement's value in every round, and its peak memory."""

    def __init__(self, values: dict[str, list[float]], memory: dict[str, float]):
        self.values, self.memory = values, memory

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])

    def value(self, name: str) -> tuple[str]:
        return (f"{self.median(name):.2f}",)

    def ratio(self, name: str, base: str, label: str = "") -> tuple[str, str]:
        """The row's median and the median (with range) of its per-round ratios to ``base``'s rate."""
        ratios = [x / y for x, y in zip(self.values[name], self.values[base])]
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        return f"{self.median(name):.2f}", f"{statistics.median(ratios):.2f}x{spread}{' ' + label if label else ''}"


def interleaved(measurements: dict, rounds: int, dev: torch.device) -> Rates:
    """Run every measurement once per round, in turn, so a ratio compares rates taken seconds apart: on a machine
    whose speed drifts (a VM's neighbours, a busy box), rates taken minutes apart can differ by half."""
    values = {name: [] for name in measurements}
    memory = {}
    for r in range(rounds):
        for name, measure in measurements.items():
            reset_peak_memory(dev)
            values[name].append(measure())
            memory[name] = max(memory.get(name, 0.0), peak_memory_mb(dev))
        print(f"# round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in values.items()), flush=True)
    return Rates(values, memory)


def reset_peak_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:  # Linux: restart the process's high-water mark of resident memory
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole process's peak elsewhere


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def demo_step(model, optimizer, forward, tokens, labels, lr: float) -> None:
    """One step of the demo's loop: full batch, float64 cross-entropy at the answer, AdamW."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = answer_loss(forward(model, tokens), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def cpu_model() -> str:
    """The CPU's model name, as lscpu (or /proc/cpuinfo) gives it, with the x86 family/model numbers where the name
    is generic (a VM may show only 'AMD EPYC')."""
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    except (OSError, subprocess.SubprocessError):
        pass
    if "Model name" not in fields:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                fields.setdefault({"model name": "Model name", "cpu family": "CPU family", "model": "Model",
                                   "vendor_id": "Vendor ID"}.get(key.strip(), key.strip()), value.strip())
        except OSError:
            pass
    name = fields.get("Model name") or platform.processor() or platform.machine()
    if "CPU family" in fields:
        name += f" ({fields.get('Vendor ID', '?')}, family {fields['CPU family']}, model {fields.get('Model', '?')})"
    return name


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def reference_loop(config, dev: torch.device, steps: int, warmup: int, checkpoint: Path | None = None) -> float:
    """Steps/s of the demo loop: full-batch HookedTransformer forward, float64 loss, AdamW with warm-up; from
    initialization, or from ``checkpoint`` (a run directory: its latest weights and optimizer state)."""
    t = config.task
    data = build_task(t.op, t.p, t.n, t.frac_train, t.data_seed).to(dev)
    model = build_model(config.model, data.n_symbols, device=dev)
    cfg = config.train
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    first = 0
    if checkpoint is not None:
        store = RunStore(checkpoint)
        state = store.read_trainer_state()
        model.load_state_dict(store.read_weights(state.step))
        optimizer.load_state_dict(state.optimizer)
        first = state.step
    tokens, labels = data.tokens[data.train_idx], data.labels[data.train_idx]
    for step in range(first + 1, first + warmup + steps + 1):
        if step == first + warmup + 1:
            sync(dev)
            start = clock()
        demo_step(model, optimizer, answer_logits, tokens, labels, learning_rate(cfg, step))
    sync(dev)
    return steps / (clock() - start)


def trainer_speed(config, dev: torch.device, steps: int, warmup: int, folder: Path) -> float:
    """Steps/s of grokinterp.train on the config's real budget and schedule, stopped after warmup + steps."""
    return StepTimer(dev, warmup, steps).rate(train, config, folder / f"run{len(list(folder.iterdir()))}",
                                               device=str(dev), progress=False)


def train_past_memorization(config, dev: torch.device, folder: Path) -> tuple[Path, int, float, float]:
    """Train ``config`` with the trainer until its first checkpoint whose logged training loss is below
    POST_MEMORIZATION_LOSS; returns the run directory (its latest checkpoint is that one), the step, the loss and
    the wall time of the whole run so far (evaluations and checkpoints included)."""
    run_dir = folder / "memorized"
    schedule = set(checkpoint_schedule(config.train.steps, config.train.checkpoints, config.train.log_checkpoints))
    last = {}

    def on_step(step: int) -> None:
        if step - 1 in schedule and step > 1:
            with open(run_dir / "metrics.jsonl") as log:
                row = json.loads(log.readlines()[-1])
            if row["step"] == step - 1 and row["train_loss"] < POST_MEMORIZATION_LOSS:
                last.update(row)
                raise Stop  # before step ``step`` is logged or saved: the run ends at its checkpoint step - 1

    start = clock()
    try:
        train(config, run_dir, device=str(dev), progress=False, on_step=on_step)
    except Stop:
        pass
    seconds = clock() - start
    if not last:
        raise SystemExit(f"the training loss never went below {POST_MEMORIZATION_LOSS:g} within the budget")
    return run_dir, int(last["step"]), float(last["train_loss"]), seconds


def denormal_share(checkpoint: Path) -> float:
    """The fraction of float32 entries of d(loss)/d(logits) that are denormal at ``checkpoint``'s latest step (the
    training loss on the fast path's logits, as the trainer computes it, with nothing flushed)."""
    from grokinterp.checkpoints import load_run
    from grokinterp.fastpath import fast_answer_logits

    run = load_run(checkpoint)
    model, data = run.model(run.steps[-1]), run.data
    logits = fast_answer_logits(model, data.tokens[data.train_idx]).detach().requires_grad_()
    answer_loss(logits, data.labels[data.train_idx]).backward()
    bits = logits.grad.view(torch.int32)
    return float(((bits & 0x7F800000) == 0).logical_and_((bits & 0x007FFFFF) != 0).double().mean())


def trainer_from(checkpoint: Path, config, dev: torch.device, steps: int, warmup: int, folder: Path,
                 flush: bool = True) -> float:
    """Steps/s of grokinterp.train resuming a copy of ``checkpoint`` (its config's schedule, so evaluations and
    checkpoints are included), with ``config`` in its config file and in its latest checkpoint's record (the
    benchmark swaps --no-fast-path in; a user's resume could not) and denormals flushed or, with ``flush=False``, kept as before this change."""
    copy = folder / f"resumed{len(list(folder.iterdir()))}"
    shutil.copytree(checkpoint, copy)
    (copy / ".lock").unlink(missing_ok=True)
    store = RunStore(copy)
    store.write_config(config)
    start = store.read_trainer_state().step
    # the latest checkpoint records the config that trained it, and a resume checks config.json against that record
    store.write_weights(start, store.read_weights(start), config)
    denormals._FLUSH = flush
    try:
        return StepTimer(dev, warmup, steps, start).rate(train, config, copy, resume=True, device=str(dev),
                                                          progress=False)
    finally:
        denormals._FLUSH = True


def whole_run(config, dev: torch.device, folder: Path) -> float:
    """Seconds for ``config``'s whole budget, trained for real."""
    start = clock()
    train(config, folder / "whole", device=str(dev), progress=False)
    return clock() - start


def parity(config, dev: torch.device, steps: int, dtype: torch.dtype) -> tuple[float, float]:
    """Largest |Δw| after ``steps`` AdamW steps from one initialization: (fast path vs plain forward, plain forward
    vs itself with the training rows in another order). The second is the yardstick: in float32 the two plain runs
    part ways too, as soon as one rounding difference flips a ReLU near zero; in float64 both stay ~1e-13."""
    from grokinterp.fastpath import fast_answer_logits

    t, cfg = config.task, config.train
    data = build_task(t.op, t.p, t.n, t.frac_train, t.data_seed).to(dev)
    tokens, labels = data.tokens[data.train_idx], data.labels[data.train_idx]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).to(dev)
    runs = [(answer_logits, tokens, labels), (fast_answer_logits, tokens, labels),
            (answer_logits, tokens[order], labels[order])]
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens announces the dtype change
        models = [build_model(config.model, data.n_symbols, device=dev).to(dtype) for _ in runs]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.lr,
                                    weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2)) for m in models]
    for step in range(1, steps + 1):
        for model, optimizer, (forward, x, y) in zip(models, optimizers, runs):
            demo_step(model, optimizer, forward, x, y, learning_rate(cfg, step))

    def gap(a, b) -> float:
        return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))

    return gap(models[0], models[1]), gap(models[0], models[2])


def save_ms(config, dev: torch.device, folder: Path, n: int = 20) -> float:
    """Median milliseconds of one checkpoint save of ``config``'s model, as the trainer saves it."""
    from grokinterp.checkpoints import RunStore, TrainerState
    from grokinterp.trainer import make_optimizer

    t = config.task
    data = build_task(t.op, t.p, t.n, t.frac_train, t.data_seed)
    model = build_model(config.model, data.n_symbols, device=dev)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config.train)
    demo_step(model, optimizer, answer_logits, data.tokens[:8].to(dev), data.labels[:8].to(dev), config.train.lr)
    store = RunStore.create(folder / "saves", config, data)
    times = []
    for step in range(1, n + 1):
        start = time.perf_counter()
        store.write_weights(step, model.state_dict(), config)
        store.write_trainer_state(TrainerState(step, optimizer.state_dict(), False, ""))
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[n // 2]


def stacked_speed(config, dev: torch.device, k: int, steps: int, warmup: int, folder: Path) -> float:
    """Models·steps/s of k members trained together by grokinterp.sweep.train_many."""
    from grokinterp.sweep import train_many

    configs = [config.replace(model_seed=s, data_seed=s) for s in range(k)]
    tag = len(list(folder.iterdir()))  # a fresh name for each measurement
    dirs = [folder / f"stack{tag}_{i}" for i in range(k)]
    return k * StepTimer(dev, warmup, steps).rate(train_many, configs, dirs, device=str(dev), progress=False,
                                                  group_size=k)


def sharpness_seconds(dev: torch.device, folder: Path) -> tuple[float, int]:
    from grokinterp.analyze import analyze
    from grokinterp.checkpoints import load_run

    config = get_preset("quick").replace(steps=300, checkpoints=10, log_checkpoints=6, stop_val_acc=0.0)
    run = train(config, folder / "sharp", device=str(dev), progress=False).run
    start = time.perf_counter()
    analyze(load_run(run.path), "sharpness", out_root=folder / "analyses", device=str(dev), progress=False)
    return time.perf_counter() - start, len(run.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per single-run measurement")
    parser.add_argument("--stack-steps", type=int, default=40, help="timed steps per stacked measurement")
    parser.add_argument("--ks", default="1,4,16", help="stack sizes to time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the single-run and phase rows are measured this many times, interleaved (reference, "
                             "trainer, ..., reference, trainer, ...); each row gives the median and each ratio "
                             "the median of the rounds' ratios, with their range")
    parser.add_argument("--only", choices=["single", "phases", "stacked", "sharpness"], default=None)
    parser.add_argument("--cpu-time", action="store_true",
                        help="one torch thread, steps timed by this process's CPU time: for a machine that other "
                             "jobs share, where wall time measures the share this process got")
    parser.add_argument("--whole-run", action="store_true",
                        help="train nanda2023's whole 40,000-step budget instead of projecting it (~15 min)")
    args = parser.parse_args()
    if args.cpu_time:
        global clock
        torch.set_num_threads(1)  # CPU time of several threads would count their barrier waits as work
        clock = time.process_time
    dev = resolve_device(args.device)
    config = get_preset("nanda2023")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {cpu_model()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, device {dev}, {load_average()}, "
          f"timed by {'CPU' if args.cpu_time else 'wall'} time",
          flush=True)
    print(f"# nanda2023: x+y mod 113, {config.task.frac_train:.0%} data, full batch", flush=True)
    rows = []

    def row(name: str, value: str, ratio: str = "", memory: float | None = None) -> None:
        rows.append((name, value, ratio, "" if memory is None else f"{memory:.0f}"))
        print(f"{name:<48} {value:>9} {ratio:>22} {rows[-1][3]:>8}", flush=True)

    print(f"{'measurement':<48} {'value':>9} {'ratio (range)':>22} {'peak MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        steady = config.replace(log_checkpoints=0)  # a run's schedule after its first 1,000 steps
        if args.only in (None, "single"):
            rates = interleaved({
                "ref": lambda: reference_loop(config, dev, args.steps, warmup=5),
                "plain": lambda: trainer_speed(steady.replace(fast_path=False), dev, args.steps, 20, folder),
                "fast": lambda: trainer_speed(steady, dev, args.steps, 20, folder),
                "early": lambda: trainer_speed(config, dev, args.steps, 20, folder),
            }, args.rounds, dev)
            row("reference loop (demo), steps/s", *rates.value("ref"), "1.00x", rates.memory["ref"])
            row("grokinterp train --no-fast-path, steps/s", *rates.ratio("plain", "ref"), rates.memory["plain"])
            row("grokinterp train (fast path), steps/s", *rates.ratio("fast", "ref"), rates.memory["fast"])
            row("  the same, early schedule (16 saves), steps/s", *rates.ratio("early", "ref"))
            row("checkpoint save, ms", f"{save_ms(config, dev, folder):.1f}", "")
            for dtype in (torch.float32, torch.float64):
                fast_gap, order_gap = parity(config, dev, 100, dtype)
                name = str(dtype).removeprefix("torch.")
                row(f"{name}, 100 steps: max |Δw| fast vs plain", f"{fast_gap:.1e}", "")
                row(f"{name}, 100 steps: |Δw| plain vs rows reordered", f"{order_gap:.1e}", "")
        if args.only in (None, "phases"):
            memorized, at, loss, seconds = train_past_memorization(steady, dev, folder)
            print(f"# post-memorization checkpoint: step {at}, training loss {loss:.1e}, "
                  f"{denormal_share(memorized):.1%} of d(loss)/d(logits) denormal; reached in {seconds:.0f} s "
                  f"({at / seconds:.1f} steps/s with evaluations and checkpoints)", flush=True)
            plain = steady.replace(fast_path=False)
            rates = interleaved({
                "ref": lambda: reference_loop(config, dev, args.steps, 5),
                "fast": lambda: trainer_speed(steady, dev, args.steps, 20, folder),
                "plain": lambda: trainer_speed(plain, dev, args.steps, 20, folder),
                "late ref": lambda: reference_loop(config, dev, args.steps, 5, checkpoint=memorized),
                "late fast": lambda: trainer_from(memorized, steady, dev, args.steps, 20, folder),
                "late fast kept": lambda: trainer_from(memorized, steady, dev, args.steps, 20, folder, flush=False),
                "late plain": lambda: trainer_from(memorized, plain, dev, args.steps, 20, folder),
                "late plain kept": lambda: trainer_from(memorized, plain, dev, args.steps, 20, folder, flush=False),
            }, args.rounds, dev)
            late = f"from step {at} (loss {loss:.0e})"
            row("reference loop, early (steps 6-105), steps/s", *rates.value("ref"), "1.00x")
            row("train (fast path), early, steps/s", *rates.ratio("fast", "ref"))
            row("train --no-fast-path, early, steps/s", *rates.ratio("plain", "ref"))
            row(f"reference loop {late}, steps/s", *rates.ratio("late ref", "ref", "early"))
            row(f"train (fast path) {late}, steps/s", *rates.ratio("late fast", "late ref", "late"))
            row("  late ÷ early rate, fast path", *rates.ratio("late fast", "fast", ""))
            row("  the same with denormals kept, steps/s", *rates.ratio("late fast kept", "late ref", "late"))
            row(f"train --no-fast-path {late}, steps/s", *rates.ratio("late plain", "late ref", "late"))
            row("  late ÷ early rate, --no-fast-path", *rates.ratio("late plain", "plain", ""))
            row("  the same with denormals kept, steps/s", *rates.ratio("late plain kept", "late ref", "late"))
            budget = steady.train.steps
            if args.whole_run:
                whole = whole_run(steady, dev, folder)
                row(f"nanda2023, all {budget:,} steps (trained), min", f"{whole / 60:.1f}", "")
            else:
                whole = seconds + (budget - at) / rates.median("late fast")
                row(f"nanda2023, {budget:,} steps (projected), min", f"{whole / 60:.1f}",
                    f"{budget / whole:.1f} steps/s")
            # The same budget for the reference loop at its early and late rates: the whole run as a ratio, which
            # a VM's drift moves far less than the minutes when both come from the same rounds (the projection;
            # --whole-run trains its 40,000 steps after the rounds, so its ratio carries that drift).
            reference = at / rates.median("ref") + (budget - at) / rates.median("late ref")
            row(f"  reference loop, {budget:,} steps (projected), min", f"{reference / 60:.1f}",
                f"{reference / whole:.2f}x faster")
        if args.only in (None, "stacked"):
            small = get_preset("quick").replace(p=23, steps=40_000, eval_every=20, checkpoints=400, log_checkpoints=0,
                                                stop_val_acc=0.0)
            for name, base, steps in [("nanda2023", steady, args.stack_steps), ("x+y mod 23", small, 5 * args.stack_steps)]:
                single = trainer_speed(base, dev, steps, 20, folder)
                row(f"{name}: one run after another, models·steps/s", f"{single:.2f}", "1.00x")
                for k in [int(x) for x in args.ks.split(",")]:
                    reset_peak_memory(dev)
                    speed = stacked_speed(base, dev, k, steps, 20, folder)
                    row(f"{name}: sweep, {k} at once, models·steps/s", f"{speed:.2f}", f"{speed / single:.2f}x",
                        peak_memory_mb(dev))
        if args.only in (None, "sharpness"):
            reset_peak_memory(dev)
            seconds, n = sharpness_seconds(dev, folder)
            row(f"sharpness analysis, {n} checkpoints, s", f"{seconds:.1f}", f"{seconds / n:.1f} s/ckpt",
                peak_memory_mb(dev))


if __name__ == "__main__":
    sys.exit(main())
