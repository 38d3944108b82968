"""Softmax collapse (Prieto et al. 2025, "Grokking at the edge of numerical stability", REFERENCE.md §6).

Late in training without enough weight decay the logits grow until, in floating point, the correct class's softmax
probability is exactly 1: Σ_j exp(z_j − max z) rounds to 1, the row's loss is exactly 0 and its gradient vanishes,
so learning stalls on those rows. These measures say how far a checkpoint has gone toward that, in float32 (what a
float32 loss would see) and float64 (what grokinterp's float64 loss sees), from the answer logits of the training
rows as the model computes them.
"""

import torch
from jaxtyping import Float, Int

from grokinterp.metrics.base import Checkpoint

DTYPES = {"f32": torch.float32, "f64": torch.float64}


def softmax_collapse_stats(
    logits: Float[torch.Tensor, "batch d_vocab_out"], labels: Int[torch.Tensor, " batch"]
) -> dict[str, float]:
    """For each float dtype (suffix ``_f32``, ``_f64``), computed in that dtype from the given logits:

    - ``softmax_collapse``: the share of rows whose softmax gives the correct class probability exactly 1;
    - ``zero_grad``: the share of the entries of ∂L/∂z = softmax(z) − onehot(label) (all rows, all classes) that
      are exactly 0: the correct class of a collapsed row, and every class whose exp(z_j − max z) underflows;

    and, dtype-free: ``logit_norm`` (mean ‖z‖₂ over rows) and ``logit_margin`` (mean z_label − max_{j≠label} z_j).
    """
    row: dict[str, float] = {}
    for suffix, dtype in DTYPES.items():
        z = logits.to(dtype)
        probs = torch.softmax(z, dim=-1)
        correct = probs.gather(-1, labels[:, None]).squeeze(-1)
        grad = probs - torch.nn.functional.one_hot(labels, z.shape[-1]).to(dtype)
        row[f"softmax_collapse_{suffix}"] = (correct == 1.0).double().mean().item()
        row[f"zero_grad_{suffix}"] = (grad == 0.0).double().mean().item()
    z = logits.to(torch.float64)
    others = z.scatter(-1, labels[:, None], float("-inf"))
    row["logit_norm"] = z.norm(dim=-1).mean().item()
    row["logit_margin"] = (z.gather(-1, labels[:, None]).squeeze(-1) - others.max(dim=-1).values).mean().item()
    return row


@torch.no_grad()
def softmax_collapse_metrics(ckpt: Checkpoint) -> dict[str, float]:
    """``softmax_collapse_stats`` of the checkpoint's answer logits on its training rows."""
    return softmax_collapse_stats(ckpt.train_logits, ckpt.train_labels)
