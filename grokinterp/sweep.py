"""Many runs at once: a grid of seeds × training fractions × weight decays, trained together and saved apart.

Runs that differ only in ``model_seed``, ``data_seed``, ``frac_train``, ``weight_decay`` (and the stop rule) take
the same sequence of steps with the same shapes, so one loop serves them all: every parameter is stacked along a
leading model dimension K and one ``vmap``-ed forward/backward (through ``grokinterp.fastpath`` where the config
uses it) updates K models per step. That pays where one model's step leaves the hardware idle: on a GPU (a step
is a few dozen tiny kernels) and for small tables, where per-step overhead dominates. Where one model's step
already keeps the CPU busy (``nanda2023`` on the fast path runs near the core's float32 peak) stacking shares no
arithmetic and gains little; the sweep is then mainly one command, one progress bar and one figure.

Each member follows the ordinary trainer (``grokinterp.trainer``) step for step: its own split, initialization and
minibatch order, the same warm-up, the float64 mean cross-entropy over its own training rows (the stack pads the
row lists to the longest and masks the padding), and AdamW/Adam written out in torch's own operation order with a
per-member weight decay. Each member is saved as an ordinary run directory, with its trainer state in the format
``torch.optim`` writes, so ``grokinterp train --resume MEMBER`` continues it with the ordinary trainer.
"""

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch.func import functional_call, vmap

from grokinterp.checkpoints import (
    Run,
    RunStore,
    TrainerState,
    checkpoint_schedule,
    first_step_reaching,
    load_run,
    weight_norm_sq,
    write_text_atomic,
)
from grokinterp.config import ConfigError, RunConfig, TrainConfig
from grokinterp.denormals import flush_denormals
from grokinterp.errors import RunError
from grokinterp.fastpath import answer_logits_from_params
from grokinterp.model import build_model
from grokinterp.resources import check_fits
from grokinterp.tasks import TaskData, build_task
from grokinterp.trainer import (
    EVAL_CHUNK,
    TrainResult,
    _deterministic,
    _Interrupt,
    _progress_bar,
    _stop_reason,
    batch_indices,
    learning_rate,
    make_optimizer,
    resolve_device,
    split_metrics,
    train,
    uses_fast_path,
)

log = logging.getLogger(__name__)

MEMBER_FIELDS = ("model_seed", "data_seed", "frac_train", "weight_decay", "stop_val_acc", "stop_patience")
"""Config fields that may differ between stacked runs; every other field is shared by the whole stack."""
MANIFEST_FILE = "sweep.json"
DATA_EFFICIENCY = "data_efficiency"
CPU_ROWS_PER_PASS = 16_384
"""Rows (models x batch) per forward/backward pass on the CPU. Measured on nanda2023 (3830 training rows), one pass
over 16 models ran ~25% slower per model than passes of 4, whose activations still fit in cache."""
REACHED = 0.99  # accuracy that counts as "learned" in the data-efficiency table (Power et al. use 99%)


# -- the grid ---------------------------------------------------------------------------------------------------
def sweep_configs(base: RunConfig, seeds: Iterable[int], fracs: Iterable[float],
                  weight_decays: Iterable[float]) -> list[RunConfig]:
    """Every (frac, weight decay, seed) combination of ``base``, fraction-major. A seed sets both ``model_seed``
    and ``data_seed``, so seeds vary the split and the initialization together, as independent repeats should."""
    seeds, fracs, weight_decays = list(seeds), list(fracs), list(weight_decays)
    for flag, values in (("--seeds", seeds), ("--fracs", fracs), ("--weight-decays", weight_decays)):
        if not values:
            raise ConfigError(f"{flag} is empty; give at least one value, e.g. {flag} {_EXAMPLES[flag]}")
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            raise ConfigError(f"{flag} lists {repeated:g} twice; each grid value once")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"--seeds takes whole numbers >= 0, got {seed!r}")
    for frac in fracs:
        if not 0 < frac < 1:
            raise ConfigError(f"--fracs: {frac:g} is not a training fraction; each must lie strictly between 0 and 1")
    for wd in weight_decays:
        if not wd >= 0:
            raise ConfigError(f"--weight-decays: {wd:g} is negative; weight decay must be >= 0")
    return [base.replace(frac_train=float(frac), weight_decay=float(wd), model_seed=seed, data_seed=seed)
            for frac in fracs for wd in weight_decays for seed in seeds]


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


