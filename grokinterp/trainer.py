"""The training loop: one readable function from a config to a run directory of dense checkpoints.

Per step: set the warm-up learning rate, take the batch, forward, float64 cross-entropy on the answer logits,
backward, optimizer step. Every ``eval_every`` steps the whole table is evaluated and a row appended to the
metrics log; at every scheduled step the weights (and the optimizer state, for resuming) are saved.

Randomness: the split comes from ``data_seed``; initialization and minibatch order from ``model_seed``. The batch
of step t is a pure function of (model_seed, t), so a resumed run sees exactly the batches an uninterrupted one
would.
"""

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from grokinterp.checkpoints import (
    RESUMABLE_FIELDS,
    Run,
    RunError,
    RunStore,
    TrainerState,
    checkpoint_schedule,
    first_step_reaching,
    fit_weights,
    metrics_step_cutoff,
    weight_norm_sq,
)
from grokinterp.config import RunConfig, TrainConfig
from grokinterp.denormals import flush_denormals
from grokinterp.fastpath import fast_answer_logits, unsupported_reason
from grokinterp.model import answer_logits, build_model
from grokinterp.resources import EVAL_CHUNK, check_fits  # EVAL_CHUNK: rows per no-grad forward when evaluating
from grokinterp.tasks import TaskData, build_task

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RunError(f"unknown --device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"--device {device}: MPS is not available on this machine; use --device cpu or auto")
    return dev


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    # Adam(W) through torch's fused kernel where it has one (CPU, CUDA): one pass per tensor instead of about ten
    # ops, 0.7 ms of a 26 ms nanda2023 fast-path step on 2 cores. Same update up to float32 rounding.
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                                 fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                                fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.beta1)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate of update number ``step`` (1-based): linear warm-up, then constant."""
    if cfg.warmup_steps == 0:
        return cfg.lr
    return cfg.lr * min(1.0, step / cfg.warmup_steps)


def batch_indices(n_train: int, batch_size: int, seed: int, step: int) -> Int[torch.Tensor, " batch"] | None:
    """Positions in the training set used by update ``step`` (1-based); None for full batch.

    Epochs are fresh permutations of the training set, each from its own generator seeded by (seed, epoch), so
    the batch depends only on (seed, step) and a resumed run replays exactly the same sequence."""
    if batch_size == 0 or batch_size >= n_train:
        return None
    per_epoch = math.ceil(n_train / batch_size)
    epoch, k = divmod(step - 1, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_train, generator=generator)
    return order[k * batch_size : (k + 1) * batch_size]


def answer_loss(logits: Float[torch.Tensor, "batch d_vocab_out"], labels: Int[torch.Tensor, " batch"]) -> torch.Tensor:
    """Mean cross-entropy in float64 (late in grokking the logits are large and float32 loses the signal)."""
    return F.cross_entropy(logits.to(torch.float64), labels)


def uses_fast_path(model, cfg: TrainConfig) -> bool:
    """Whether training runs through grokinterp.fastpath: asked for by the config and exact for this model."""
    if not cfg.fast_path:
        return False
    reason = unsupported_reason(model.cfg)
    if reason is not None:
        log.info("the fast path does not cover this model (%s); training through the HookedTransformer forward", reason)
    return reason is None


def forward_for(model, cfg: TrainConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The answer-logits function training uses: the fast path where it applies, else the model's own forward."""
    return fast_answer_logits if uses_fast_path(model, cfg) else answer_logits


@torch.no_grad()
def evaluate(model, data: TaskData, forward=answer_logits) -> dict[str, float]:
    """Loss and accuracy (float64) on the training and validation splits."""
    losses, correct = [], []
    for start in range(0, len(data.labels), EVAL_CHUNK):
        tokens = data.tokens[start : start + EVAL_CHUNK]
        labels = data.labels[start : start + EVAL_CHUNK]
        logits = forward(model, tokens).to(torch.float64)
        losses.append(F.cross_entropy(logits, labels, reduction="none"))
        correct.append(logits.argmax(-1) == labels)
    return split_metrics(torch.cat(losses), torch.cat(correct).double(), data.train_idx, data.val_idx)


