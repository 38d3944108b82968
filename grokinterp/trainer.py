"""The training loop: one loop that trains a group of runs in lockstep, each into its own run directory of dense
checkpoints. ``train`` is a group of one; ``grokinterp.sweep`` trains many (a stack of K models).

Per step: set the warm-up learning rate, take each run's batch, forward, float64 loss on the answer logits
(``grokinterp.objective``), backward, the interventions (``grokinterp.interventions``), optimizer step. Every
``eval_every`` steps the whole table is evaluated and a row appended to each run's metrics log; at every scheduled
step the weights (and the optimizer state, for resuming) are saved.

Every parameter is held as a stack [K, ...] of the group's models, and one torch optimizer steps them all: its
update is elementwise, so each model's update is the one a lone optimizer would make. What may differ between the
models of a stack (seeds, training fraction, weight decay, the noise scales, the stop rule: ``MEMBER_FIELDS``) is
applied per model; everything else is shared. One model goes through the fast path's folded form
(``grokinterp.fastpath``) or the HookedTransformer's forward; K > 1 models through ``vmap`` of the same function.

Randomness: the split comes from ``data_seed``; initialization, minibatch order and every intervention's noise from
``model_seed``. The batch and the noise of step t are pure functions of (model_seed, t), so a resumed run sees
exactly what an uninterrupted one would.
"""

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch.func import functional_call, vmap

from grokinterp.checkpoints import (
    RESUMABLE_FIELDS,
    Run,
    RunError,
    RunStore,
    TrainerState,
    checkpoint_schedule,
    fit_weights,
    metrics_step_cutoff,
    weight_norm_sq,
)
from grokinterp.config import ConfigError, RunConfig, TrainConfig
from grokinterp.denormals import flush_denormals
from grokinterp.fastpath import answer_logits_from_params, fast_logits_from_params, unsupported_reason
from grokinterp.interventions import DROPOUT, Interventions, dropout_hooks, generator
from grokinterp.model import build_model
from grokinterp.objective import member_losses, row_losses, split_metrics
from grokinterp.resources import EVAL_CHUNK, check_fits  # EVAL_CHUNK: rows per no-grad forward when evaluating
from grokinterp.tasks import TaskData, build_task

log = logging.getLogger(__name__)

MEMBER_FIELDS = ("model_seed", "data_seed", "frac_train", "weight_decay", "weight_noise", "update_noise",
                 "grad_noise", "stop_val_acc", "stop_patience")
