"""What every per-checkpoint metric receives, and the shape of its answer.

A metric is a pure function ``(ckpt: Checkpoint) -> dict[str, float]``: one row of scalars for one step.
It never changes the model's weights (perturbations go through ``torch.func.functional_call`` on copies) and
draws randomness only from a generator seeded by ``ckpt.seed``.
"""

from dataclasses import dataclass

import torch

from grokinterp.config import RunConfig
from grokinterp.tasks import TaskData


@dataclass(frozen=True)
class Checkpoint:
    step: int
    model: torch.nn.Module
    """A HookedTransformer in eval mode holding the weights of ``step``."""
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