def split_metrics(loss: Float[torch.Tensor, " rows"], acc: Float[torch.Tensor, " rows"],
                  train_idx: Int[torch.Tensor, " n_train"], val_idx: Int[torch.Tensor, " n_val"]) -> dict[str, float]:
    """Per-row loss and correctness over the whole table, averaged over the training and validation rows."""
    return {
        "train_loss": loss[train_idx].mean().item(),
        "train_acc": acc[train_idx].mean().item(),
        "val_loss": loss[val_idx].mean().item(),
        "val_acc": acc[val_idx].mean().item(),
    }


@dataclass
class TrainResult:
    run: Run
    step: int
    stop_reason: str
    """'budget', 'early_stop', 'interrupted' or 'diverged'."""
    seconds: float


class _Interrupt:
    """Turns Ctrl-C into a flag the loop checks after each step, so the step in flight finishes and is saved."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    rebuild_log: bool = False,
) -> TrainResult:
    """Train ``config`` into ``run_dir`` (a new directory), or continue the run there with ``resume=True``.

    On resume the saved config must equal ``config`` except for a larger step budget (and the stopping rule),
    which extends the run. ``on_step`` is called after each update (tests use it to interrupt a run).
    ``rebuild_log`` (with ``resume``): re-evaluate the checkpoints a truncated metrics log lacks rows for.

    On the CPU, float values below float32's smallest normal number are computed as zero while it trains (on every
    torch thread; see ``grokinterp.denormals``); the caller's mode is restored afterwards.
    """
    dev = resolve_device(device)
    # refuse what cannot fit before writing anything (the disk only for a new run: a resume's earlier
    # checkpoints are already there)
    check_fits(config, None if resume else Path(run_dir).parent, dev.type)
    if resume:
        store = RunStore(run_dir)
        saved = Run(run_dir).config
        _check_resume_config(saved, config, store.path)
        data = store.read_data()
        store.check_config(saved, data)  # config.json itself may have been edited since training
        if rebuild_log and not (store.path / "metrics.jsonl").exists():
            store.rewrite_metrics([])  # a deleted log is rebuilt like an emptied one
    else:
        data = build_task(config.task.op, config.task.p, config.task.n, config.task.frac_train, config.task.data_seed)
        store = RunStore.create(run_dir, config, data)
    store.lock()
    try:
        # Denormals flushed on every CPU thread: after memorization they made each step several times slower on
        # Intel cores (grokinterp.denormals). On in every process that trains, so a resumed run stays bit-exact.
        with _deterministic(dev), flush_denormals(enabled=dev.type == "cpu"):
            return _train_locked(config, store, data, dev, resume, progress, on_step, rebuild_log)
    finally:
        store.unlock()


@contextlib.contextmanager
def _deterministic(dev: torch.device):
    """On the CPU, use PyTorch's deterministic kernels while training, so a run resumed in a new process ends
    bit-for-bit where an uninterrupted one does. Without them the embedding's backward (an index_put with
    accumulate) sums in a thread-dependent order and two processes drift apart by ~1e-8 from step 1. CUDA is
    left alone: its deterministic mode needs CUBLAS_WORKSPACE_CONFIG set before start-up.

    The mode's other half, filling every new tensor with NaN before use (a guard against reading uninitialized
    memory, which no kernel here does), is switched off: it wrote each [batch, d_mlp] activation twice and cost
    ~5% of a fast-path step and a third of an evaluation."""
    if dev.type != "cpu":
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def _check_resume_config(saved: RunConfig, asked: RunConfig, path: Path) -> None:
    saved_flat = {k: v for section in saved.to_dict().values() for k, v in section.items()}
    asked_flat = {k: v for section in asked.to_dict().values() for k, v in section.items()}
    changed = [k for k in saved_flat if saved_flat[k] != asked_flat[k] and k not in RESUMABLE_FIELDS]
    if changed:
        k = changed[0]
        raise RunError(
            f"cannot resume {path} with --{k.replace('_', '-')} {asked_flat[k]}: the run was trained with "
            f"{saved_flat[k]}; resume without changing the config (only --steps and the stop rule may change), "
            "or start a new run"
        )
    if asked.train.steps < saved.train.steps:
        raise RunError(f"cannot resume {path} with --steps {asked.train.steps}: the run's budget is already "
                       f"{saved.train.steps}; give a larger budget or none")


def _train_locked(config, store: RunStore, data: TaskData, dev, resume, progress, on_step,
                  rebuild_log=False) -> TrainResult:
    cfg = config.train
    started = time.perf_counter()
    model = build_model(config.model, data.n_symbols, device=dev)
    forward = forward_for(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    data = data.to(dev)
    train_tokens, train_labels = data.tokens[data.train_idx], data.labels[data.train_idx]

    step = 0
    state = store.read_trainer_state() if resume else None
    if resume and state is None:  # stopped before its first checkpoint was complete: start it over
        log.info("%s has no complete checkpoint yet; training it from step 0", store.path)
        store.rewrite_metrics([])
        store.write_config(config)
    elif resume:
        if rebuild_log:
            _rebuild_log(store, model, data, forward, cfg, state.step)
        logged = {row["step"] for row in store.read_metrics()}
        expected = state.step - state.step % cfg.eval_every
        # every evaluation up to the checkpoint is in the log of an intact run; a rebuilt log has the checkpoint's
        if expected not in logged and state.step not in logged:
            raise RunError(f"{store.path / 'metrics.jsonl'} has no row for step {expected}, before the checkpoint to "
                           f"resume from (step {state.step}): the log was truncated or replaced; restore it, or "
                           "re-evaluate the checkpoints it lacks (rows between checkpoints are lost) with: "
                           f"grokinterp train --resume {store.path} --rebuild-log")
        tensors, _, file = store.read_checkpoint(state.step)
        fit_weights(model, tensors, file)
        optimizer.load_state_dict(state.optimizer)
        step = state.step
        store.rewrite_metrics(metrics_step_cutoff(store.read_metrics(), step))
        store.write_config(config)
        if step >= cfg.steps:
            log.info("run %s is already at step %d of %d; give a larger --steps to train on", store.path, step,
                     cfg.steps)
    schedule = set(checkpoint_schedule(cfg.steps, cfg.checkpoints, cfg.log_checkpoints))

    metrics_file = store.open_metrics_for_append()

    def log_row(step: int) -> dict[str, float | int]:
        row = {**evaluation_row(model, data, forward, cfg, step), "time_s": round(time.perf_counter() - started, 3)}
        model.train()
        metrics_file.write(json.dumps(row) + "\n")
        return row

    def save(step: int, stop_reason: str | None) -> None:
        store.write_weights(step, model.state_dict(), config)
        finished = stop_reason is not None and stop_reason != "interrupted"
        store.write_trainer_state(TrainerState(step, optimizer.state_dict(), finished, stop_reason or ""))

    if state is None:  # a new run (or one that never completed a checkpoint); a resume from step 0 has its row
        rows = [log_row(0)]
        save(0, None)
    else:
        rows = store.read_metrics()
        started -= rows[-1]["time_s"] if rows else 0.0  # wall time in the log counts across resumes
    threshold = cfg.stop_val_acc
    reached_at = first_step_reaching(rows, "val_acc", threshold) if threshold > 0 else None
    stop_reason = _stop_reason(cfg, step, reached_at, interrupted=False, loss_finite=True)
    if state is None and stop_reason is not None:  # the initialization already meets the stop rule: a finished run
        save(0, stop_reason)
    if resume and stop_reason == "early_stop":
        log.info("the run met its stop rule (val acc %.2f at step %d); resume with --stop-val-acc 0 to train on",
                 threshold, reached_at)

    bar = _progress_bar(progress, step, cfg.steps, store.path.name)
    if rows:
        _update_bar(bar, rows[-1])
    model.train()
    with _Interrupt() as interrupt:
        while stop_reason is None:
            step += 1
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            picked = batch_indices(len(train_labels), cfg.batch_size, config.model.model_seed, step)
            if picked is None:
                tokens, labels = train_tokens, train_labels
            else:
                picked = picked.to(dev)
                tokens, labels = train_tokens[picked], train_labels[picked]
            loss = answer_loss(forward(model, tokens), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step(step)

            row = None
            if step % cfg.eval_every == 0 or step in schedule or step == cfg.steps:
                row = log_row(step)
                if threshold > 0 and reached_at is None and row["val_acc"] >= threshold:
                    reached_at = step
                _update_bar(bar, row)
            stop_reason = _stop_reason(cfg, step, reached_at, interrupt.requested, bool(torch.isfinite(loss)))
            if row is None and stop_reason not in (None, "interrupted"):
                _update_bar(bar, log_row(step))  # the last step of a run is always in the log
            if step in schedule or stop_reason is not None:
                save(step, stop_reason)
            if bar is not None:
                bar.update(1)
    metrics_file.close()
    if bar is not None:
        bar.close()
    return TrainResult(Run(store.path), step, stop_reason, time.perf_counter() - started)


def evaluation_row(model, data: TaskData, forward, cfg: TrainConfig, step: int) -> dict[str, float | int]:
    """A metrics-log row of ``step`` but its wall time: loss and accuracy of both splits, Σ‖θ‖² and the learning
    rate. Leaves the model in eval mode."""
    model.eval()
    return {"step": step, **evaluate(model, data, forward), "weight_norm_sq": weight_norm_sq(model.parameters()),
            "lr": learning_rate(cfg, max(step, 1))}


def _rebuild_log(store: RunStore, model, data: TaskData, forward, cfg: TrainConfig, upto: int) -> None:
    """Keep the metrics log's intact rows and append a row for every checkpoint after them, up to step ``upto``,
    evaluated as training evaluates. Rows between checkpoints cannot be recovered. A rebuilt row has ``rebuilt``
    = 1 and the last intact row's ``time_s`` (its own wall time is unknown)."""
    rows = store.read_metrics(stop_at_damage=True)
    last = rows[-1]["step"] if rows else -1
    time_s = rows[-1]["time_s"] if rows else 0.0
    steps = [s for s in store.steps() if last < s <= upto]
    for step in steps:
        tensors, _, file = store.read_checkpoint(step)
        fit_weights(model, tensors, file)
        rows.append({**evaluation_row(model, data, forward, cfg, step), "time_s": time_s, "rebuilt": 1})
    store.rewrite_metrics(rows)
    log.info("rebuilt %s: kept %d rows, re-evaluated %d checkpoints", store.path / "metrics.jsonl",
             len(rows) - len(steps), len(steps))


def _stop_reason(cfg: TrainConfig, step: int, reached_at: int | None, interrupted: bool, loss_finite: bool):
    """Why training stops after ``step``, or None to go on."""
    if not loss_finite:
        return "diverged"
    if reached_at is not None and step >= reached_at + cfg.stop_patience:
        return "early_stop"
    if step >= cfg.steps:
        return "budget"
    if interrupted:
        return "interrupted"
    return None


def _progress_bar(enabled: bool, initial: int, total: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", mininterval=0.5, dynamic_ncols=True)


def _update_bar(bar, row: dict) -> None:
    if bar is not None:
        bar.set_postfix_str(
            f"train {row['train_loss']:.3g}/{row['train_acc']:.1%}  val {row['val_loss']:.3g}/{row['val_acc']:.1%}",
            refresh=False,
        )
