"""The local learning coefficient (LLC) of a checkpoint, by SGLD around its weights (Lau et al. 2023; the estimator
devinterp implements; REFERENCE.md §6).

The tempered posterior localized at the checkpoint's weights w* is p(w) ∝ exp(−nβ L_n(w) − (γ/2)‖w − w*‖²), and

    λ̂(w*) = nβ · (E_w[L_n(w)] − L_n(w*)),

the expectation estimated along SGLD chains started at w*:

    w ← w − (ε/2)(nβ ∇L_B(w) + γ(w − w*)) + N(0, ε I),

with L_B the mean loss on a minibatch B of the rows (the whole set when ``batch_size`` covers it), and E_w[L_n]
estimated by the mean of the minibatch losses L_B(w_t) after ``n_burnin`` steps. A full-rank quadratic loss in d
parameters has λ = d/2; a loss that depends on only r of them, r/2 (the LLC counts the directions that matter).

Each chain gives its own estimate; the value is their mean and its standard error their standard deviation /
√chains. The estimates depend on ε, nβ and γ: calibrate them (``calibrate_llc``) so that the loss traces are
stationary (flat after the burn-in, not drifting, not diverging) before reading λ̂ across checkpoints, and keep them
fixed across a run's checkpoints so the numbers compare.

Conventions as in ``grokinterp.metrics.sharpness``: θ is the trainable parameters, the model's weights are never
written, randomness comes only from the generator passed in, and denormals are flushed while chains run.
"""

import math
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch.func import grad_and_value, vmap

from grokinterp.denormals import flush_denormals
from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.sharpness import LossFn, _Objective, answer_objective

# Defaults of ``llc_metrics``, calibrated with ``calibrate_llc`` on the 40,000-step nanda2023 run (d_model 128, all
# 3,830 training rows, nβ = n / log n = 464) at step 1,200 (memorized) and 40,000 (grokked): ε = 1e-4 kept the
# traces within 7-13% drift over the kept draws at both; 2e-4 diverged at step 40,000; 200 draws still climbed
# (drift 0.29). Other models and tasks: calibrate again.
STEP_SIZE = 1e-4  # ε, the SGLD step (and noise variance per step)
GAMMA = 100.0  # γ, the localization strength
N_CHAINS = 4  # chains run side by side; with a relative error target, batches of this many more until it is met
MAX_CHAINS = 16
REL_ERROR = 0.05
N_DRAWS = 500  # SGLD steps per chain, burn-in included
N_BURNIN = 100  # steps discarded from the start of each chain
BATCH_SIZE = 256  # rows per SGLD step, drawn with replacement per chain


def default_nbeta(n_rows: int) -> float:
    """nβ = n / log n: the inverse temperature β* = 1 / log n of Watanabe's WBIC, for n training rows."""
    return n_rows / math.log(n_rows) if n_rows > 1 else 1.0


def check_llc_params(params: dict, config: object = None) -> str | None:
    """What ``estimate_llc`` would refuse, as one line: the ``llc`` metric's ``Metric.check`` (it needs nothing
    from the run's ``config``)."""
    if params["n_burnin"] >= params["n_draws"]:
        return (f"n_burnin ({params['n_burnin']}) must be below n_draws ({params['n_draws']}), or no draw is kept; "
                f"lower n_burnin or raise n_draws")
    if params.get("max_chains") is not None and params["max_chains"] < params.get("n_chains", 1):
        return (f"max_chains ({params['max_chains']}) must be at least n_chains ({params['n_chains']}); raise "
                f"max_chains or lower n_chains")
    return None


class LLCEstimate(NamedTuple):
    value: float
    """Mean of the chains' estimates (nan if any chain diverged)."""
    se: float
    """Standard error of ``value``: sd of the chains' estimates / √chains (nan for one chain)."""
    per_chain: list[float]
    init_loss: float
    """L_n(w*) on the rows."""
    traces: Float[torch.Tensor, "chains draws"]
    """The minibatch loss L_B(w_t) of every chain at every step (burn-in included), float64."""
    drift: float
    """nβ · (mean of the second half of the kept draws − mean of the first half), pooled over chains, as a fraction
    of λ̂: near 0 for stationary chains; large when the chains are still climbing (too small ε or too few draws)."""
    diverged: bool
    """Some chain's loss became non-finite (ε too large for this nβ)."""


