"""What a config will need, worked out before anything is trained: memory (task table, model and optimizer, one
training step's activations, one evaluation chunk, a checkpoint being saved) and disk (every checkpoint).

``check_fits`` refuses, in one line with the estimate and what to change, a config that cannot fit this machine:
without it ``grokinterp train --p 1999`` is killed by the kernel's OOM killer at ~23 GB with no message.

The per-row constants count the tensors one step keeps alive at its peak (the float32 logits, their float64 copy
for the loss, the log-softmax the loss saves and its gradient, the MLP activations), and were checked against the
peak RSS of real runs (``tests/test_run_guards.py``; the README's run-folder section has the numbers).
"""

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from grokinterp.config import RunConfig, parameter_count
from grokinterp.errors import ConfigError

GB = 1e9
EVAL_CHUNK = 16_384  # rows per no-grad forward when evaluating; the trainer's own value (trainer.EVAL_CHUNK)
RUNTIME = 128_000_000  # bytes a run takes whatever the config: kernels, thread pools, allocator slack, copies
# made while saving (measured: 28 MB for x+y mod 7; ~100 MB beside the evaluation for mod 400 in batches of 8192)
HEADROOM = 0.85  # refuse what needs more than this share of the available memory (the OS and page cache need some)


@dataclass(frozen=True)
class Estimate:
    """Bytes a run of a config needs at its peak, by part, and on disk."""

    table: int
    """Task table (tokens, labels, split) and the training rows' copies."""
    model: int
    """Parameters, gradients, Adam's two moments, and the copies a checkpoint save serializes."""
    step: int
    """Activations of one training step (a full batch unless --batch-size), kept for the backward pass."""
    evaluation: int
    """One evaluation chunk's activations plus the per-row loss and accuracy of the whole table."""
    disk: int
    """Every checkpoint's weights, the trainer state and the task table."""
    batch_rows: int
    """Rows in one training step."""

    @property
    def memory(self) -> int:
        """Peak bytes beyond the interpreter and libraries: the table and model stay resident, a step and an
        evaluation never overlap, and RUNTIME more whatever the config."""
        return RUNTIME + self.table + self.model + max(self.step, self.evaluation)


def step_bytes_per_row(config: RunConfig, fast: bool) -> int:
    """Bytes one training row keeps alive at a step's peak (the backward pass). Fitted to the peak RSS of one
    full-batch step (2026-12-01, torch 2.13 CPU): the fast path measured 11.5, 27.9 and 19.7 kB per row for
    (p, d_mlp) = (400, 512), (199, 2048), (800, 128), which this gives as 16.7, 30.4 and 21.7 kB; the
    HookedTransformer forward measured 32.9 and 97.3 kB for the first two (this: 46.8 and 111 kB)."""
    m, v = config.model, config.task.n_symbols
    if fast:  # the answer position only: its logits (float32, the float64 loss copy, the gradients) and its MLP
        return 24 * v + 12 * m.d_mlp + 8 * m.n_heads * m.d_head
    # the HookedTransformer forward: the logits and every layer's activations at all 3 positions, with gradients
    return 48 * v + m.n_layers * (48 * m.d_mlp + 12 * (m.d_model + m.n_heads * m.d_head))


def _takes_fast_path(config: RunConfig) -> bool:
    """Whether training takes the fast path, as far as the config tells (it covers 1-layer models)."""
    tr = config.train
    return tr.fast_path and config.model.n_layers == 1 and tr.dropout == 0 and tr.attn_dropout == 0


def _intervention_copies(config: RunConfig) -> int:
    """Parameter-sized tensors an intervention keeps for the whole run."""
    tr = config.train
    from grokinterp.interventions import Interventions

    init = 1 if Interventions.needs_init(config) else 0
    return init + {"none": 0, "ema": 1, "ma": tr.grokfast_window}[tr.grokfast]


