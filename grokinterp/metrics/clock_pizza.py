"""Which modular-addition algorithm a model runs: Clock or Pizza (Zhong et al. 2023, "The Clock and the Pizza";
definitions as in the authors' evaluation notebook, fjzzq2002/pizza ``code/eval-main.ipynb``).

- Gradient symmetricity: for triples (a, b, c) drawn at random (c any output, not only the answer), the cosine
  similarity between ∂Q_c/∂E_a and ∂Q_c/∂E_b, the gradients of the output logit Q_c with respect to the token
  embedding vectors of a and b at their positions (before positional embeddings); averaged over triples. Pizza
  feeds the average of the two embeddings forward, so the two gradients agree (≈ 1); Clock multiplies them.
- Distance irrelevance: with L[s, d] the correct logit of the pair with a + b ≡ s and a − b ≡ d (mod p), the mean
  over d of the standard deviation over s, divided by the standard deviation of all of L (population stds). Pizza's
  correct logit depends on the distance a − b (≈ 0); Clock's does not (≈ 1).

In the authors' released sweep (one layer, p = 59), runs with near-constant attention (Pizza) have median gradient
symmetricity 0.99 and distance irrelevance 0.30; runs with full attention (Clock) 0.47 and 0.83.
"""

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float

from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.fourier import all_pair_rows
from grokinterp.model import answer_logits

N_TRIPLES = 256  # random (a, b, c) triples for gradient symmetricity (the notebook uses 100)


def distance_irrelevance(correct: Float[torch.Tensor, "p p"]) -> float:
    """q = mean_d std_s L[s, d] / std L for correct[a, b] = the correct logit at (a, b), p odd (so that (a + b,
    a − b) runs over every (s, d) once). 1 when the logit ignores the distance a − b, 0 when it depends on it
    alone."""
    p = correct.shape[0]
    if p % 2 == 0:
        raise ValueError(f"distance irrelevance needs an odd p (a+b and a−b determine a, b only then); got p = {p}")
    a = torch.arange(p)[:, None].expand(p, p)
    b = torch.arange(p)[None, :].expand(p, p)
    table = torch.empty(p, p, dtype=torch.float64)
    table[(a + b) % p, (a - b) % p] = correct.to(torch.float64)
    return float(table.std(dim=0, correction=0).mean() / table.std(correction=0).clamp_min(1e-300))


def gradient_symmetricity(
    model: torch.nn.Module, tokens: torch.Tensor, outputs: torch.Tensor
) -> tuple[float, float]:
    """(mean, standard error) over rows of cos(∂Q_c/∂E_a, ∂Q_c/∂E_b): ``tokens`` [n, 3] rows [a, b, =], ``outputs``
    [n] the logit index c of each row. The gradients are taken at the output of ``hook_embed`` (token embeddings,
    before positional ones) at positions 0 and 1; each row's logit depends on its own row only, so one backward of
    their sum gives every row's gradients."""
    leaves: list[torch.Tensor] = []

    def capture(act, hook):
        leaf = act.detach().requires_grad_()
        leaves.append(leaf)
        return leaf

    with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", capture)]):
        logits = answer_logits(model, tokens)
        chosen = logits.gather(-1, outputs[:, None]).sum()
        (grad,) = torch.autograd.grad(chosen, leaves)
    cos = F.cosine_similarity(grad[:, 0].double(), grad[:, 1].double(), dim=-1)
    n = len(cos)
    return cos.mean().item(), (cos.std().item() / math.sqrt(n) if n > 1 else math.nan)


def clock_pizza_metrics(ckpt: Checkpoint, n_triples: int = N_TRIPLES) -> dict[str, float]:
    """``gradient_symmetricity`` (± ``gradient_symmetricity_se``) over ``n_triples`` triples drawn by
    ``ckpt.generator(5)``, and ``distance_irrelevance`` over all p² pairs, for a model of (a + b) mod p."""
    p = ckpt.config.task.p
    model = ckpt.model
    device = ckpt.data.tokens.device
    g = ckpt.generator(5)
    abc = torch.randint(p, (n_triples, 3), generator=g, device=g.device).to(device)
    equals = ckpt.data.tokens[0, 2].item()
    tokens = torch.cat([abc[:, :2], torch.full((n_triples, 1), equals, device=device)], dim=1)
    symmetricity, se = gradient_symmetricity(model, tokens, abc[:, 2])
    rows = all_pair_rows(ckpt)
    logits = ckpt.table_logits[rows]
    correct = logits.gather(-1, ckpt.data.labels[rows][:, None]).squeeze(-1).reshape(p, p).cpu()
    return {"gradient_symmetricity": symmetricity, "gradient_symmetricity_se": se,
            "distance_irrelevance": distance_irrelevance(correct)}