def member_name(config: RunConfig) -> str:
    """Run directory name of a sweep member, e.g. 'frac0.30_wd1_seed0'."""
    frac = f"{config.task.frac_train:.2f}"
    if float(frac) != config.task.frac_train:  # 0.333 and 0.334 must not share a folder
        frac = f"{config.task.frac_train:g}"
    m, d = config.model.model_seed, config.task.data_seed
    seed = f"seed{m}" if m == d else f"mseed{m}_dseed{d}"
    return f"frac{frac}_wd{config.train.weight_decay:g}_{seed}"


def stack_mismatch(configs: Sequence[RunConfig]) -> str | None:
    """Why ``configs`` cannot be trained in one stack (one line), or None if they can."""
    if not configs:
        return None
    flat = [{k: v for section in c.to_dict().values() for k, v in section.items()} for c in configs]
    for i, other in enumerate(flat[1:], start=1):
        for key, value in flat[0].items():
            if key not in MEMBER_FIELDS and other[key] != value:
                return (f"cannot train these runs together: --{key.replace('_', '-')} is {value} in the first and "
                        f"{other[key]} in run {i}; stacked runs may differ only in seeds, --frac-train, "
                        "--weight-decay and the stop rule")
    if configs[0].train.optimizer == "sgd":
        return ("--optimizer sgd cannot be stacked: sweeps train adamw or adam; train SGD runs one at a time with "
                "`grokinterp train`")
    return None


def check_stackable(configs: Sequence[RunConfig]) -> None:
    reason = stack_mismatch(configs)
    if reason is not None:
        raise ConfigError(reason)


def write_manifest(folder: Path, base: RunConfig, seeds: list[int], fracs: list[float], weight_decays: list[float],
                   configs: list[RunConfig]) -> Path:
    """``<folder>/sweep.json``: the grid and its members, so a sweep can be read back (or redone) as one thing."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "base": base.to_dict(),
        "seeds": seeds,
        "fracs": fracs,
        "weight_decays": weight_decays,
        "members": [{"name": member_name(c), "frac_train": c.task.frac_train, "weight_decay": c.train.weight_decay,
                     "seed": c.model.model_seed} for c in configs],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = folder / MANIFEST_FILE
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return path


# -- stacked training -------------------------------------------------------------------------------------------
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
    (``group_size=1``: one ordinary run after another).

    The configs may differ only in seeds, training fraction, weight decay and the stop rule (anything else is
    refused before anything is written). Groups are formed after sorting by training fraction, so members of a
    group pad their training sets little. Returns one result per started member, in the order given; after Ctrl-C
    the running group is saved as 'interrupted' and later groups are not started. ``on_step`` is called after each
    update of each group (tests use it to interrupt).
    """
    configs, run_dirs = list(configs), [Path(d) for d in run_dirs]
    if len(configs) != len(run_dirs):
        raise RunError(f"train_many got {len(configs)} configs but {len(run_dirs)} run directories")
    check_stackable(configs)
    if group_size < 1:
        raise ConfigError(f"--group-size must be at least 1, got {group_size}")
    if len(set(run_dirs)) != len(run_dirs):
        raise RunError("two sweep members would share a run directory; give each config its own")
    for run_dir in run_dirs:
        if run_dir.exists():
            raise RunError(f"run directory {run_dir} already exists; pick another --name")
    dev = resolve_device(device)
    check_fits(configs[0], run_dirs[0].parent, dev.type, models=min(group_size, len(configs)))  # one group at once
    if group_size == 1:
        return _one_after_another(configs, run_dirs, dev, progress, on_step)
    order = sorted(range(len(configs)), key=lambda i: configs[i].task.frac_train)
    groups = [order[i : i + group_size] for i in range(0, len(order), group_size)]
    results: dict[int, TrainResult] = {}
    # deterministic CPU kernels and denormals flushed on every CPU thread, as in train()
    with _deterministic(dev), flush_denormals(enabled=dev.type == "cpu"), _Interrupt() as interrupt:
        for g, group in enumerate(groups):
            if interrupt.requested:
                break
            label = "sweep" if len(groups) == 1 else f"sweep {g + 1}/{len(groups)}"
            done = _train_group([configs[i] for i in group], [run_dirs[i] for i in group], dev, interrupt,
                                progress, label, on_step)
            results.update(zip(group, done))
    return [results[i] for i in sorted(results)]


