"""Sharpness of the training loss around a checkpoint's weights, by several measures (REFERENCE.md §5).

What sharpness does across grokking is not settled, so the measures are computed side by side on the same rows:

- random-perturbation sharpness (Jiang et al. 2020): the expected rise of the loss (and fall of the accuracy) when
  every weight gets Gaussian noise, and σ*, the largest noise scale that keeps that rise under a target
  (flatness = 1/σ*²);
- ε-sharpness (Keskar et al. 2017): the worst rise of the loss inside a small box around the weights, found by
  projected gradient ascent;
- the Hessian's dominant eigenvalue (power iteration) and its trace (Hutchinson's estimator).

Conventions shared by every function here:

- θ is the model's *trainable* parameters (``requires_grad=True``). Frozen parameters (the zero biases of Nanda
  et al.'s model) are never perturbed: training cannot move them, so directions along them say nothing about the
  minimum that training found.
- L(θ) = ``loss_fn(model(tokens), labels)``; by default the float64 mean cross-entropy of the answer logits that
  training minimizes. Accuracy is the fraction of rows whose last-position argmax is the label.
- The weights are read, never written: perturbed weights are new tensors handed to ``torch.func.functional_call``,
  so the model is bit-identical afterwards and no ``.grad`` is left on it.
- Randomness comes only from the ``torch.Generator`` passed in; the global RNG is untouched.
- Denormals are flushed to zero while a measure runs, on every CPU thread (``grokinterp.denormals``): at a
  memorized checkpoint the loss's gradient is full of them, and the matmuls of every backward pass (the
  Hessian-vector products' double backward too) slow down on them, as training steps did (5x on an Intel Xeon).
  Only values below 1.2e-38 change, to 0.

Any module whose forward maps ``tokens`` to ``[batch, pos, vocab]`` outputs works, not only a HookedTransformer;
with a custom ``loss_fn`` (e.g. a quadratic of the outputs) the known closed forms can be checked.
"""

import itertools
import logging
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch.func import functional_call, vmap

from grokinterp.denormals import flush_denormals
from grokinterp.metrics.base import Checkpoint
from grokinterp.model import answer_logits
from grokinterp.objective import answer_loss

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(model outputs [batch, pos, vocab], labels [batch]) -> scalar loss."""

# Defaults of ``sharpness_metrics``, chosen so that one checkpoint of Nanda et al.'s model (d_model 128, d_mlp 512,
# 3830 training rows) takes about 3 s on one CPU thread; every one is a keyword parameter.
# Rows: every measure costs time linear in rows; on all 3830 rows one checkpoint took 10-12 s. A subset shifts some
# numbers (a memorized model: σ*s equal, trace 309 vs 304, top eigenvalue 9.2 vs 8.1, φ 259 vs 140 on 1024 vs all
# rows, as a maximum over fewer rows is easier to push up), the same way at every step, so trends stay comparable.
MAX_ROWS = 1024  # rows of the training split the sharpness measures use (None: all)
SIGMA = 1e-2  # the fixed noise std of rand_loss_increase / rand_acc_drop (also where σ*'s bracket search starts)
SIGMA_MAGNITUDE = 1e-1  # where the magnitude-aware σ* search starts: noise of 10% of each weight
N_SAMPLES = 4  # noise draws per σ (the same draws at every σ: common random numbers)
LOSS_TARGET = 0.1  # nats: σ*_loss keeps the mean loss rise below this (the right answer's probability ~ ×0.9)
ACC_TARGET = 0.1  # σ*_acc keeps the accuracy drop below 0.1, as in Jiang et al. (2020)
MAGNITUDE_EPS = 1e-3  # the noise floor ε of magnitude-aware noise, u_i ~ N(0, σ²w_i² + ε²) (Jiang et al.)
BOX_EPS = 1e-3  # ε of Keskar et al.'s box |y_i| <= ε(|x_i| + 1)


class PerturbationEffect(NamedTuple):
    """Mean effect of random weight perturbations on the training rows."""

    loss_increase: float
    """E_u[L(θ + u)] − L(θ), in nats."""
    acc_drop: float
    """acc(θ) − E_u[acc(θ + u)], a fraction of rows."""


def trainable_parameters(model: torch.nn.Module) -> Params:
    """θ: name -> parameter (detached, sharing storage) of every parameter with ``requires_grad=True``."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def answer_objective(
    out: Float[torch.Tensor, "batch pos d_vocab_out"], labels: Int[torch.Tensor, " batch"]
) -> Float[torch.Tensor, ""]:
    """L = −(1/B) Σ_b log softmax(out[b, −1])[labels[b]], in float64: the loss training minimizes."""
    return answer_loss(out[:, -1, :], labels)