"""Config fields that may differ between the models of one stack; every other field is shared by the stack."""
CPU_ROWS_PER_PASS = 16_384
"""Rows (models x batch) per forward/backward pass of a stack on the CPU. Measured on nanda2023 (3830 training rows),
one pass over 16 models ran ~25% slower per model than passes of 4, whose activations still fit in cache."""
REACHED = 0.99
"""Accuracy that counts as learned (Power et al. use 99%): on a stack's progress bar when no stop rule is set, and in
a sweep's results table."""


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


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The config's optimizer over ``params``; ``weight_decay`` overrides the config's (the loop passes 0 and applies
    each model's own decay itself, ``grokinterp.interventions``).

    Adam(W) through torch's fused kernel where it has one (CPU, CUDA): one pass per tensor instead of about ten
    ops, 0.7 ms of a 26 ms nanda2023 fast-path step on 2 cores. Same update up to float32 rounding."""
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=wd, betas=(cfg.beta1, cfg.beta2), fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=wd, momentum=cfg.beta1)


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


def fast_path_reason(config: RunConfig, hooked_cfg) -> str | None:
    """None when ``config`` trains through the fast path; else why not (asked for with --no-fast-path, a model the
    fast path does not cover, or an intervention that changes the forward)."""
    if not config.train.fast_path:
        return "--no-fast-path"
    if config.train.dropout or config.train.attn_dropout:
        return "dropout acts inside the HookedTransformer forward"
    return unsupported_reason(hooked_cfg)


def stack_key(config: RunConfig) -> str:
    """Runs with the same key can be trained in one stack: they differ only in ``MEMBER_FIELDS``. Dropout runs are
    trained alone (their forward is the HookedTransformer's, with hooks that draw per model)."""
    flat = {k: v for k, v in config.flat().items() if k not in MEMBER_FIELDS}
    if config.train.dropout or config.train.attn_dropout:
        flat["alone"] = config.to_json()
    return json.dumps(flat, sort_keys=True)


def stack_mismatch(configs: Sequence[RunConfig]) -> str | None:
    """Why ``configs`` cannot be trained in one stack (one line), or None if they can."""
    if len(configs) < 2:
        return None
    flat = [c.flat() for c in configs]
    for i, other in enumerate(flat[1:], start=1):
        for key, value in flat[0].items():
            if key not in MEMBER_FIELDS and other[key] != value:
                return (f"cannot train these runs in one stack: --{key.replace('_', '-')} is {value} in the first and "
                        f"{other[key]} in run {i}; a stack's runs may differ only in "
                        f"{', '.join('--' + f.replace('_', '-') for f in MEMBER_FIELDS)}")
    if configs[0].train.dropout or configs[0].train.attn_dropout:  # shared by all, as checked above
        return "runs with dropout are trained one at a time, not in a stack"
    return None


@dataclass
class TrainResult:
    run: Run
    step: int
    stop_reason: str
    """'budget', 'early_stop', 'interrupted' or 'diverged'."""
    seconds: float


class _Interrupt:
    """Turns Ctrl-C (or any of ``signals``) into a flag the loop checks after each step, so the step in flight
    finishes and every run is saved."""

    def __init__(self, signals: Sequence[int] = (signal.SIGINT,)) -> None:
        self.requested = False
        self.signum: int | None = None
        """The signal that asked to stop (the first of ``signals`` to arrive)."""
        self.signals = tuple(signals)
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        if not self.requested:
            self.signum = signum
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


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


@contextlib.contextmanager
def training_mode(dev: torch.device, signals: Sequence[int] = (signal.SIGINT,)):
    """What every training process runs under: deterministic CPU kernels (bit-exact resume) and denormals flushed
    on every CPU thread (after memorization they made each step several times slower on Intel cores,
    ``grokinterp.denormals``), restored afterwards; yields the interrupt flag for ``signals``."""
    with _deterministic(dev), flush_denormals(enabled=dev.type == "cpu"), _Interrupt(signals) as interrupt:
        yield interrupt


# -- K models as one stack ---------------------------------------------------------------------------------------
class ModelStack:
    """The parameters of K models of one architecture, each tensor with a leading model dimension, and the
    forward, loss and evaluation of all K at once."""

    def __init__(self, configs: Sequence[RunConfig], n_symbols: int, dev: torch.device):
        """Freshly initialized models, each from its own ``model_seed``."""
        models = [build_model(c.model, n_symbols, device=dev) for c in configs]
        self.configs = list(configs)
        self.template = models[0]
        self.hooked_cfg = self.template.cfg
        self.state_keys = list(self.template.state_dict())  # the key set (and order) of an ordinary checkpoint
        self.buffers = dict(self.template.named_buffers())
        named = [dict(model.named_parameters()) for model in models]
        self.params: dict[str, torch.Tensor] = {}
        for name, param in self.template.named_parameters():
            stacked = torch.stack([n[name].detach() for n in named])
            self.params[name] = stacked.requires_grad_(param.requires_grad)
        # frozen biases stay in ``params`` (the forward needs them) but never get a gradient or an update
        self.trainable = {name: self.params[name] for name, p in self.template.named_parameters() if p.requires_grad}
        cfg = self.configs[0].train
        self.loss = cfg.loss
        self.dropout = (cfg.dropout, cfg.attn_dropout)
        reason = fast_path_reason(self.configs[0], self.hooked_cfg)
        if reason is not None and cfg.fast_path:
            log.info("training through the HookedTransformer forward, not the fast path (%s)", reason)
        hooked_cfg = self.hooked_cfg
        if reason is None:
            self._one = lambda params, tokens: fast_logits_from_params(params, tokens, hooked_cfg)
            many = lambda params, tokens: answer_logits_from_params(params, tokens, hooked_cfg)  # noqa: E731
        else:
            self._one = lambda params, tokens: functional_call(self.template, params, (tokens,))[:, -1]
            many = self._one
        self.fast = reason is None
        self._train_many = vmap(many, in_dims=(0, 0))
        self._eval_many = vmap(many, in_dims=(0, None))
        self.rows_per_pass = CPU_ROWS_PER_PASS if dev.type == "cpu" else None

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def set_weights(self, k: int, tensors: dict[str, torch.Tensor], file: Path) -> None:
        """Load a checkpoint's tensors into model ``k``, or say in one line which one does not fit."""
        fit_weights(self.template, tensors, file)  # checks names and shapes, and fills the template's buffers
        with torch.no_grad():
            for name, p in self.template.named_parameters():
                self.params[name][k].copy_(p)

    def keep(self, index: list[int]) -> None:
        """Drop every model not in ``index`` (finished runs leave the stack; the rest go on)."""
        rows = torch.tensor(index, dtype=torch.long, device=next(iter(self.params.values())).device)
        self.params = {n: p.detach()[rows].requires_grad_(p.requires_grad) for n, p in self.params.items()}
        self.trainable = {n: self.params[n] for n in self.trainable}
        self.configs = [self.configs[i] for i in index]

    def forward_backward(self, tokens: Int[torch.Tensor, "model batch pos"], labels: Int[torch.Tensor, "model batch"],
                         mask: Bool[torch.Tensor, "model batch"] | None, step: int) -> Float[torch.Tensor, " model"]:
        """Each model's loss, its gradient left in ``.grad``. The models share no parameters, so the gradient of
        the summed losses is each model's own. On the CPU a stack goes through in passes of a few models, whose
        activations stay in cache; a pass changes no model's arithmetic."""
        if self.size == 1:
            params = {n: p[0] for n, p in self.params.items()}  # views: the gradient reaches the stacked leaves
            with self._dropout(step):
                logits = self._one(params, tokens[0]).unsqueeze(0)
            loss = member_losses(logits, labels, mask, self.loss)
            loss.sum().backward()
            return loss.detach()
        per_pass = len(tokens) if self.rows_per_pass is None else max(1, self.rows_per_pass // tokens.shape[1])
        losses = []
        for lo in range(0, len(tokens), per_pass):
            part = slice(lo, lo + per_pass)
            params = {n: p[part] for n, p in self.params.items()}
            loss = member_losses(self._train_many(params, tokens[part]), labels[part],
                                 None if mask is None else mask[part], self.loss)
            loss.sum().backward()
            losses.append(loss.detach())
        return torch.cat(losses)

    def _dropout(self, step: int):
        """The dropout hooks of update ``step`` (a lone model: dropout runs are not stacked), or nothing."""
        if not any(self.dropout):
            return contextlib.nullcontext()
        g = generator(self.configs[0].model.model_seed, step, DROPOUT)
        return self.template.hooks(fwd_hooks=dropout_hooks(self.hooked_cfg.n_layers, *self.dropout, g))

    def zero_grad(self) -> None:
        for p in self.trainable.values():
            p.grad = None

    @torch.no_grad()
    def evaluate(self, table: TaskData, splits: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, float]]:
        """Loss and accuracy of every model over the whole table (float64, no dropout), averaged over each model's
        own (training rows, validation rows) in ``splits``."""
        k = self.size
        chunk = max(1, EVAL_CHUNK // k)
        losses, correct = [], []
        for start in range(0, len(table.labels), chunk):
            tokens, labels = table.tokens[start : start + chunk], table.labels[start : start + chunk]
            if k == 1:
                logits = self._one({n: p[0] for n, p in self.params.items()}, tokens).unsqueeze(0)
            else:
                logits = self._eval_many({n: p.detach() for n, p in self.params.items()}, tokens)
            losses.append(row_losses(logits.flatten(0, 1), labels.repeat(k), self.loss).view(k, -1))
            correct.append(logits.argmax(-1) == labels)
        loss, acc = torch.cat(losses, 1), torch.cat(correct, 1).double()
        return [split_metrics(loss[j], acc[j], *splits[j]) for j in range(k)]

    def weight_norm_sq(self, k: int) -> float:
        return weight_norm_sq(p[k] for p in self.params.values())

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Model ``k``'s weights with exactly the keys of ``model.state_dict()`` (buffers included)."""
        return {key: self.params[key][k].detach().clone() if key in self.params else self.buffers[key]
                for key in self.state_keys}


def _member_optimizer_state(optimizer: torch.optim.Optimizer, k: int, cfg: TrainConfig, lr: float) -> dict[str, Any]:
    """Model ``k``'s slice of the stack's optimizer state, in the format ``torch.optim`` writes for one model (its
    own weight decay in the param group, for whoever reads it)."""
    full = optimizer.state_dict()
    state = {i: {key: (t if t.dim() == 0 else t[k].clone()) if isinstance(t, torch.Tensor) else t
                 for key, t in entry.items()} for i, entry in full["state"].items()}
    groups = [{**g, "lr": lr, "weight_decay": cfg.weight_decay} for g in full["param_groups"]]
    return {"state": state, "param_groups": groups}


def _stacked_optimizer_state(optimizer: torch.optim.Optimizer, states: list[dict[str, Any]]) -> dict[str, Any]:
    """The stack's optimizer state from each model's saved one (``_member_optimizer_state``, or torch's own format
    as runs trained before the stack wrote it); torch casts dtypes and devices on loading."""
    entries = [s["state"] for s in states]
    stacked = {}
    for i in entries[0]:
        stacked[i] = {key: (t if t.dim() == 0 else torch.stack([e[i][key] for e in entries]))
                      if isinstance(t, torch.Tensor) else t for key, t in entries[0][i].items()}
    return {"state": stacked, "param_groups": optimizer.state_dict()["param_groups"]}


# -- the runs of a group -----------------------------------------------------------------------------------------
@dataclass
class _Member:
    """One run of a group: its store, split, resume point and progress."""

    config: RunConfig
    store: RunStore
    data: TaskData
    state: TrainerState | None = None
    metrics_file: Any = None
    time_offset: float = 0.0
    reached_at: int | None = None
    val_reached: bool = False
    stop_reason: str | None = None
    last_row: dict | None = None

    @property
    def step(self) -> int:
        return 0 if self.state is None else self.state.step

    @property
    def threshold(self) -> float:
        """Validation accuracy counted as 'reached' on a stack's progress bar: the stop rule's, else 99%."""
        return self.config.train.stop_val_acc or REACHED


def _open_member(config: RunConfig, run_dir: Path, resume: bool, rebuild_log: bool) -> _Member:
    """Create the run directory of a new run, or check an existing one against ``config`` for resuming. Locks it."""
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
        member = _Member(config, store, data)
        if resume:
            member.state = store.read_trainer_state()
            if member.state is None:  # stopped before its first checkpoint was complete: start it over
                log.info("%s has no complete checkpoint yet; training it from step 0", store.path)
                store.rewrite_metrics([])
                store.write_config(config)
        return member
    except BaseException:
        store.unlock()
        raise


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
    with training_mode(dev) as interrupt:
        return train_group([config], [Path(run_dir)], [resume], dev, interrupt=interrupt, progress=progress,
                           on_step=on_step, rebuild_log=rebuild_log)[0]


def train_group(configs: Sequence[RunConfig], run_dirs: Sequence[Path], resume: Sequence[bool], dev: torch.device, *,
                interrupt: _Interrupt, progress: bool = True, on_step: Callable[[int], None] | None = None,
                label: str | None = None, rebuild_log: bool = False) -> list[TrainResult]:
    """The one training loop, for runs that can share a stack (``stack_mismatch``) and start from the same step
    (new runs, or resumed ones whose last checkpoints are at one step). Call it under ``training_mode``. Returns one
    result per run, in order; on an interrupt every run is saved at the step it reached."""
    reason = stack_mismatch(configs)
    if reason is not None:
        raise ConfigError(reason)
    members: list[_Member] = []
    try:
        for config, run_dir, again in zip(configs, run_dirs, resume):
            members.append(_open_member(config, Path(run_dir), again, rebuild_log))
        starts = {m.step for m in members}
        if len(starts) > 1:
            raise RunError(f"runs resumed in one stack must be at one step, not {sorted(starts)}; resume them apart")
        return _train_members(members, dev, interrupt, progress, on_step, label, rebuild_log)
    finally:
        for m in members:
            if m.metrics_file is not None:
                m.metrics_file.close()
            m.store.unlock()


def _train_members(members: list[_Member], dev: torch.device, interrupt: _Interrupt, progress: bool, on_step,
                   label: str | None, rebuild_log: bool) -> list[TrainResult]:
    started = time.perf_counter()
    configs = [m.config for m in members]
    cfg = configs[0].train  # everything but the per-member fields is shared
    table = members[0].data.to(dev)  # every member has the same table; only the splits differ
    splits = [(m.data.train_idx.to(dev), m.data.val_idx.to(dev)) for m in members]
    stack = ModelStack(configs, table.n_symbols, dev)
    optimizer = make_optimizer(list(stack.trainable.values()), cfg, weight_decay=0.0)
    step = members[0].step
    fresh = [k for k, m in enumerate(members) if m.state is None]  # new runs (or ones without a checkpoint yet)

    for k, m in enumerate(members):
        if m.state is None:
            continue
        if rebuild_log:
            _rebuild_log(m, stack, k, table, splits[k])
        _check_log_reaches(m)
        tensors, _, file = m.store.read_checkpoint(step)
        stack.set_weights(k, tensors, file)
        m.store.rewrite_metrics(metrics_step_cutoff(m.store.read_metrics(), step))
        m.store.write_config(m.config)
        if step >= m.config.train.steps:
            log.info("run %s is already at step %d of %d; give a larger --steps to train on", m.store.path, step,
                     m.config.train.steps)
    if step > 0:
        optimizer.load_state_dict(_stacked_optimizer_state(optimizer, [m.state.optimizer for m in members]))
    interventions = Interventions(configs, _initial_weights(members, stack, step, dev))
    if step > 0:
        interventions.load_state([m.state.extra for m in members], dev)

    active = list(range(len(members)))  # member numbers, in stack order
    results: dict[int, TrainResult] = {}

    def log_rows(step: int, which: list[int]) -> None:
        """Append a metrics row to the logs of the stack positions ``which``."""
        if not which:
            return
        evals = stack.evaluate(table, [splits[i] for i in active])
        for j in which:
            m = members[active[j]]
            row = {**evaluation_row(stack, j, evals[j], cfg, step),
                   "time_s": round(time.perf_counter() - started + m.time_offset, 3)}
            m.metrics_file.write(json.dumps(row) + "\n")
            _note_row(m, row)

    def save(step: int, j: int) -> None:
        m = members[active[j]]
        m.store.write_weights(step, stack.state_dict(j), m.config)
        finished = m.stop_reason is not None and m.stop_reason != "interrupted"
        lr = learning_rate(cfg, step) if step > 0 else cfg.lr
        m.store.write_trainer_state(TrainerState(step, _member_optimizer_state(optimizer, j, m.config.train, lr),
                                                 finished, m.stop_reason or "", interventions.state(j)))

    def drop_finished(step: int) -> None:
        """Close the runs that stopped; the stack, optimizer and interventions go on with the others."""
        nonlocal active, optimizer, batch
        keep = [j for j, i in enumerate(active) if members[i].stop_reason is None]
        for j, i in enumerate(active):
            m = members[i]
            if m.stop_reason is not None:
                m.metrics_file.close()
                m.store.unlock()  # done: free to resume or analyse while the others train on
                results[i] = TrainResult(Run(m.store.path), step, m.stop_reason, time.perf_counter() - started)
        if len(keep) == len(active):
            return
        active = [active[j] for j in keep]
        if active:
            stack.keep(keep)
            interventions.keep(keep)
            optimizer = _kept_optimizer(optimizer, keep, stack, cfg)
            batch = _full_batch(members, active, table)

    for m in members:
        m.metrics_file = m.store.open_metrics_for_append()
        if m.state is not None:
            rows = m.store.read_metrics()
            m.time_offset = rows[-1]["time_s"] if rows else 0.0  # wall time in the log counts across resumes
            for row in rows:
                _note_row(m, row)
    log_rows(0, fresh)
    for k in fresh:
        save(0, k)
    for k, m in enumerate(members):
        m.stop_reason = _stop_reason(m.config.train, step, m.reached_at, interrupted=False, loss_finite=True)
        if m.stop_reason is not None and m.state is None:  # the initialization already meets the stop rule
            save(0, k)
        elif m.stop_reason == "early_stop":
            log.info("%s met its stop rule (val acc %.2f at step %d); resume with --stop-val-acc 0 to train on",
                     m.store.path, m.config.train.stop_val_acc, m.reached_at)
    schedules = [set(checkpoint_schedule(c.train.steps, c.train.checkpoints, c.train.log_checkpoints))
                 for c in configs]
    bar = _progress_bar(progress, step, max(c.train.steps for c in configs), label or members[0].store.path.name)
    batch = _full_batch(members, active, table)
    drop_finished(step)
    _update_bar(bar, members, active)

    while active:
        step += 1
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, labels, mask = batch if batch is not None else _batch([members[i] for i in active], table, step)
        stack.zero_grad()
        restore = interventions.perturb(stack.trainable, step)
        losses = stack.forward_backward(tokens, labels, mask, step)
        if restore is not None:
            restore()
        interventions.transform_gradients(stack.trainable, step, lr)
        optimizer.step()
        interventions.after_update(stack.trainable, step)
        if on_step is not None:
            on_step(step)

        finite = torch.isfinite(losses).tolist()
        evaluated = [step % members[i].config.train.eval_every == 0 or step in schedules[i]
                     or step == members[i].config.train.steps for i in active]
        log_rows(step, [j for j, e in enumerate(evaluated) if e])
        for j, i in enumerate(active):
            m = members[i]
            m.stop_reason = _stop_reason(m.config.train, step, m.reached_at, interrupt.requested, finite[j])
        # the last step of a run is always in its log
        log_rows(step, [j for j, i in enumerate(active)
                        if not evaluated[j] and members[i].stop_reason not in (None, "interrupted")])
        for j, i in enumerate(active):
            if step in schedules[i] or members[i].stop_reason is not None:
                save(step, j)
        drop_finished(step)
        if bar is not None:
            bar.update(1)
        _update_bar(bar, members, active)
    if bar is not None:
        bar.close()
    return [results[i] for i in range(len(members))]


def evaluation_row(stack: ModelStack, j: int, ev: dict[str, float], cfg: TrainConfig, step: int) -> dict[str, Any]:
    """A metrics-log row of ``step`` but its wall time: model ``j``'s loss and accuracy on both splits (``ev``),
    Σ‖θ‖² and the learning rate."""
    return {"step": step, **ev, "weight_norm_sq": stack.weight_norm_sq(j), "lr": learning_rate(cfg, max(step, 1))}


def _note_row(m: _Member, row: dict) -> None:
    """Track a logged row: when the stop rule's accuracy was reached, for the progress bar too."""
    threshold = m.config.train.stop_val_acc
    if threshold > 0 and m.reached_at is None and row["val_acc"] >= threshold:
        m.reached_at = row["step"]
    m.val_reached = m.val_reached or row["val_acc"] >= m.threshold
    m.last_row = row


def _initial_weights(members: list[_Member], stack: ModelStack, step: int, dev: torch.device):
    """The step-0 weights, for the interventions that need them (None otherwise). A new run with ``norm_scale``
    starts at that multiple of its initialization (Omnigrok); a resumed run reads its step-0 checkpoint."""
    config = members[0].config
    if not Interventions.needs_init(config):
        return None
    if step == 0:
        if config.train.norm_scale > 0:
            with torch.no_grad():
                for p in stack.trainable.values():
                    p.mul_(config.train.norm_scale)
        return {n: p.detach().clone() for n, p in stack.trainable.items()}
    first = ModelStack([m.config for m in members], stack.hooked_cfg.d_vocab_out, dev)
    for k, m in enumerate(members):
        if 0 not in m.store.steps():
            raise RunError(f"{m.store.path} has no step-0 checkpoint, which --wd-target init and --norm-scale need "
                           "to resume; restore it, or start a new run")
        tensors, _, file = m.store.read_checkpoint(0)
        first.set_weights(k, tensors, file)
    return {n: p.detach() for n, p in first.trainable.items()}


def _kept_optimizer(optimizer: torch.optim.Optimizer, keep: list[int], stack: ModelStack,
                    cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of the models ``keep`` of the old stack, over the new stack's tensors."""
    full = optimizer.state_dict()
    rows = torch.tensor(keep)
    state = {i: {key: t if not isinstance(t, torch.Tensor) or t.dim() == 0 else t[rows.to(t.device)]
                 for key, t in entry.items()} for i, entry in full["state"].items()}
    kept = make_optimizer(list(stack.trainable.values()), cfg, weight_decay=0.0)
    kept.load_state_dict({"state": state, "param_groups": full["param_groups"]})
    return kept


def _batch(members: list[_Member], table: TaskData, step: int):
    """Step ``step``'s rows of every model, padded to the longest: tokens, labels and the mask of real rows (None
    when no row is padding).

    A model's rows are exactly those it would train on alone (``batch_indices`` of its own training set and
    ``model_seed``), in the same order; padding repeats row 0 and is masked out of the loss."""
    cfg = members[0].config.train
    picked = []
    for m in members:
        rows = m.data.train_idx.to(table.tokens.device)
        positions = batch_indices(len(rows), cfg.batch_size, m.config.model.model_seed, step)
        picked.append(rows if positions is None else rows[positions.to(rows.device)])
    width = max(len(rows) for rows in picked)
    index = torch.zeros(len(members), width, dtype=torch.long, device=table.tokens.device)
    mask = torch.zeros(len(members), width, dtype=torch.bool, device=table.tokens.device)
    for k, rows in enumerate(picked):
        index[k, : len(rows)] = rows
        mask[k, : len(rows)] = True
    return table.tokens[index], table.labels[index], None if bool(mask.all()) else mask


def _full_batch(members: list[_Member], active: list[int], table: TaskData):
    """The batch of every step when every active model trains on its whole training set (built once), else None."""
    runs = [members[i] for i in active]
    if not runs:
        return None
    size = runs[0].config.train.batch_size
    if all(size == 0 or size >= len(m.data.train_idx) for m in runs):
        return _batch(runs, table, 1)
    return None


def _check_resume_config(saved: RunConfig, asked: RunConfig, path: Path) -> None:
    saved_flat, asked_flat = saved.flat(), asked.flat()
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


def _check_log_reaches(m: _Member) -> None:
    """Every evaluation up to the checkpoint is in the log of an intact run (a rebuilt log has the checkpoint's)."""
    step = m.state.step
    logged = {row["step"] for row in m.store.read_metrics()}
    expected = step - step % m.config.train.eval_every
    if expected not in logged and step not in logged:
        raise RunError(f"{m.store.path / 'metrics.jsonl'} has no row for step {expected}, before the checkpoint to "
                       f"resume from (step {step}): the log was truncated or replaced; restore it, or "
                       "re-evaluate the checkpoints it lacks (rows between checkpoints are lost) with: "
                       f"grokinterp train --resume {m.store.path} --rebuild-log")


def _rebuild_log(m: _Member, stack: ModelStack, k: int, table: TaskData, split) -> None:
    """Keep the metrics log's intact rows and append a row for every checkpoint after them, up to the one to resume
    from, evaluated as training evaluates. Rows between checkpoints cannot be recovered. A rebuilt row has
    ``rebuilt`` = 1 and the last intact row's ``time_s`` (its own wall time is unknown). A lone run only."""
    if stack.size != 1:
        raise RunError("--rebuild-log rebuilds one run at a time; resume that run on its own")
    rows = m.store.read_metrics(stop_at_damage=True)
    last = rows[-1]["step"] if rows else -1
    time_s = rows[-1]["time_s"] if rows else 0.0
    steps = [s for s in m.store.steps() if last < s <= m.state.step]
    for step in steps:
        tensors, _, file = m.store.read_checkpoint(step)
        stack.set_weights(k, tensors, file)
        ev = stack.evaluate(table, [split])[0]
        rows.append({**evaluation_row(stack, k, ev, m.config.train, step), "time_s": time_s, "rebuilt": 1})
    m.store.rewrite_metrics(rows)
    log.info("rebuilt %s: kept %d rows, re-evaluated %d checkpoints", m.store.path / "metrics.jsonl",
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


def _update_bar(bar, members: list[_Member], active: list[int]) -> None:
    """One run: its last losses and accuracies; a stack: how many runs train and how many reached val acc."""
    if bar is None:
        return
    if len(members) == 1:
        row = members[0].last_row
        if row is not None:
            bar.set_postfix_str(f"train {row['train_loss']:.3g}/{row['train_acc']:.1%}  "
                                f"val {row['val_loss']:.3g}/{row['val_acc']:.1%}", refresh=False)
        return
    reached = sum(m.val_reached for m in members)
    bar.set_postfix_str(f"{len(active)}/{len(members)} training, {reached}/{len(members)} reached val acc",
                        refresh=False)