def _one_after_another(configs: list[RunConfig], run_dirs: list[Path], dev: torch.device, progress: bool,
                        on_step) -> list[TrainResult]:
    """``group_size=1``: each member through the ordinary trainer, in turn. On a CPU with nanda2023-sized models
    this is the faster way (the benchmark measured stacks of 4 and 16 at 0.9x of it: one fast-path step already
    keeps the cores near their matmul peak, and stacked models share no arithmetic); stacking pays on small tables
    (x+y mod 23: 1.66x for 16 at once). A member interrupted by Ctrl-C ends the sweep."""
    results = []
    for config, run_dir in zip(configs, run_dirs):
        result = train(config, run_dir, device=str(dev), progress=progress, on_step=on_step)
        results.append(result)
        if result.stop_reason == "interrupted":
            break
    return results


@dataclass
class _Member:
    """One run of the stack: its store, split, progress and a torch optimizer that only lends its state format."""

    config: RunConfig
    store: RunStore
    train_rows: Int[torch.Tensor, " n_train"]
    val_rows: Int[torch.Tensor, " n_val"]
    metrics_file: Any = None
    format_params: list[torch.nn.Parameter] = field(default_factory=list)
    format_optimizer: torch.optim.Optimizer | None = None
    reached_at: int | None = None
    val_reached: bool = False
    stop_reason: str | None = None

    @property
    def threshold(self) -> float:
        """Validation accuracy counted as 'reached' on the progress bar: the stop rule's, else 99%."""
        return self.config.train.stop_val_acc or REACHED


def _answer_logits_fn(model, cfg: TrainConfig) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """(params, tokens [batch, 3]) -> answer logits [batch, d_vocab_out] of one model, pure in ``params`` so that
    ``vmap`` can map it over stacked parameters: the fast path where the config asks for it and it covers the
    model (as ``trainer.forward_for`` decides for one model), else the model's own forward."""
    if uses_fast_path(model, cfg):
        hooked_cfg = model.cfg
        return lambda params, tokens: answer_logits_from_params(params, tokens, hooked_cfg)
    return lambda params, tokens: functional_call(model, params, (tokens,))[:, -1]


def stacked_answer_loss(
    logits: Float[torch.Tensor, "model batch d_vocab_out"],
    labels: Int[torch.Tensor, "model batch"],
    mask: Bool[torch.Tensor, "model batch"],
) -> Float[torch.Tensor, " model"]:
    """Each model's mean float64 cross-entropy over its own (unmasked) rows: ``trainer.answer_loss`` per model.

    Padding rows are zeroed with ``where``, not multiplied by 0, so a model whose logits overflow on a padding row
    does not turn its loss into NaN."""
    ce = F.cross_entropy(logits.to(torch.float64).flatten(0, 1), labels.flatten(), reduction="none")
    ce = torch.where(mask, ce.view(labels.shape), 0.0)
    return ce.sum(1) / mask.sum(1)