def _accuracy(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_b [argmax out[b, −1] = labels[b]], as a float64 scalar."""
    return (out[:, -1, :].argmax(-1) == labels).to(torch.float64).mean()


class _Objective:
    """L(θ) and acc(θ) on fixed rows, with every other parameter and buffer of the model held as it is."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn):
        self.model, self.tokens, self.labels, self.loss_fn = model, tokens, labels, loss_fn
        named = itertools.chain(model.named_parameters(), model.named_buffers())
        self.fixed = {name: t.detach() for name, t in named}
        self.theta = trainable_parameters(model)
        if not self.theta:
            raise ValueError("the model has no trainable parameters (requires_grad=True) to measure sharpness over")

    def outputs(self, theta: Params) -> torch.Tensor:
        return functional_call(self.model, {**self.fixed, **theta}, (self.tokens,))

    def loss(self, theta: Params) -> torch.Tensor:
        return self.loss_fn(self.outputs(theta), self.labels)

    def loss_and_accuracy(self, theta: Params) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.outputs(theta)
        return self.loss_fn(out, self.labels), _accuracy(out, self.labels)

    def many(self, thetas: Params, vmap_chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy at K parameter points (each tensor of ``thetas`` has a leading K axis), no grad.

        vmap works on HookedTransformer (its hook points are identity modules, no hooks are attached). On a CPU a
        plain loop measured faster (d_model 128 model, 1024 rows, K = 8: 0.29 s vmap vs 0.24 s loop; 3830 rows:
        1.72 s vs 1.11 s): batched matmuls gain nothing there while memory grows K-fold. So ``vmap_chunk=None``
        loops on CPU and vmaps all K at once on an accelerator; 0 forces the loop, n > 0 vmaps n at a time.
        """
        k = next(iter(thetas.values())).shape[0]
        if vmap_chunk is None:
            vmap_chunk = 0 if self.tokens.device.type == "cpu" else k
        with torch.no_grad():
            if vmap_chunk == 0:
                pairs = [self.loss_and_accuracy({n: t[i] for n, t in thetas.items()}) for i in range(k)]
                return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            return vmap(self.loss_and_accuracy, chunk_size=vmap_chunk)(thetas)


def _base_draws(theta: Params, n_samples: int, generator: torch.Generator) -> Params:
    """z_k ~ N(0, I), k = 1..n_samples, one [n_samples, *shape] tensor per parameter, in θ's order."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    return {n: torch.randn((n_samples, *w.shape), generator=generator, device=w.device, dtype=w.dtype)
            for n, w in theta.items()}


class _NoiseCurve:
    """σ ↦ PerturbationEffect of u_k = s(σ) ⊙ z_k for fixed draws z_k, cached per σ.

    s(σ) = σ (plain, u ~ N(0, σ²I)) or s(σ)_i = sqrt(σ²w_i² + ε²) (magnitude-aware). The same z_k serve every σ
    (common random numbers), so the curve is a deterministic function of σ and a bisection on it is consistent.
    """

    def __init__(self, objective: _Objective, z: Params, magnitude_aware: bool, eps: float, vmap_chunk: int | None):
        self.objective, self.z, self.magnitude_aware, self.eps, self.vmap_chunk = (
            objective, z, magnitude_aware, eps, vmap_chunk)
        with torch.no_grad():
            loss, acc = objective.loss_and_accuracy(objective.theta)
        self.base_loss, self.base_acc = loss.item(), acc.item()
        self._cache: dict[float, PerturbationEffect] = {}

    def _scale(self, w: torch.Tensor, sigma: float) -> torch.Tensor | float:
        if self.magnitude_aware:
            return torch.sqrt(sigma**2 * w.square() + self.eps**2)
        return sigma

    def __call__(self, sigma: float) -> PerturbationEffect:
        if sigma not in self._cache:
            with torch.no_grad():
                thetas = {n: w + self._scale(w, sigma) * self.z[n] for n, w in self.objective.theta.items()}
                losses, accs = self.objective.many(thetas, self.vmap_chunk)
            self._cache[sigma] = PerturbationEffect(losses.mean().item() - self.base_loss,
                                                    self.base_acc - accs.mean().item())
        return self._cache[sigma]


@flush_denormals()
def random_perturbation_sharpness(
    model: torch.nn.Module,
    tokens: Int[torch.Tensor, "batch pos"],
    labels: Int[torch.Tensor, " batch"],
    sigma: float,
    n_samples: int,
    generator: torch.Generator,
    magnitude_aware: bool = False,
    eps: float = MAGNITUDE_EPS,
    *,
    loss_fn: LossFn = answer_objective,
    vmap_chunk: int | None = None,
) -> PerturbationEffect:
    """Mean loss rise and accuracy drop under Gaussian weight noise (Jiang et al. 2020), by Monte Carlo.

    loss_increase = (1/K) Σ_k L(θ + u_k) − L(θ),  acc_drop = acc(θ) − (1/K) Σ_k acc(θ + u_k),  K = n_samples,
    with u_k ~ N(0, σ²I) or, if ``magnitude_aware``, u_k,i ~ N(0, σ²θ_i² + ε²) (σ is a std, relative to |θ_i|).
    The draws are u_k = s(σ) ⊙ z_k with z_k ~ N(0, I) from ``generator``, so the same seed gives the same z_k as
    ``sigma_star`` uses. Either number can come out negative when the noise happens to help.
    """
    objective = _Objective(model, tokens, labels, loss_fn)
    z = _base_draws(objective.theta, n_samples, generator)
    return _NoiseCurve(objective, z, magnitude_aware, eps, vmap_chunk)(sigma)


def _bisect_sigma(
    effect: Callable[[float], float],
    target: float,
    sigma_init: float,
    growth: float,
    rtol: float,
    max_iter: int,
    sigma_min: float,
    sigma_max: float,
) -> float:
    """Largest σ with effect(σ) < target: a geometric bracket search from ``sigma_init``, then bisection in log σ.

    Keeps effect(lo) < target <= effect(hi) and halves log(hi/lo) until hi/lo <= 1 + rtol or ``max_iter`` halvings;
    returns lo (a σ known to stay below the target). inf if no σ <= sigma_max reaches the target, 0.0 if even
    sigma_min does.
    """
    lo = hi = None
    sigma = sigma_init
    if effect(sigma) < target:
        lo = sigma
        while hi is None:
            sigma *= growth
            if sigma > sigma_max:
                return math.inf
            if effect(sigma) < target:
                lo = sigma
            else:
                hi = sigma
    else:
        hi = sigma
        while lo is None:
            sigma /= growth
            if sigma < sigma_min:
                return 0.0
            if effect(sigma) < target:
                lo = sigma
            else:
                hi = sigma
    for _ in range(max_iter):
        if hi <= lo * (1 + rtol):
            break
        mid = math.sqrt(lo * hi)
        if effect(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo


def _sigma_star_on(curve: _NoiseCurve, target: float, kind: str, **search) -> float:
    if kind not in ("loss", "accuracy"):
        raise ValueError(f"sigma_star kind must be 'loss' or 'accuracy', got {kind!r}")
    if kind == "accuracy":
        if curve.base_acc < target:
            return math.nan  # the accuracy cannot drop by more than it is: σ* is undefined
        return _bisect_sigma(lambda s: curve(s).acc_drop, target, **search)
    return _bisect_sigma(lambda s: curve(s).loss_increase, target, **search)


@flush_denormals()
def sigma_star(
    model: torch.nn.Module,
    tokens: Int[torch.Tensor, "batch pos"],
    labels: Int[torch.Tensor, " batch"],
    target: float,
    kind: Literal["loss", "accuracy"] = "loss",
    magnitude_aware: bool = False,
    *,
    generator: torch.Generator,
    n_samples: int = 8,
    eps: float = MAGNITUDE_EPS,
    sigma_init: float | None = None,
    growth: float = 2.0,
    rtol: float = 1e-2,
    max_iter: int = 14,
    sigma_min: float = 1e-6,
    sigma_max: float = 10.0,
    loss_fn: LossFn = answer_objective,
    vmap_chunk: int | None = None,
) -> float:
    """σ* = the largest σ whose mean effect stays below ``target`` (Jiang et al. 2020; flatness = 1/σ*²).

    The effect is ``random_perturbation_sharpness(σ).loss_increase`` (kind="loss") or ``.acc_drop``
    (kind="accuracy"; Jiang et al. use target 0.1), estimated on the same K = n_samples draws z_k for every σ
    (common random numbers), so it is a deterministic function of σ and the search is reproducible from the seed.

    Search: from ``sigma_init`` (default 1e-2, or 1e-1 for magnitude-aware noise, whose σ is relative), multiply
    or divide by ``growth`` until the target is bracketed, then bisect in log σ (at most ``max_iter`` times) until
    hi/lo <= 1 + rtol; the answer is within a factor 1 + rtol below the crossing. Returns inf when no
    σ <= sigma_max reaches the target, 0.0 when σ = sigma_min already does, and nan for kind="accuracy" when the
    accuracy is below the target (it cannot drop that far).
    """
    objective = _Objective(model, tokens, labels, loss_fn)
    curve = _NoiseCurve(objective, _base_draws(objective.theta, n_samples, generator), magnitude_aware, eps,
                        vmap_chunk)
    if sigma_init is None:
        sigma_init = SIGMA_MAGNITUDE if magnitude_aware else SIGMA
    return _sigma_star_on(curve, target, kind, sigma_init=sigma_init, growth=growth, rtol=rtol, max_iter=max_iter,
                          sigma_min=sigma_min, sigma_max=sigma_max)


@flush_denormals()
def epsilon_sharpness(
    model: torch.nn.Module,
    tokens: Int[torch.Tensor, "batch pos"],
    labels: Int[torch.Tensor, " batch"],
    eps: float = BOX_EPS,
    steps: int = 10,
    lr: float = 2.0,
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn = answer_objective,
) -> float:
    """Keskar et al. (2017) ε-sharpness: φ = 100 · (max_{y ∈ C} L(θ + y) − L(θ)) / (1 + L(θ)),
    C = {y : |y_i| <= b_i}, b_i = ε(|θ_i| + 1).

    The maximum is sought by projected signed gradient ascent: y ← clip(y + lr · b ⊙ sign ∇L(θ + y), −b, b),
    ``steps`` times, from y = 0 (or, given a ``generator``, from a uniform random point of C). The result is the
    largest L seen, at y = 0 included (a feasible point), so φ >= 0 and φ is a lower bound of the true maximum.
    Costs ``steps`` gradients and two forwards.

    ``lr`` is in units of the half-width b. The default 2 lets a step cross the box, so each step jumps to the
    corner b ⊙ sign ∇L(θ + y) (the maximizer of the loss's linearization there; from y = 0 the first step is
    exactly that corner). On a memorized d_model-128 model (1024 rows) this reached 99.7% of the best value found
    (403) in 5 steps, where lr = 1 reached 93% and lr = 0.5 45%.
    """
    objective = _Objective(model, tokens, labels, loss_fn)
    theta = objective.theta
    with torch.no_grad():
        base = objective.loss(theta).item()
    box = {n: eps * (w.abs() + 1) for n, w in theta.items()}
    if generator is None:
        y = {n: torch.zeros_like(w) for n, w in theta.items()}
    else:
        y = {n: (2 * torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype) - 1) * box[n]
             for n, w in theta.items()}
    best = base
    for _ in range(steps):
        y = {n: t.detach().requires_grad_() for n, t in y.items()}
        with torch.enable_grad():  # also when called under no_grad
            loss = objective.loss({n: theta[n] + y[n] for n in theta})
            grads = torch.autograd.grad(loss, list(y.values()))
        best = max(best, loss.item())
        with torch.no_grad():
            y = {n: torch.clamp(y[n] + lr * box[n] * g.sign(), -box[n], box[n]) for n, g in zip(y, grads)}
    with torch.no_grad():
        best = max(best, objective.loss({n: theta[n] + y[n] for n in theta}).item())
    return 100.0 * (best - base) / (1.0 + base)


class _HessianVectorProduct:
    """v ↦ H v with H = ∇²L(θ), by double backward through one retained gradient graph (built once, reused)."""

    def __init__(self, objective: _Objective):
        self.leaves = [w.detach().requires_grad_() for w in objective.theta.values()]
        with torch.enable_grad():  # also when called under no_grad
            loss = objective.loss(dict(zip(objective.theta, self.leaves)))
            grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        # A gradient that does not depend on θ (a parameter L is linear in, or one it ignores) has zero curvature.
        self.grads = [g for g in grads if g is not None and g.requires_grad]
        self.keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def __call__(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.grads:
            return [torch.zeros_like(w) for w in self.leaves]
        with torch.enable_grad():
            hv = torch.autograd.grad(self.grads, self.leaves, [v[i] for i in self.keep], retain_graph=True,
                                     allow_unused=True)
        return [torch.zeros_like(w) if h is None else h.detach() for w, h in zip(self.leaves, hv)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b)).item()


def _power_iteration(hvp: _HessianVectorProduct, iters: int, generator: torch.Generator, tol: float) -> float:
    v = [torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype) for w in hvp.leaves]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eigenvalue = 0.0
    for i in range(iters):
        hv = hvp(v)
        rayleigh = _dot(v, hv)  # vᵀHv with ‖v‖ = 1
        norm = math.sqrt(_dot(hv, hv))
        converged = i > 0 and abs(rayleigh - eigenvalue) <= tol * abs(rayleigh)
        eigenvalue = rayleigh
        if norm == 0.0 or converged:
            break
        v = [x / norm for x in hv]
    return eigenvalue


