"""Training speed, side by side in one process: the reference loop against grokinterp, one run and many at once.

    python benchmarks/train_speed.py                 # everything, ~8 min on 2 cores
    python benchmarks/train_speed.py --only single   # just the single-run comparison

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
* checkpoint: milliseconds to save one checkpoint (weights and optimizer state, checksummed and fsynced).
* sharpness: seconds to analyse every checkpoint of a short run for sharpness.

Each row also gives the peak resident memory of its phase. Ratios compare numbers taken minutes apart in one
process, so they are fair to each other; the absolute numbers move with whatever else the machine runs.
"""

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)

from grokinterp.config import get_preset  # noqa: E402
from grokinterp.model import answer_logits, build_model  # noqa: E402
from grokinterp.tasks import build_task  # noqa: E402
from grokinterp.trainer import answer_loss, learning_rate, resolve_device, train  # noqa: E402


class Stop(Exception):
    pass


class StepTimer:
    """An ``on_step`` hook: times steps warmup+1 .. warmup+steps, then stops the training by raising Stop."""

    def __init__(self, dev: torch.device, warmup: int, steps: int):
        self.dev, self.first, self.last, self.marks = dev, warmup, warmup + steps, {}

    def __call__(self, step: int) -> None:
        if step in (self.first, self.last):
            sync(self.dev)
            self.marks[step] = time.perf_counter()
        if step == self.last:
            raise Stop

    def rate(self, train_fn, *args, **kwargs) -> float:
        """Steps/s of ``train_fn(*args, on_step=self, **kwargs)`` over the timed steps."""
        try:
            train_fn(*args, on_step=self, **kwargs)
        except Stop:
            pass
        return (self.last - self.first) / (self.marks[self.last] - self.marks[self.first])


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


def reference_loop(config, dev: torch.device, steps: int, warmup: int) -> float:
    """Steps/s of the demo loop: full-batch HookedTransformer forward, float64 loss, AdamW with warm-up."""
    t = config.task
    data = build_task(t.op, t.p, t.n, t.frac_train, t.data_seed).to(dev)
    model = build_model(config.model, data.n_symbols, device=dev)
    cfg = config.train
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    tokens, labels = data.tokens[data.train_idx], data.labels[data.train_idx]
    for step in range(1, warmup + steps + 1):
        if step == warmup + 1:
            sync(dev)
            start = time.perf_counter()
        demo_step(model, optimizer, answer_logits, tokens, labels, learning_rate(cfg, step))
    sync(dev)
    return steps / (time.perf_counter() - start)


def trainer_speed(config, dev: torch.device, steps: int, warmup: int, folder: Path) -> float:
    """Steps/s of grokinterp.train on the config's real budget and schedule, stopped after warmup + steps."""
    return StepTimer(dev, warmup, steps).rate(train, config, folder / f"run{len(list(folder.iterdir()))}",
                                               device=str(dev), progress=False)


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
    parser.add_argument("--only", choices=["single", "stacked", "sharpness"], default=None)
    args = parser.parse_args()
    dev = resolve_device(args.device)
    config = get_preset("nanda2023")
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, device {dev}", flush=True)
    print(f"# nanda2023: x+y mod 113, {config.task.frac_train:.0%} data, full batch", flush=True)
    rows = []

    def row(name: str, value: str, ratio: str = "", memory: float | None = None) -> None:
        rows.append((name, value, ratio, "" if memory is None else f"{memory:.0f}"))
        print(f"{name:<48} {value:>9} {ratio:>11} {rows[-1][3]:>8}", flush=True)

    print(f"{'measurement':<48} {'value':>9} {'ratio':>11} {'peak MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        steady = config.replace(log_checkpoints=0)  # a run's schedule after its first 1,000 steps
        if args.only in (None, "single", "stacked"):
            reset_peak_memory(dev)
            ref = reference_loop(config, dev, args.steps, warmup=5)
            row("reference loop (demo), steps/s", f"{ref:.2f}", "1.00x", peak_memory_mb(dev))
        if args.only in (None, "single"):
            reset_peak_memory(dev)
            plain = trainer_speed(steady.replace(fast_path=False), dev, args.steps, 20, folder)
            row("grokinterp train --no-fast-path, steps/s", f"{plain:.2f}", f"{plain / ref:.2f}x", peak_memory_mb(dev))
            reset_peak_memory(dev)
            fast = trainer_speed(steady, dev, args.steps, 20, folder)
            row("grokinterp train (fast path), steps/s", f"{fast:.2f}", f"{fast / ref:.2f}x", peak_memory_mb(dev))
            early = trainer_speed(config, dev, args.steps, 20, folder)
            row("  the same, early schedule (16 saves), steps/s", f"{early:.2f}", f"{early / ref:.2f}x")
            row("checkpoint save, ms", f"{save_ms(config, dev, folder):.1f}", "")
            for dtype in (torch.float32, torch.float64):
                fast_gap, order_gap = parity(config, dev, 100, dtype)
                name = str(dtype).removeprefix("torch.")
                row(f"{name}, 100 steps: max |Δw| fast vs plain", f"{fast_gap:.1e}", "")
                row(f"{name}, 100 steps: |Δw| plain vs rows reordered", f"{order_gap:.1e}", "")
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
