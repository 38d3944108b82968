"""What every per-checkpoint metric receives, and the shape of its answer.

A metric is a pure function ``(ckpt: Checkpoint) -> dict[str, float]``: one row of scalars for one step.
It never changes the model's weights (perturbations go through ``torch.func.functional_call`` on copies) and
draws randomness only from a generator seeded by ``ckpt.seed``.
"""

from dataclasses import dataclass
from functools import cached_property

import torch

from grokinterp.config import RunConfig
from grokinterp.tasks import TaskData


@dataclass(frozen=True)
class Checkpoint:
    step: int
    model: torch.nn.Module
    """A HookedTransformer in eval mode holding the weights of ``step``. They must not change while the Checkpoint
    is in use: the logits that metrics share (``train_logits``, ``table_logits``) are computed once."""
    data: TaskData
    """The run's full table with its split (on the model's device)."""
    config: RunConfig
    seed: int = 0
    """Seed for metrics that sample (perturbations, probe vectors)."""

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh generator on the model's device, seeded from (seed, step, offset)."""
        device = next(self.model.parameters()).device
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self.step * 101 + offset)

    @property
    def train_tokens(self) -> torch.Tensor:
        return self.data.tokens[self.data.train_idx]

    @property
    def train_labels(self) -> torch.Tensor:
        return self.data.labels[self.data.train_idx]

    @cached_property
    def train_logits(self) -> torch.Tensor:
        """``metric_answer_logits`` of the training rows (no grad), computed once per Checkpoint and shared by the
        metrics that read them: ``analyze --metric all`` hands one Checkpoint to every metric."""
        with torch.no_grad():
            return metric_answer_logits(self.model, self.train_tokens)

    @cached_property
    def table_logits(self) -> torch.Tensor:
        """``metric_answer_logits`` of every row of the table, in table order (no grad), computed once per
        Checkpoint and shared like ``train_logits``. For the mod-p metrics: S_n tables are too large to hold."""
        with torch.no_grad():
            return metric_answer_logits(self.model, self.data.tokens)

    def training_rows(self, max_rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels) of the training split: all of it, or ``max_rows`` rows chosen by a generator seeded
        with ``seed`` alone, so that every step of a run is measured on the same rows."""
        tokens, labels = self.train_tokens, self.train_labels
        if max_rows is not None and max_rows < len(labels):
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            rows = order[:max_rows].sort().values.to(labels.device)
            tokens, labels = tokens[rows], labels[rows]
        return tokens, labels


def fast_forward_applies(model: torch.nn.Module, tokens: torch.Tensor) -> bool:
    """Whether ``grokinterp.fastpath`` computes this model's answer logits on these rows: a HookedTransformer it
    supports (one layer, ...), on rows [a, b, =]."""
    from transformer_lens import HookedTransformer

    from grokinterp.fastpath import unsupported_reason

    return (isinstance(model, HookedTransformer) and unsupported_reason(model.cfg) is None
            and tokens.dim() == 2 and tokens.shape[1] == 3 and bool((tokens[:, 2] == model.cfg.d_vocab - 1).all()))


def metric_answer_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``grokinterp.model.answer_logits``, by the fast path where it applies (the same function to float rounding,
    the one training used, in a fraction of the time), else by the model's own forward."""
    from grokinterp.model import answer_logits

    if fast_forward_applies(model, tokens):
        from grokinterp.fastpath import fast_answer_logits

        return fast_answer_logits(model, tokens)
    return answer_logits(model, tokens)