def _hutchinson(hvp: _HessianVectorProduct, n_samples: int, generator: torch.Generator) -> float:
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    total = 0.0
    for _ in range(n_samples):
        z = [torch.randint(0, 2, w.shape, generator=generator, device=w.device).to(w.dtype) * 2 - 1
             for w in hvp.leaves]
        total += _dot(z, hvp(z))
    return total / n_samples


@flush_denormals()
def hessian_top_eigenvalue(
    model: torch.nn.Module,
    tokens: Int[torch.Tensor, "batch pos"],
    labels: Int[torch.Tensor, " batch"],
    iters: int = 50,
    *,
    generator: torch.Generator,
    tol: float = 1e-4,
    loss_fn: LossFn = answer_objective,
) -> float:
    """The dominant eigenvalue λ (largest |λ|, with its sign) of H = ∇²_θ L, by power iteration.

    v_0 ~ N(0, I) from ``generator``; v_{t+1} = H v_t / ‖H v_t‖; λ_t = v_tᵀ H v_t (the Rayleigh quotient). Stops
    after ``iters`` products or when |λ_t − λ_{t−1}| <= tol · |λ_t|. Near a minimum H is close to positive
    semi-definite and λ is the top (sharpest) eigenvalue; at a saddle it may be a large negative one. Each product
    is a double backward through one retained gradient graph.
    """
    objective = _Objective(model, tokens, labels, loss_fn)
    return _power_iteration(_HessianVectorProduct(objective), iters, generator, tol)