class _Stack:
    """The parameters and Adam moments of K models, each tensor with a leading model dimension."""

    def __init__(self, members: list[_Member], n_symbols: int, dev: torch.device):
        models = [build_model(m.config.model, n_symbols, device=dev) for m in members]
        self.template = models[0]
        self.state_keys = list(self.template.state_dict())  # the key set (and order) of an ordinary checkpoint
        self.buffers = dict(self.template.named_buffers())
        named = [dict(model.named_parameters()) for model in models]
        self.params: dict[str, torch.Tensor] = {}
        for name, param in self.template.named_parameters():
            stacked = torch.stack([n[name].detach() for n in named])
            self.params[name] = stacked.requires_grad_(param.requires_grad)
        # frozen biases stay in ``params`` (the forward needs them) but never get a gradient or an update
        self.trainable = [name for name, param in self.template.named_parameters() if param.requires_grad]
        for m in members:  # placeholders: the optimizer only lends its state_dict format (see optimizer_state)
            m.format_params = [torch.nn.Parameter(torch.empty(0)) for _ in self.trainable]
            m.format_optimizer = make_optimizer(m.format_params, m.config.train)
        self.exp_avg = {n: torch.zeros_like(self.params[n]) for n in self.trainable}
        self.exp_avg_sq = {n: torch.zeros_like(self.params[n]) for n in self.trainable}
        self.weight_decay = torch.tensor([m.config.train.weight_decay for m in members], dtype=torch.float64,
                                         device=dev)
        group = members[0].format_optimizer.param_groups[0]
        self.beta1, self.beta2 = group["betas"]
        self.eps = group["eps"]
        self.decoupled = members[0].config.train.optimizer == "adamw"
        self.t = 0
        self.rows_per_pass = CPU_ROWS_PER_PASS if dev.type == "cpu" else None
        fn = _answer_logits_fn(self.template, members[0].config.train)
        self._train_forward = vmap(fn, in_dims=(0, 0))
        self._eval_forward = vmap(fn, in_dims=(0, None))

    def keep(self, index: list[int]) -> None:
        """Drop every model not in ``index`` (finished members leave the stack; the rest go on)."""
        rows = torch.tensor(index, dtype=torch.long, device=self.weight_decay.device)
        self.params = {n: p.detach()[rows].requires_grad_(p.requires_grad) for n, p in self.params.items()}
        self.exp_avg = {n: t[rows] for n, t in self.exp_avg.items()}
        self.exp_avg_sq = {n: t[rows] for n, t in self.exp_avg_sq.items()}
        self.weight_decay = self.weight_decay[rows]

    def forward_backward(self, tokens: Int[torch.Tensor, "model batch pos"], labels: Int[torch.Tensor, "model batch"],
                         mask: Bool[torch.Tensor, "model batch"]) -> Float[torch.Tensor, " model"]:
        """Each model's loss, its gradient left in ``.grad`` (call ``zero_grad`` first). The models share no
        parameters, so the gradient of the summed losses is each model's own. On the CPU the stack goes through in
        passes of a few models, whose activations stay in cache; a pass changes no model's arithmetic."""
        per_pass = len(tokens) if self.rows_per_pass is None else max(1, self.rows_per_pass // tokens.shape[1])
        losses = []
        for lo in range(0, len(tokens), per_pass):
            part = slice(lo, lo + per_pass)
            params = {n: p[part] for n, p in self.params.items()}  # views: the gradient reaches the stacked leaves
            loss = stacked_answer_loss(self._train_forward(params, tokens[part]), labels[part], mask[part])
            loss.sum().backward()
            losses.append(loss.detach())
        return torch.cat(losses)

    def zero_grad(self) -> None:
        for name in self.trainable:
            self.params[name].grad = None

    @torch.no_grad()
    def optimizer_step(self, lr: float) -> None:
        """One Adam(W) update of every model, in the operation order of torch's single-tensor implementation, so
        each member's update matches ``torch.optim.AdamW``/``Adam`` to float32 rounding. Only the weight decay
        differs between members: a [K, 1, ...] tensor where torch has a scalar."""
        self.t += 1
        bias_correction1 = 1 - self.beta1 ** float(self.t)
        bias_correction2_sqrt = (1 - self.beta2 ** float(self.t)) ** 0.5
        step_size = lr / bias_correction1
        for name in self.trainable:
            param, exp_avg, exp_avg_sq = self.params[name], self.exp_avg[name], self.exp_avg_sq[name]
            grad = param.grad
            wd = self.weight_decay.view(-1, *[1] * (param.dim() - 1))
            if self.decoupled:
                param.mul_((1 - lr * wd).to(param.dtype))  # 1 - lr·wd in float64, as torch forms the scalar
            else:
                grad = grad.add(param * wd.to(param.dtype))  # Adam's L2 penalty folded into the gradient
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)

    @torch.no_grad()
    def evaluate(self, index: list[int], data: TaskData, members: list[_Member]) -> list[dict[str, float]]:
        """``trainer.evaluate`` for the models at stack positions ``index`` (those of ``members``): float64 loss and
        accuracy over the whole table, then averaged over each member's own training and validation rows."""
        rows = torch.tensor(index, device=self.weight_decay.device)
        params = {n: p.detach()[rows] for n, p in self.params.items()}
        chunk = max(1, EVAL_CHUNK // len(index))
        losses, correct = [], []
        for start in range(0, len(data.labels), chunk):
            tokens, labels = data.tokens[start : start + chunk], data.labels[start : start + chunk]
            logits = self._eval_forward(params, tokens).to(torch.float64)
            ce = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(index)), reduction="none")
            losses.append(ce.view(len(index), -1))
            correct.append(logits.argmax(-1) == labels)
        loss, acc = torch.cat(losses, 1), torch.cat(correct, 1).double()
        return [split_metrics(loss[j], acc[j], m.train_rows, m.val_rows) for j, m in enumerate(members)]

    def weight_norm_sq(self, k: int) -> float:
        return weight_norm_sq(p[k] for p in self.params.values())

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Model ``k``'s weights with exactly the keys of ``model.state_dict()`` (buffers included)."""
        return {key: self.params[key][k].detach().clone() if key in self.params else self.buffers[key]
                for key in self.state_keys}

    def optimizer_state(self, k: int, member: _Member, lr: float) -> dict[str, Any]:
        """Model ``k``'s optimizer state as ``torch.optim.AdamW(params).state_dict()`` would give it, so the
        ordinary trainer can load it on resume."""
        opt = member.format_optimizer
        opt.state.clear()
        if self.t > 0:
            for holder, name in zip(member.format_params, self.trainable):
                opt.state[holder] = {"step": torch.tensor(float(self.t), dtype=_scalar_dtype()),
                                     "exp_avg": self.exp_avg[name][k].clone(),
                                     "exp_avg_sq": self.exp_avg_sq[name][k].clone()}
            for group in opt.param_groups:
                group["lr"] = lr
        return opt.state_dict()


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim uses for its 'step' counters."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _batch(members: list[_Member], data: TaskData, step: int):
    """Step ``step``'s rows of every model, padded to the longest: tokens, labels and the mask of real rows.

    A model's rows are exactly those the ordinary trainer would use (``batch_indices`` of its own training set and
    ``model_seed``), in the same order; padding repeats row 0 and is masked out of the loss."""
    cfg = members[0].config.train
    picked = []
    for m in members:
        positions = batch_indices(len(m.train_rows), cfg.batch_size, m.config.model.model_seed, step)
        picked.append(m.train_rows if positions is None else m.train_rows[positions.to(m.train_rows.device)])
    width = max(len(rows) for rows in picked)
    index = torch.zeros(len(members), width, dtype=torch.long, device=data.tokens.device)
    mask = torch.zeros(len(members), width, dtype=torch.bool, device=data.tokens.device)
    for k, rows in enumerate(picked):
        index[k, : len(rows)] = rows
        mask[k, : len(rows)] = True
    return data.tokens[index], data.labels[index], mask


