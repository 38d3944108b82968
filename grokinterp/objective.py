"""The training objective and how it is scored: loss and accuracy of the answer logits.

One small module that training (``grokinterp.trainer``) and the metrics (``grokinterp.metrics``) both import, so a
metric measures exactly the loss a run was trained on. Losses are computed in float64: late in grokking the logits
are large and a float32 softmax rounds the correct class's probability to exactly 1 (Prieto et al. 2025).

Two losses (``TrainConfig.loss``):

* ``ce``: cross-entropy of the softmax.
* ``stablemax``: cross-entropy of StableMax (Prieto et al. 2025), ``p_i = s(x_i) / Σ_j s(x_j)`` with
  ``s(x) = x + 1`` for ``x ≥ 0`` and ``1 / (1 − x)`` for ``x < 0``: it grows linearly rather than exponentially, so
  a confident model's loss does not collapse to zero and its gradient keeps flowing.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from grokinterp.config import LOSSES


def stablemax_log_probs(logits: Float[torch.Tensor, "*batch d_vocab_out"]) -> Float[torch.Tensor, "*batch d_vocab_out"]:
    """log StableMax of the logits. The negative branch is evaluated on ``min(x, 0)`` so that its derivative at
    ``x ≥ 0`` (where ``where`` discards it) is finite: a ``where`` over an infinite branch would still send NaN
    into the gradient."""
    s = torch.where(logits >= 0, logits + 1, 1 / (1 - logits.clamp(max=0)))
    return s.log() - s.sum(-1, keepdim=True).log()


def row_losses(logits: Float[torch.Tensor, "batch d_vocab_out"], labels: Int[torch.Tensor, " batch"],
               loss: str = "ce") -> Float[torch.Tensor, " batch"]:
    """Per-row float64 loss of the correct answer under ``loss`` ('ce' or 'stablemax')."""
    logits = logits.to(torch.float64)
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if loss == "stablemax":
        return -stablemax_log_probs(logits).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")


def answer_loss(logits: Float[torch.Tensor, "batch d_vocab_out"], labels: Int[torch.Tensor, " batch"],
                loss: str = "ce") -> Float[torch.Tensor, ""]:
    """Mean float64 loss over the rows: what one model's training step minimizes."""
    if loss == "ce":
        return F.cross_entropy(logits.to(torch.float64), labels)
    return row_losses(logits, labels, loss).mean()


def member_losses(logits: Float[torch.Tensor, "model batch d_vocab_out"], labels: Int[torch.Tensor, "model batch"],
                  mask: Bool[torch.Tensor, "model batch"] | None, loss: str = "ce") -> Float[torch.Tensor, " model"]:
    """Each model's mean float64 loss over its own rows (``mask``; None when every row is real): ``answer_loss``
    per model of a stack. Padding rows are zeroed with ``where``, not multiplied by 0, so a model whose logits
    overflow on a padding row does not turn its loss into NaN."""
    if mask is None and logits.shape[0] == 1:
        return answer_loss(logits[0], labels[0], loss).unsqueeze(0)
    per_row = row_losses(logits.flatten(0, 1), labels.flatten(), loss).view(labels.shape)
    if mask is None:
        return per_row.mean(1)
    return torch.where(mask, per_row, 0.0).sum(1) / mask.sum(1)


def split_metrics(loss: Float[torch.Tensor, " rows"], acc: Float[torch.Tensor, " rows"],
                  train_idx: Int[torch.Tensor, " n_train"], val_idx: Int[torch.Tensor, " n_val"]) -> dict[str, float]:
    """Per-row loss and correctness over the whole table, averaged over the training and validation rows."""
    return {
        "train_loss": loss[train_idx].mean().item(),
        "train_acc": acc[train_idx].mean().item(),
        "val_loss": loss[val_idx].mean().item(),
        "val_acc": acc[val_idx].mean().item(),
    }