@flush_denormals()
def hessian_trace(
    model: torch.nn.Module,
    tokens: Int[torch.Tensor, "batch pos"],
    labels: Int[torch.Tensor, " batch"],
    n_samples: int = 16,
    *,
    generator: torch.Generator,
    loss_fn: LossFn = answer_objective,
) -> float:
    """tr H ≈ (1/K) Σ_k z_kᵀ H z_k with Rademacher z_k (entries ±1), K = n_samples (Hutchinson).

    Unbiased, with variance 2 Σ_{i≠j} H_ij² per sample (exact for a diagonal H).
    """
    objective = _Objective(model, tokens, labels, loss_fn)
    return _hutchinson(_HessianVectorProduct(objective), n_samples, generator)


@flush_denormals()
def sharpness_metrics(
    ckpt: Checkpoint,
    *,
    max_rows: int | None = MAX_ROWS,
    sigma: float = SIGMA,
    n_samples: int = N_SAMPLES,
    loss_target: float = LOSS_TARGET,
    acc_target: float = ACC_TARGET,
    magnitude_eps: float = MAGNITUDE_EPS,
    sigma_rtol: float = 0.05,
    eps: float = BOX_EPS,
    eps_steps: int = 5,
    eps_lr: float = 2.0,
    hessian_iters: int = 10,
    hessian_tol: float = 1e-2,
    hutchinson_samples: int = 4,
    vmap_chunk: int | None = None,
) -> dict[str, float]:
    """Every sharpness measure of one checkpoint, on its training split.

    ``train_loss`` and ``train_acc`` use the whole training split. The sharpness columns use ``n_rows`` of its rows:
    all of them, or ``max_rows`` chosen by a generator seeded with ``ckpt.seed`` alone, so every step of a run is
    measured on the same rows. Columns (the functions above give the maths):

    - ``rand_loss_increase``, ``rand_acc_drop``: Gaussian noise N(0, σ²I) at the fixed σ = ``sigma``;
    - ``sigma_star_loss``, ``sigma_star_acc``: σ* for a mean loss rise of ``loss_target`` nats and an accuracy drop
      of ``acc_target``, on the same ``n_samples`` draws as the two above, found to within ×(1 + sigma_rtol);
    - ``sigma_star_loss_magnitude``: σ* of the loss for magnitude-aware noise N(0, σ²θ_i² + ε²), same draws;
    - ``eps_sharpness``: Keskar et al.'s φ (percent) for the box ε(|θ_i| + 1), ``eps_steps`` ascent steps from 0;
    - ``hessian_top_eig``: power iteration, at most ``hessian_iters`` products, relative tolerance ``hessian_tol``;
    - ``hessian_trace``: Hutchinson with ``hutchinson_samples`` Rademacher vectors.

    Randomness: ``ckpt.generator(1)`` draws the noise, ``(2)`` the power iteration's start, ``(3)`` the
    Hutchinson vectors.
    """
    model = ckpt.model
    tokens, labels = ckpt.train_tokens, ckpt.train_labels
    with torch.no_grad():
        logits = answer_logits(model, tokens)
        row: dict[str, float] = {"train_loss": answer_loss(logits, labels).item(),
                                 "train_acc": (logits.argmax(-1) == labels).double().mean().item()}
    if max_rows is not None and max_rows < len(labels):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(ckpt.seed))
        rows = order[:max_rows].sort().values.to(labels.device)
        tokens, labels = tokens[rows], labels[rows]
    row["n_rows"] = float(len(labels))

    objective = _Objective(model, tokens, labels, answer_objective)
    z = _base_draws(objective.theta, n_samples, ckpt.generator(1))
    plain = _NoiseCurve(objective, z, False, magnitude_eps, vmap_chunk)
    magnitude = _NoiseCurve(objective, z, True, magnitude_eps, vmap_chunk)
    search = dict(growth=2.0, rtol=sigma_rtol, max_iter=14, sigma_min=1e-6, sigma_max=10.0)
    at_sigma = plain(sigma)
    row["rand_loss_increase"], row["rand_acc_drop"] = at_sigma.loss_increase, at_sigma.acc_drop
    # both plain searches start at σ, so they share its evaluation and their first brackets (the curve caches)
    row["sigma_star_loss"] = _sigma_star_on(plain, loss_target, "loss", sigma_init=sigma, **search)
    row["sigma_star_acc"] = _sigma_star_on(plain, acc_target, "accuracy", sigma_init=sigma, **search)
    row["sigma_star_loss_magnitude"] = _sigma_star_on(magnitude, loss_target, "loss", sigma_init=SIGMA_MAGNITUDE,
                                                      **search)

    row["eps_sharpness"] = epsilon_sharpness(model, tokens, labels, eps, eps_steps, eps_lr)
    hvp = _HessianVectorProduct(objective)
    row["hessian_top_eig"] = _power_iteration(hvp, hessian_iters, ckpt.generator(2), hessian_tol)
    row["hessian_trace"] = _hutchinson(hvp, hutchinson_samples, ckpt.generator(3))
    log.debug("step %d: sharpness %s (noise evaluations: plain %d, magnitude %d)", ckpt.step, row,
              len(plain._cache), len(magnitude._cache))
    return row