def _full_batch(members: list[_Member]) -> bool:
    """Whether every model trains on its whole training set at every step (then the batch is built once)."""
    size = members[0].config.train.batch_size
    return all(size == 0 or size >= len(m.train_rows) for m in members)


def _train_group(configs: list[RunConfig], run_dirs: list[Path], dev: torch.device, interrupt, progress: bool,
                 label: str, on_step) -> list[TrainResult]:
    started = time.perf_counter()
    members: list[_Member] = []
    try:
        for config, run_dir in zip(configs, run_dirs):
            t = config.task
            data = build_task(t.op, t.p, t.n, t.frac_train, t.data_seed)
            member = _Member(config, RunStore.create(run_dir, config, data), data.train_idx.to(dev),
                             data.val_idx.to(dev))
            members.append(member)
            member.store.lock()
            member.metrics_file = member.store.open_metrics_for_append()
        table = data.to(dev)  # every member has the same table; only the splits differ
        stack = _Stack(members, table.n_symbols, dev)
        return _train_stack(members, stack, table, interrupt, progress, label, on_step, started)
    finally:
        for m in members:
            if m.metrics_file is not None:
                m.metrics_file.close()
            m.store.unlock()


def _train_stack(members: list[_Member], stack: _Stack, table: TaskData, interrupt, progress: bool, label: str,
                 on_step, started: float) -> list[TrainResult]:
    """The ordinary trainer's loop (``trainer._train_locked``) for a stack: update, evaluate on schedule, stop
    each member by its own rule, save, and drop finished members from the stack."""
    cfg = members[0].config.train  # everything but the per-member fields is shared
    schedule = set(checkpoint_schedule(cfg.steps, cfg.checkpoints, cfg.log_checkpoints))
    results: dict[int, TrainResult] = {}
    active = list(range(len(members)))  # member numbers, in stack order

    def log_rows(step: int, which: list[int]) -> None:
        """Evaluate the stack positions ``which`` and append a metrics row to each of their logs."""
        if not which:
            return
        evals = stack.evaluate(which, table, [members[active[j]] for j in which])
        for j, ev in zip(which, evals):
            m = members[active[j]]
            row = {"step": step, **ev, "weight_norm_sq": stack.weight_norm_sq(j),
                   "lr": learning_rate(cfg, max(step, 1)), "time_s": round(time.perf_counter() - started, 3)}
            m.metrics_file.write(json.dumps(row) + "\n")
            threshold = m.config.train.stop_val_acc
            if threshold > 0 and m.reached_at is None and row["val_acc"] >= threshold:
                m.reached_at = step
            m.val_reached = m.val_reached or row["val_acc"] >= m.threshold

    def save(step: int, j: int) -> None:
        m = members[active[j]]
        m.store.write_weights(step, stack.state_dict(j), m.config)
        finished = m.stop_reason is not None and m.stop_reason != "interrupted"
        lr = learning_rate(cfg, step) if step > 0 else cfg.lr
        m.store.write_trainer_state(TrainerState(step, stack.optimizer_state(j, m, lr), finished,
                                                 m.stop_reason or ""))

    log_rows(0, list(range(len(active))))
    for j in range(len(active)):
        save(0, j)
    bar = _progress_bar(progress, 0, cfg.steps, label)
    _update_bar(bar, members, active)
    full = _full_batch(members)
    batch = _batch(members, table, 1) if full else None
    step = 0
    while active:
        step += 1
        lr = learning_rate(cfg, step)
        tokens, labels, mask = batch if full else _batch([members[i] for i in active], table, step)
        stack.zero_grad()
        losses = stack.forward_backward(tokens, labels, mask)
        stack.optimizer_step(lr)
        if on_step is not None:
            on_step(step)

        finite = torch.isfinite(losses).tolist()
        evaluated = step % cfg.eval_every == 0 or step in schedule or step == cfg.steps
        if evaluated:
            log_rows(step, list(range(len(active))))
        for j, i in enumerate(active):
            m = members[i]
            m.stop_reason = _stop_reason(m.config.train, step, m.reached_at, interrupt.requested, finite[j])
        if not evaluated:  # the last step of a run is always in its log
            log_rows(step, [j for j, i in enumerate(active) if members[i].stop_reason not in (None, "interrupted")])
        for j, i in enumerate(active):
            if step in schedule or members[i].stop_reason is not None:
                save(step, j)
            if members[i].stop_reason is not None:
                members[i].metrics_file.close()
                members[i].store.unlock()  # done: free to resume or analyse while the others train on
                results[i] = TrainResult(Run(members[i].store.path), step, members[i].stop_reason,
                                         time.perf_counter() - started)
        keep = [j for j, i in enumerate(active) if members[i].stop_reason is None]
        if len(keep) < len(active):
            active = [active[j] for j in keep]
            if active:
                stack.keep(keep)
                batch = _batch([members[i] for i in active], table, 1) if full else None
        _update_bar(bar, members, active)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return [results[i] for i in range(len(members))]