def estimate(config: RunConfig, fast: bool | None = None, models: int = 1) -> Estimate:
    """What ``config`` needs; ``fast``: whether training takes the fast path (default: as the config asks, for a
    1-layer model); ``models``: runs trained at once in one stack (``grokinterp sweep``)."""
    t, m, tr = config.task, config.model, config.train
    fast = _takes_fast_path(config) if fast is None else fast
    v = t.n_symbols
    rows = v * v
    n_train = max(1, math.floor(t.frac_train * rows))
    batch = n_train if tr.batch_size == 0 or tr.batch_size >= n_train else tr.batch_size
    params = parameter_count(t, m)
    table = 48 * rows + 32 * n_train
    # 4 bytes each: weights, gradient, two moments; ~6 more copies while saving; and what interventions keep: the
    # step-0 weights, Grokfast's filter (a window of gradients for 'ma', saved with the trainer state)
    kept = _intervention_copies(config)
    model = models * (40 + 8 * kept) * params
    step = models * batch * step_bytes_per_row(config, fast)
    chunk = min(EVAL_CHUNK, rows)
    # no gradients: a chunk's logits, their float64 copy and the loss; then the whole table's losses and hits.
    # Measured 165, 176 and 393 MB for the three fast-path cases above; this gives 222, 230 and 398 MB.
    eval_per_row = 26 * v + 5 * m.d_mlp + 5 * m.d_model
    evaluation = models * (chunk * eval_per_row + 64 * rows)
    from grokinterp.checkpoints import checkpoint_schedule

    n_ckpts = len(checkpoint_schedule(tr.steps, tr.checkpoints, tr.log_checkpoints))
    disk = models * (4 * params * (n_ckpts + 3 + kept) + 40 * rows)
    return Estimate(table, model, step, evaluation, disk, batch)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: MemAvailable from /proc/meminfo (Linux), else the free
    physical pages; None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path: Path) -> int | None:
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def check_fits(config: RunConfig, out: Path | None, device_type: str = "cpu", fast: bool | None = None,
               models: int = 1, available: int | None = None) -> Estimate:
    """Refuse ``config`` with one line if its estimate does not fit the memory available now (or the disk under
    ``out``, unless None); otherwise return the estimate. On a GPU the memory is the device's; other devices are
    not checked."""
    est = estimate(config, fast, models)
    if available is None:
        if device_type == "cpu":
            available = available_memory()
        elif device_type == "cuda":
            import torch

            available = torch.cuda.mem_get_info()[0]
    if available is not None and est.memory > HEADROOM * available:
        raise ConfigError(f"this run needs about {_gb(est.memory)} of memory ({_parts(est)}), but "
                          f"{_gb(available)} is available; {_advice(config, est, HEADROOM * available, fast, models)}")
    disk = None if out is None else free_disk(out)
    if disk is not None and est.disk > disk:
        raise ConfigError(f"this run's checkpoints need about {_gb(est.disk)} of disk, but {out} has {_gb(disk)} "
                          "free; give fewer --checkpoints and --log-checkpoints, free space, or use another --out")
    return est


def _gb(n: int | float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.0f} MB"


def _parts(est: Estimate) -> str:
    biggest = "a training step" if est.step >= est.evaluation else "an evaluation chunk"
    return (f"{_gb(max(est.step, est.evaluation))} for {biggest} of {est.batch_rows:,} rows, {_gb(est.table)} for "
            f"the task table, {_gb(est.model)} for the model and optimizer")


def _advice(config: RunConfig, est: Estimate, budget: float, fast: bool | None, models: int) -> str:
    """What to change: the largest power-of-two --batch-size that fits, else a smaller task or model."""
    fixed = RUNTIME + est.table + est.model + est.evaluation
    fast = _takes_fast_path(config) if fast is None else fast
    per_row = models * step_bytes_per_row(config, fast)
    if fixed < budget and per_row > 0:
        batch = 2 ** int(math.log2(max(1, (budget - fixed) // per_row)))
        if 32 <= batch < est.batch_rows:
            fits = estimate(config.replace(batch_size=batch), fast, models).memory
            return f"train with --batch-size {batch} (about {_gb(fits)}), or a smaller --p"
    return "use a smaller --p (or --n), or a smaller model (--d-model, --d-mlp)"