@flush_denormals()
def estimate_llc(
    model: torch.nn.Module,
    tokens: Int[torch.Tensor, "batch pos"],
    labels: Int[torch.Tensor, " batch"],
    *,
    generator: torch.Generator,
    step_size: float = STEP_SIZE,
    nbeta: float | None = None,
    gamma: float = GAMMA,
    n_chains: int = N_CHAINS,
    n_draws: int = N_DRAWS,
    n_burnin: int = N_BURNIN,
    batch_size: int = BATCH_SIZE,
    loss_fn: LossFn = answer_objective,
    rel_error: float = 0.0,
    max_chains: int | None = None,
) -> LLCEstimate:
    """λ̂ at the model's weights on the given rows by ``n_chains`` SGLD chains of ``n_draws`` steps (module
    docstring for the maths). ``nbeta`` defaults to ``default_nbeta(len(labels))``. The chains run side by side as
    one batched computation (``torch.func.vmap`` over the chain axis), each on its own minibatches and noise.

    With ``rel_error`` > 0, batches of ``n_chains`` more chains run (from the same generator: the first chains are
    those of a run without the target) until the standard error is at most ``rel_error`` of |λ̂|, a chain
    diverges, or ``max_chains`` (default ``n_chains``) have run."""
    max_chains = n_chains if max_chains is None else max_chains
    problem = check_llc_params({"n_burnin": n_burnin, "n_draws": n_draws, "n_chains": n_chains,
                                "max_chains": max_chains})
    if problem:
        raise ValueError(problem)
    objective = _Objective(model, tokens, labels, loss_fn)
    n_rows = len(labels)
    nbeta = default_nbeta(n_rows) if nbeta is None else nbeta
    with torch.no_grad():
        init_loss = objective.loss(objective.theta).item()

    def batch_loss(theta, rows_tokens, rows_labels):  # pure=True: the fast path's form that vmaps, where it applies
        return loss_fn(objective.outputs(theta, pure=True, tokens=rows_tokens), rows_labels)

    grad_fn = vmap(grad_and_value(batch_loss))
    star = objective.theta
    device = labels.device
    full = batch_size >= n_rows

    def chains(count: int) -> torch.Tensor:
        """The minibatch-loss traces [count, n_draws] of ``count`` new chains started at w*."""
        w = {name: t.unsqueeze(0).repeat(count, *([1] * t.dim())) for name, t in star.items()}
        traces = torch.empty(count, n_draws, dtype=torch.float64)
        for t in range(n_draws):
            if full:
                rows = torch.arange(n_rows, device=device).expand(count, n_rows)
            else:
                rows = torch.randint(n_rows, (count, batch_size), generator=generator,
                                     device=generator.device).to(device)
            grads, losses = grad_fn(w, tokens[rows], labels[rows])
            traces[:, t] = losses.detach().double().cpu()
            with torch.no_grad():
                w = {name: x - (step_size / 2) * (nbeta * grads[name] + gamma * (x - star[name]))
                     + math.sqrt(step_size) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                     for name, x in w.items()}
        return traces

    est = _summary(chains(n_chains), init_loss, nbeta, n_burnin)
    while rel_error > 0 and len(est.per_chain) < max_chains and not est.diverged and est.se > rel_error * abs(est.value):
        more = chains(min(n_chains, max_chains - len(est.per_chain)))
        est = _summary(torch.cat([est.traces, more]), init_loss, nbeta, n_burnin)
    return est


def _summary(traces: torch.Tensor, init_loss: float, nbeta: float, n_burnin: int) -> LLCEstimate:
    """λ̂ and the rest of ``LLCEstimate`` from the chains' traces [chains, draws]."""
    kept = traces[:, n_burnin:]
    per_chain = (nbeta * (kept.mean(dim=1) - init_loss)).tolist()
    diverged = not bool(torch.isfinite(traces).all())
    values = torch.tensor(per_chain, dtype=torch.float64)
    value = values.mean().item() if not diverged else math.nan
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 and not diverged else math.nan
    half = kept.shape[1] // 2
    drift = (nbeta * (kept[:, half:].mean() - kept[:, :half].mean())).item() / abs(value) if value else math.nan
    return LLCEstimate(value, se, per_chain, init_loss, traces, drift, diverged)


def llc_metrics(
    ckpt: Checkpoint,
    *,
    max_rows: int | None = None,
    step_size: float = STEP_SIZE,
    nbeta: float | None = None,
    gamma: float = GAMMA,
    n_chains: int = N_CHAINS,
    n_draws: int = N_DRAWS,
    n_burnin: int = N_BURNIN,
    batch_size: int = BATCH_SIZE,
    rel_error: float = REL_ERROR,
    max_chains: int = MAX_CHAINS,
) -> dict[str, float]:
    """λ̂ of the checkpoint on its training rows (all, or ``max_rows`` of them): ``llc``, ``llc_se``, each chain's
    ``llc_chain{c}``, ``llc_chains`` (``n_chains``, and batches of as many more until ``llc_se`` is at most
    ``rel_error`` of λ̂, or ``max_chains``), ``llc_init_loss`` (L_n(w*)), ``llc_drift`` (see ``LLCEstimate``),
    ``llc_diverged`` (0 or 1) and the ``llc_nbeta`` used. Randomness: ``ckpt.generator(4)``."""
    tokens, labels = ckpt.training_rows(max_rows)
    nbeta = default_nbeta(len(labels)) if nbeta is None else nbeta
    est = estimate_llc(ckpt.model, tokens, labels, generator=ckpt.generator(4), step_size=step_size, nbeta=nbeta,
                       gamma=gamma, n_chains=n_chains, n_draws=n_draws, n_burnin=n_burnin, batch_size=batch_size,
                       rel_error=rel_error, max_chains=max_chains)
    row = {"llc": est.value, "llc_se": est.se, "llc_chains": float(len(est.per_chain))}
    row.update({f"llc_chain{c}": v for c, v in enumerate(est.per_chain)})
    row.update({"llc_init_loss": est.init_loss, "llc_drift": est.drift, "llc_diverged": float(est.diverged),
                "llc_nbeta": float(nbeta)})
    return row