def _update_bar(bar, members: list[_Member], active: list[int]) -> None:
    if bar is not None:
        reached = sum(m.val_reached for m in members)
        bar.set_postfix_str(f"{len(active)}/{len(members)} training, {reached}/{len(members)} reached val acc",
                            refresh=False)


# -- data efficiency (Power et al. 2022, Fig. 1 right) ----------------------------------------------------------
def data_efficiency(runs: Iterable[Run | str | os.PathLike]) -> pd.DataFrame:
    """One row per run: training fraction, weight decay, seed, the first logged steps where train and validation
    accuracy reached 99% (<NA> if never) and the steps trained (the budget a 'not reached' run had)."""
    rows = []
    for run in runs:
        run = run if isinstance(run, Run) else load_run(run)
        log_rows = run.store.read_metrics()
        rows.append({"run": run.name, "frac_train": run.config.task.frac_train,
                     "weight_decay": run.config.train.weight_decay, "seed": run.config.model.model_seed,
                     "train_99_step": first_step_reaching(log_rows, "train_acc", REACHED),
                     "val_99_step": first_step_reaching(log_rows, "val_acc", REACHED),
                     "steps_trained": int(log_rows[-1]["step"]) if log_rows else 0})
    columns = ["run", "frac_train", "weight_decay", "seed", "train_99_step", "val_99_step", "steps_trained"]
    frame = pd.DataFrame(rows, columns=columns)
    for col in ("train_99_step", "val_99_step"):
        frame[col] = pd.array([None if pd.isna(v) else int(v) for v in frame[col]], dtype="Int64")
    return frame.sort_values(["frac_train", "weight_decay", "seed"], kind="stable").reset_index(drop=True)


def write_data_efficiency(runs: Iterable[Run | str | os.PathLike], out_dir: str | os.PathLike,
                          title: str) -> tuple[pd.DataFrame, Path, Path]:
    """Write ``data_efficiency.csv`` and a self-contained ``data_efficiency.html`` into ``out_dir``; returns the
    table and both paths."""
    from grokinterp.plots import data_efficiency_figure

    table = data_efficiency(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, html_path = out / f"{DATA_EFFICIENCY}.csv", out / f"{DATA_EFFICIENCY}.html"
    write_text_atomic(csv_path, table.to_csv(index=False))
    write_text_atomic(html_path, data_efficiency_figure(title, table).to_html(include_plotlyjs=True, full_html=True))
    return table, csv_path, html_path
