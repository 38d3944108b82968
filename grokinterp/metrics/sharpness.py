"""Sharpness of the training loss around a checkpoint's weights, by several measures (REFERENCE.md §5).

What sharpness does across grokking is not settled, so the measures are computed side by side on the same rows:

- random-perturbation sharpness (Jiang et al. 2020): the expected rise of the loss (and fall of the accuracy) when
  every weight gets Gaussian noise, and σ*, the largest noise scale that keeps that rise under a target
  (flatness = 1/σ*²);
- ε-sharpness (Keskar et al. 2017): the worst rise of the loss inside a small box around the weights, found by
  projected gradient ascent;
- the Hessian's top eigenvalue (Lanczos, with a residual bound) and its trace (Hutchinson's estimator, deflated by
  the Lanczos vectors).

Every sampled number comes with its standard error, and ``sharpness_metrics`` draws samples until each reaches a
relative error target (5% by default) or a budget, so the sample counts follow the checkpoint, not a fixed guess.

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
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch.func import functional_call, vmap

from grokinterp.denormals import flush_denormals
from grokinterp.metrics.base import Checkpoint, fast_forward_applies
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
REL_ERROR = 0.05  # every sampled estimate is drawn until its standard error (or bound) is at most 5% of it ...
N_SAMPLES = 4  # noise draws per σ to start with (the same draws at every σ: common random numbers) ...
MAX_NOISE_SAMPLES = 32  # ... or until a budget runs out: noise draws,
LANCZOS_ITERS = 30  # Hessian-vector products for λ_max (its Lanczos vectors also deflate the trace),
MAX_HUTCHINSON_SAMPLES = 64  # and Rademacher vectors for the trace
LOSS_TARGET = 0.1  # nats: σ*_loss keeps the mean loss rise below this (the right answer's probability ~ ×0.9)
ACC_TARGET = 0.1  # σ*_acc keeps the accuracy drop below 0.1, as in Jiang et al. (2020)
MAGNITUDE_EPS = 1e-3  # the noise floor ε of magnitude-aware noise, u_i ~ N(0, σ²w_i² + ε²) (Jiang et al.)
BOX_EPS = 1e-3  # ε of Keskar et al.'s box |y_i| <= ε(|x_i| + 1)


class PerturbationEffect(NamedTuple):
    """Mean effect of random weight perturbations on the training rows, with the standard errors of the means."""

    loss_increase: float
    """E_u[L(θ + u)] − L(θ), in nats."""
    acc_drop: float
    """acc(θ) − E_u[acc(θ + u)], a fraction of rows."""
    loss_increase_se: float = math.nan
    """Standard error of ``loss_increase`` over the draws: sd_k / √K (nan for one draw)."""
    acc_drop_se: float = math.nan


class Estimate(NamedTuple):
    """A stochastic or iterative estimate with its error."""

    value: float
    error: float
    """A standard error (sampled estimates) or a bound on the distance to the true value (Lanczos); nan when
    there is no way to tell (one sample, an infinite value)."""
    n: int
    """Samples drawn or iterations run."""

    @property
    def relative_error(self) -> float:
        return abs(self.error / self.value) if self.value != 0 and math.isfinite(self.value) else math.nan


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
    """L(θ) and acc(θ) on fixed rows, with every other parameter and buffer of the model held as it is.

    Where ``fast_forward_applies``, the outputs come from the fast path's answer logits (as [batch, 1, vocab]: the
    answer position only, all that L and acc read): the folded form, or with ``pure=True`` (under ``vmap`` and for
    second derivatives, which the folded form's hand-written backward does not give) the unfolded pure function.
    Both equal the model's own forward to float rounding; on Nanda et al.'s model they take a fraction of its time.
    """

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn):
        self.model, self.tokens, self.labels, self.loss_fn = model, tokens, labels, loss_fn
        named = itertools.chain(model.named_parameters(), model.named_buffers())
        self.fixed = {name: t.detach() for name, t in named}
        self.theta = trainable_parameters(model)
        if not self.theta:
            raise ValueError("the model has no trainable parameters (requires_grad=True) to measure sharpness over")
        self.fast = fast_forward_applies(model, tokens)

    def outputs(self, theta: Params, pure: bool = False, tokens: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.tokens if tokens is None else tokens
        if self.fast:
            from grokinterp.fastpath import answer_logits_from_params, fast_logits_from_params

            forward = answer_logits_from_params if pure else fast_logits_from_params
            return forward({**self.fixed, **theta}, tokens, self.model.cfg).unsqueeze(1)
        return functional_call(self.model, {**self.fixed, **theta}, (tokens,))

    def loss(self, theta: Params, pure: bool = False) -> torch.Tensor:
        return self.loss_fn(self.outputs(theta, pure), self.labels)

    def loss_and_accuracy(self, theta: Params, pure: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.outputs(theta, pure)
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
            return vmap(lambda theta: self.loss_and_accuracy(theta, pure=True), chunk_size=vmap_chunk)(thetas)


class _Draws:
    """z_k ~ N(0, I), k = 0, 1, ..., drawn one at a time from ``generator`` as they are first needed, so the first
    K draws are the same whatever K a caller ends up using (more draws extend a sample, never reshuffle it)."""

    def __init__(self, theta: Params, generator: torch.Generator):
        self.theta, self.generator, self.z = theta, generator, []

    def first(self, n: int) -> list[Params]:
        if n < 1:
            raise ValueError(f"n_samples must be at least 1, got {n}")
        while len(self.z) < n:
            self.z.append({name: torch.randn(w.shape, generator=self.generator, device=w.device, dtype=w.dtype)
                           for name, w in self.theta.items()})
        return self.z[:n]


def _mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    n = len(values)
    mean = values.mean().item()
    return mean, (values.std().item() / math.sqrt(n) if n > 1 else math.nan)


class _NoiseCurve:
    """σ ↦ PerturbationEffect of u_k = s(σ) ⊙ z_k over the first ``n`` draws z_k, with the per-draw effects cached
    per σ and per draw.

    s(σ) = σ (plain, u ~ N(0, σ²I)) or s(σ)_i = sqrt(σ²w_i² + ε²) (magnitude-aware). The same z_k serve every σ
    (common random numbers), so the curve is a deterministic function of σ and a search on it is consistent.
    Raising ``n`` adds draws: only the new draws are evaluated at a σ seen before.
    """

    def __init__(self, objective: _Objective, draws: _Draws, n: int, magnitude_aware: bool, eps: float,
                 vmap_chunk: int | None):
        self.objective, self.draws, self.n, self.magnitude_aware, self.eps, self.vmap_chunk = (
            objective, draws, n, magnitude_aware, eps, vmap_chunk)
        with torch.no_grad():
            loss, acc = objective.loss_and_accuracy(objective.theta)
        self.base_loss, self.base_acc = loss.item(), acc.item()
        self._cache: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self.evaluations = 0
        """Perturbed forward passes run so far."""

    def _scale(self, w: torch.Tensor, sigma: float) -> torch.Tensor | float:
        if self.magnitude_aware:
            return torch.sqrt(sigma**2 * w.square() + self.eps**2)
        return sigma

    def per_draw(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss rise, accuracy drop) of each of the first n draws at σ, float64 [n] each."""
        losses, accs = self._cache.get(sigma, (torch.empty(0, dtype=torch.float64),) * 2)
        if len(losses) < self.n:
            new = self.draws.first(self.n)[len(losses):]
            with torch.no_grad():
                thetas = {name: torch.stack([w + self._scale(w, sigma) * z[name] for z in new])
                          for name, w in self.objective.theta.items()}
                new_losses, new_accs = self.objective.many(thetas, self.vmap_chunk)
            self.evaluations += len(new)
            losses = torch.cat([losses, new_losses.double().cpu() - self.base_loss])
            accs = torch.cat([accs, self.base_acc - new_accs.double().cpu()])
            self._cache[sigma] = (losses, accs)
        return losses[: self.n], accs[: self.n]

    def known(self, column: int) -> list[tuple[float, float]]:
        """(σ, mean effect) at every σ already evaluated on all n draws: column 0 the loss rise, 1 the accuracy
        drop."""
        return [(sigma, float(values[column][: self.n].mean())) for sigma, values in self._cache.items()
                if len(values[0]) >= self.n]

    def __call__(self, sigma: float) -> PerturbationEffect:
        losses, accs = self.per_draw(sigma)
        (loss, loss_se), (acc, acc_se) = _mean_and_se(losses), _mean_and_se(accs)
        return PerturbationEffect(loss, acc, loss_se, acc_se)


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
    """Mean loss rise and accuracy drop under Gaussian weight noise (Jiang et al. 2020), by Monte Carlo, with the
    standard errors of both means (sd over the draws / √K).

    loss_increase = (1/K) Σ_k L(θ + u_k) − L(θ),  acc_drop = acc(θ) − (1/K) Σ_k acc(θ + u_k),  K = n_samples,
    with u_k ~ N(0, σ²I) or, if ``magnitude_aware``, u_k,i ~ N(0, σ²θ_i² + ε²) (σ is a std, relative to |θ_i|).
    The draws are u_k = s(σ) ⊙ z_k with z_k ~ N(0, I) from ``generator``, drawn one after another, so the same
    seed gives the same z_k as ``sigma_star`` uses. Either number can come out negative when the noise helps.
    """
    objective = _Objective(model, tokens, labels, loss_fn)
    draws = _Draws(objective.theta, generator)
    return _NoiseCurve(objective, draws, n_samples, magnitude_aware, eps, vmap_chunk)(sigma)


class _Bracket(NamedTuple):
    lo: float
    """The largest σ known to stay below the target (the answer); 0.0 when even sigma_min reaches it."""
    hi: float
    """The smallest σ known to reach it; inf when no σ <= sigma_max does."""


Point = tuple[float, float]
"""(σ, mean effect at σ)."""

EFFECT_COLUMN = {"loss": 0, "accuracy": 1}
"""The σ* kind -> the effect it reads: a ``_NoiseCurve``'s column (loss rise, accuracy drop)."""


def _power_law_step(points: list[Point], target: float, up: bool, growth: float) -> float:
    """The next σ of a search that has not yet bracketed the target: where the power law through the last two
    probes (exponent 2, the quadratic regime, from one probe or from a slope that makes no sense) reaches it, 10%
    past so that the step brackets it, at most ×/÷4; ×/÷ ``growth`` where the last effect is not positive."""
    s1, f1 = points[-1]
    if f1 <= 0:
        return s1 * growth if up else s1 / growth
    exponent = 2.0
    if len(points) >= 2:
        s0, f0 = points[-2]
        if f0 > 0 and s0 != s1:
            slope = math.log(f1 / f0) / math.log(s1 / s0)
            exponent = min(max(slope, 0.5), 16.0) if slope > 0 else 2.0
    ratio = (target / f1) ** (1 / exponent) * (1.1 if up else 1 / 1.1)
    return s1 * min(max(ratio, 1 / 4), 4.0)


def _interpolated_crossing(lo: Point, hi: Point, points: list[Point], target: float) -> float:
    """Where the effect reaches the target inside the bracket (lo, hi): by inverse quadratic interpolation of
    log σ against log effect through the three probes nearest the target in log effect (the curve bends in
    log-log: a memorized model's loss rise steepens from ~σ³ to ~σ¹⁰ within a factor 4 of σ), else by the line
    through the nearest two (a local power law), the first that lands inside the bracket; else by the line
    through (log σ, effect) at lo and hi, which lands in (lo, hi]."""
    low, high = math.log(lo[0]), math.log(hi[0])
    y = math.log(target)
    near = sorted(((math.log(s), math.log(f)) for s, f in points if f > 0), key=lambda p: abs(p[1] - y))
    for count in (3, 2):
        xs, ys = zip(*near[:count]) if len(near) >= count else ((), ())
        if len(set(ys)) < count:
            continue
        x = sum(xs[i] * math.prod((y - ys[j]) / (ys[i] - ys[j]) for j in range(count) if j != i)
                for i in range(count))
        if low < x < high:
            return math.exp(x)
    t = (target - lo[1]) / (hi[1] - lo[1])  # lo's effect < target <= hi's: 0 < t <= 1
    return math.exp(low + t * (high - low))


def _find_crossing(
    effect: Callable[[float], float],
    target: float,
    sigma_init: float,
    growth: float,
    rtol: float,
    max_iter: int,
    sigma_min: float,
    sigma_max: float,
    known: Sequence[Point] = (),
) -> _Bracket:
    """The crossing of ``target`` by effect(σ), by secant steps on log effect against log σ.

    A perturbation's mean effect grows as a power of σ while it is small (as σ² for the loss: ½σ² zᵀHz), so
    log effect is nearly linear in log σ there, and secants land near the crossing in far fewer evaluations (each
    one of every draw) than a geometric bracket search and bisection:

    - start: ``known`` points (σs already evaluated on the same curve, e.g. by another target's search), whose
      largest σ below the target and smallest at or above it bracket it for free; else one probe at
      ``sigma_init``;
    - bracketing: step to where the power law through the last two probes reaches the target
      (``_power_law_step``), never past ``sigma_min`` or ``sigma_max``;
    - closing: interpolate the crossing r inside the bracket (``_interpolated_crossing``) and probe
      r·(1 + rtol)^±0.35 on the side of the farther end, so that an accurate r closes the bracket to
      hi/lo <= 1 + rtol in two probes; after two probes in a row that each leave more than half the bracket's
      log width (plus the tolerance), the geometric midpoint, which keeps bisection's guarantee on any monotone
      curve.

    Keeps effect(lo) < target <= effect(hi); stops when hi/lo <= 1 + rtol or after ``max_iter`` closing probes.
    lo is the answer (a σ known to stay below the target); hi = inf if no σ <= sigma_max reaches the target, and
    lo = 0.0 if even sigma_min does.
    """
    below = sorted(p for p in known if p[1] < target)
    above = sorted(p for p in known if p[1] >= target)
    if below and above and below[-1][0] > above[0][0]:
        below = above = []  # a curve not monotone over the known points: start afresh
    points: list[Point] = (below + above) if below and above else below[-2:] if below else above[:2][::-1]
    lo: Point | None = below[-1] if below else None
    hi: Point | None = above[0] if above else None

    def probe(sigma: float) -> None:
        nonlocal lo, hi
        value = effect(sigma)
        points.append((sigma, value))
        if value < target:
            lo = (sigma, value)  # every probe lies beyond the end it replaces (bracketing) or inside the bracket
        else:
            hi = (sigma, value)

    if not points:
        probe(sigma_init)
    while lo is None or hi is None:
        up = hi is None
        if up and lo[0] >= sigma_max:
            return _Bracket(math.inf, math.inf)
        if not up and hi[0] <= sigma_min:
            return _Bracket(0.0, hi[0])
        step = _power_law_step(points, target, up, growth)
        probe(min(step, sigma_max) if up else max(step, sigma_min))
    tolerance = math.log1p(rtol)
    slow = 0  # interpolation probes in a row that left more than half the bracket (plus the tolerance)
    for _ in range(max_iter):
        width = math.log(hi[0] / lo[0])
        if width <= tolerance:
            break
        bisect = slow >= 2
        if bisect:
            sigma = math.sqrt(lo[0] * hi[0])
        else:
            r = _interpolated_crossing(lo, hi, points, target)
            toward_lo = math.log(r / lo[0]) >= math.log(hi[0] / r)
            # 0.35: the offset that took the fewest evaluations over 50 checkpoints of the 40k run (0.2-0.5 tried)
            sigma = r * math.exp(-0.35 * tolerance if toward_lo else 0.35 * tolerance)
            margin = min(0.1 * width, 0.2 * tolerance)
            sigma = min(max(sigma, lo[0] * math.exp(margin)), hi[0] * math.exp(-margin))  # strictly inside
        probe(sigma)
        if bisect:
            slow = 1  # one interpolation after a midpoint; should it fail to halve the bracket too, another midpoint
        else:
            slow = slow + 1 if math.log(hi[0] / lo[0]) > 0.5 * width + tolerance else 0
    return _Bracket(lo[0], hi[0])


def _sigma_star_on(curve: _NoiseCurve, target: float, kind: str, **search) -> Estimate:
    """σ* on the curve's current draws, with its standard error by the delta method: the effect's standard error
    at σ* (over the draws) divided by the mean curve's slope there (its secant across the final bracket)."""
    if kind not in EFFECT_COLUMN:
        raise ValueError(f"sigma_star kind must be 'loss' or 'accuracy', got {kind!r}")
    column = EFFECT_COLUMN[kind]
    if kind == "accuracy" and curve.base_acc < target:
        return Estimate(math.nan, math.nan, curve.n)  # the accuracy cannot drop by more than it is: σ* undefined
    bracket = _find_crossing(lambda s: curve(s)[column], target, known=curve.known(column), **search)
    if not 0 < bracket.lo < math.inf:
        return Estimate(bracket.lo, math.nan, curve.n)
    at_lo, at_hi = curve(bracket.lo), curve(bracket.hi)
    slope = (at_hi[column] - at_lo[column]) / (bracket.hi - bracket.lo)  # > 0: the bracket straddles the target
    return Estimate(bracket.lo, at_lo[column + 2] / slope, curve.n)


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
) -> Estimate:
    """σ* = the largest σ whose mean effect stays below ``target`` (Jiang et al. 2020; flatness = 1/σ*²), with
    its standard error.

    The effect is ``random_perturbation_sharpness(σ).loss_increase`` (kind="loss") or ``.acc_drop``
    (kind="accuracy"; Jiang et al. use target 0.1), estimated on the same K = n_samples draws z_k for every σ
    (common random numbers), so it is a deterministic function of σ and the search is reproducible from the seed.

    Search (``_find_crossing``): from ``sigma_init`` (default 1e-2, or 1e-1 for magnitude-aware noise, whose σ is
    relative), secant steps on log effect against log σ bracket the target and close in on it (``growth`` is the
    step where the effect is not yet positive; at most ``max_iter`` closing probes) until hi/lo <= 1 + rtol; the
    value is within a factor 1 + rtol below the crossing. It is inf when no σ <= sigma_max
    reaches the target, 0.0 when σ = sigma_min already does, and nan for kind="accuracy" when the accuracy is
    below the target (it cannot drop that far); the error is then nan.

    The error is the standard error of σ* as the draws vary, by the delta method: se(effect at σ*) / (slope of the
    mean effect at σ*). It shrinks as 1/√K; the search's own tolerance (rtol) is separate.
    """
    objective = _Objective(model, tokens, labels, loss_fn)
    curve = _NoiseCurve(objective, _Draws(objective.theta, generator), n_samples, magnitude_aware, eps, vmap_chunk)
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
            loss = objective.loss(dict(zip(objective.theta, self.leaves)), pure=True)  # differentiated twice
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


def _flat(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts as one float64 vector (the Krylov arithmetic runs in float64 whatever the model's dtype)."""
    return torch.cat([t.reshape(-1).to(torch.float64) for t in parts])


def _unflat(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    parts = torch.split(vector, [w.numel() for w in like])
    return [part.view(w.shape).to(w.dtype) for part, w in zip(parts, like)]


class _Krylov(NamedTuple):
    top: Estimate
    """The largest Ritz value, its residual bound (some eigenvalue of H lies within it) and the iterations."""
    basis: torch.Tensor
    """[m, n_params] orthonormal Lanczos vectors q_1..q_m (float64)."""
    diagonal_sum: float
    """Σ_i q_iᵀ H q_i = tr(Qᵀ H Q), the trace of H on the basis's span."""


def _lanczos(hvp: _HessianVectorProduct, max_iters: int, generator: torch.Generator, rel_tol: float) -> _Krylov:
    """Lanczos with full reorthogonalization from q_1 ~ N(0, I) (normalized), on the flattened parameters.

    After m steps the tridiagonal T_m = Q_mᵀ H Q_m has Ritz values θ_1 <= ... <= θ_m; the largest, θ_m, never
    exceeds λ_max, and some eigenvalue of H lies within its residual r = β_m |s_m[m]| (s_m: θ_m's eigenvector of
    T_m, β_m the next off-diagonal). Stops when r <= rel_tol · |θ_m|, after ``max_iters`` steps, or when the Krylov
    space is invariant (β_m ≈ 0, r = 0: the Ritz values are then eigenvalues). Unlike power iteration, whose error
    falls as (λ_2/λ_1)^t and stalls when λ_1 ≈ λ_2, Lanczos resolves close top eigenvalues in a few steps more.
    """
    like = hvp.leaves
    n = sum(w.numel() for w in like)
    device = like[0].device
    m_max = max(1, min(max_iters, n))
    basis = torch.zeros(m_max, n, dtype=torch.float64, device=device)
    q = _flat([torch.randn(w.shape, generator=generator, device=device, dtype=w.dtype) for w in like])
    basis[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    top = Estimate(0.0, math.inf, 0)
    for j in range(m_max):
        w = _flat(hvp(_unflat(basis[j], like)))
        alphas.append(float(basis[j] @ w))
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough"): no spurious copies of Ritz values
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        scale = float(theta.abs().max())
        invariant = beta <= 1e-10 * max(scale, 1e-300) or j + 1 == n
        top = Estimate(float(theta[-1]), 0.0 if invariant else beta * float(s[-1, -1].abs()), j + 1)
        if invariant or top.error <= rel_tol * abs(top.value) or j + 1 == m_max:
            break
        basis[j + 1] = w / beta
        betas.append(beta)
    return _Krylov(top, basis[: top.n], sum(alphas))


def _rademacher(like: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    return _flat([torch.randint(0, 2, w.shape, generator=generator, device=w.device) for w in like]) * 2 - 1


def _hutchinson(hvp: _HessianVectorProduct, generator: torch.Generator, *, rel_error: float, min_samples: int,
                max_samples: int, krylov: _Krylov | None = None) -> Estimate:
    """tr H ≈ tr(QᵀHQ) + (1/K) Σ_k z_kᵀ P H P z_k with Rademacher z_k and P = I − QᵀQ projecting out an orthonormal
    basis Q (rows; none: plain Hutchinson), with the standard error of the mean over the K samples.

    Unbiased for any Q chosen independently of the z_k: E[zᵀPHPz] = tr(PHP) = tr H − tr(QᵀHQ). With Q the Lanczos
    vectors the top eigendirections are taken exactly and only the rest is sampled, whose variance
    (≈ 2‖PHP‖_F² per sample) is smaller where a few large eigenvalues dominate H. Samples are drawn until
    K >= min_samples and se <= rel_error · |estimate|, or K = max_samples (rel_error = 0: always max_samples).
    """
    if min_samples < 1 or max_samples < 1:
        raise ValueError(f"Hutchinson needs at least 1 sample, got min {min_samples}, max {max_samples}")
    like = hvp.leaves
    known = krylov.diagonal_sum if krylov is not None else 0.0
    values: list[float] = []
    while True:
        z = _rademacher(like, generator)
        if krylov is not None:
            z = z - krylov.basis.T @ (krylov.basis @ z)
        values.append(float(z @ _flat(hvp(_unflat(z, like)))))
        mean, se = _mean_and_se(torch.tensor(values, dtype=torch.float64))
        if len(values) >= max_samples:
            break
        if len(values) >= min_samples and se <= rel_error * abs(known + mean):
            break
    return Estimate(known + mean, se, len(values))


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
) -> Estimate:
    """The largest eigenvalue λ_max of H = ∇²_θ L by Lanczos (``_lanczos``), with a bound on its error.

    value: the largest Ritz value (<= λ_max); error: its residual norm, within which some eigenvalue of H lies
    (0 once the Krylov space is invariant); n: Hessian-vector products used, at most ``iters``, fewer when the
    error falls below ``tol`` · |value|. Each product is a double backward through one retained gradient graph.
    Near a minimum H is close to positive semi-definite and λ_max is the sharpest curvature.
    """
    objective = _Objective(model, tokens, labels, loss_fn)
    return _lanczos(_HessianVectorProduct(objective), iters, generator, tol).top


@flush_denormals()
def hessian_trace(
    model: torch.nn.Module,
    tokens: Int[torch.Tensor, "batch pos"],
    labels: Int[torch.Tensor, " batch"],
    max_samples: int = 64,
    *,
    generator: torch.Generator,
    rel_error: float = 0.05,
    min_samples: int = 4,
    deflate: int = 0,
    loss_fn: LossFn = answer_objective,
) -> Estimate:
    """tr H by Hutchinson's estimator with Rademacher vectors, drawn until the standard error is at most
    ``rel_error`` of the estimate (after ``min_samples``) or ``max_samples`` are drawn; value, standard error, samples.

    ``deflate`` > 0 first runs up to that many Lanczos steps (from the same generator) and samples only the
    trace outside their span (``_hutchinson``). Plain Hutchinson is unbiased with variance 2 Σ_{i≠j} H_ij² per
    sample (exact for a diagonal H).
    """
    objective = _Objective(model, tokens, labels, loss_fn)
    hvp = _HessianVectorProduct(objective)
    krylov = _lanczos(hvp, deflate, generator, 0.0) if deflate > 0 else None
    return _hutchinson(hvp, generator, rel_error=rel_error, min_samples=min_samples, max_samples=max_samples,
                       krylov=krylov)


@flush_denormals()
def sharpness_metrics(
    ckpt: Checkpoint,
    *,
    max_rows: int | None = MAX_ROWS,
    rel_error: float = REL_ERROR,
    sigma: float = SIGMA,
    n_samples: int = N_SAMPLES,
    max_samples: int = MAX_NOISE_SAMPLES,
    loss_target: float = LOSS_TARGET,
    acc_target: float = ACC_TARGET,
    magnitude_eps: float = MAGNITUDE_EPS,
    sigma_rtol: float = 0.02,
    eps: float = BOX_EPS,
    eps_steps: int = 5,
    eps_lr: float = 2.0,
    lanczos_iters: int = LANCZOS_ITERS,
    hutchinson_samples: int = 4,
    max_hutchinson_samples: int = MAX_HUTCHINSON_SAMPLES,
    vmap_chunk: int | None = None,
) -> dict[str, float]:
    """Every sharpness measure of one checkpoint, on its training split, each sampled estimate with its error.

    ``train_loss`` and ``train_acc`` use the whole training split. The sharpness columns use ``n_rows`` of its rows:
    all of them, or ``max_rows`` chosen by a generator seeded with ``ckpt.seed`` alone, so every step of a run is
    measured on the same rows. Columns (the functions above give the maths):

    - ``rand_loss_increase``, ``rand_acc_drop``: Gaussian noise N(0, σ²I) at the fixed σ = ``sigma``;
    - ``sigma_star_loss``, ``sigma_star_acc``: σ* for a mean loss rise of ``loss_target`` nats and an accuracy drop
      of ``acc_target``, on the same draws as the two above, found to within ×(1 + sigma_rtol);
    - ``sigma_star_loss_magnitude``: σ* of the loss for magnitude-aware noise N(0, σ²θ_i² + ε²), same draws;
    - ``noise_draws``: the draws the four plain-noise columns used, ``noise_draws_magnitude`` those of the
      magnitude-aware σ*: ``n_samples`` at first, doubled (for that noise only) until each finite σ*'s standard
      error is at most ``rel_error`` of it, or ``max_samples``;
    - ``eps_sharpness``: Keskar et al.'s φ (percent) for the box ε(|θ_i| + 1), ``eps_steps`` ascent steps from 0
      (deterministic: a lower bound of the maximum, no sampling error);
    - ``hessian_top_eig``: λ_max by Lanczos, until its residual bound ``hessian_top_eig_err`` is at most
      ``rel_error`` of it or ``lanczos_iters`` steps (``hessian_lanczos_iters``);
    - ``hessian_trace``: the trace on the Lanczos vectors' span plus Hutchinson outside it, Rademacher vectors drawn
      from ``hutchinson_samples`` until the standard error is at most ``rel_error`` of the trace or
      ``max_hutchinson_samples`` (``hessian_trace_samples``);
    - ``error_targets_met``: 1 when every estimate above reached ``rel_error``, 0 when a budget ran out first.

    Each ``X`` sampled has ``X_se``, its standard error; ``hessian_top_eig_err`` is a bound, not a standard error.
    Randomness: ``ckpt.generator(1)`` draws the noise, ``(2)`` the Lanczos start, ``(3)`` the Hutchinson vectors.
    """
    model = ckpt.model
    logits = ckpt.train_logits
    row: dict[str, float] = {"train_loss": answer_loss(logits, ckpt.train_labels).item(),
                             "train_acc": (logits.argmax(-1) == ckpt.train_labels).double().mean().item()}
    tokens, labels = ckpt.training_rows(max_rows)
    row["n_rows"] = float(len(labels))

    objective = _Objective(model, tokens, labels, answer_objective)
    draws = _Draws(objective.theta, ckpt.generator(1))
    n = min(n_samples, max_samples)
    plain = _NoiseCurve(objective, draws, n, False, magnitude_eps, vmap_chunk)
    magnitude = _NoiseCurve(objective, draws, n, True, magnitude_eps, vmap_chunk)
    search = dict(growth=2.0, rtol=sigma_rtol, max_iter=14, sigma_min=1e-6, sigma_max=10.0)
    searches = {"sigma_star_loss": (plain, loss_target, "loss"), "sigma_star_acc": (plain, acc_target, "accuracy"),
                "sigma_star_loss_magnitude": (magnitude, loss_target, "loss")}
    starts = {"sigma_star_loss": sigma, "sigma_star_acc": sigma, "sigma_star_loss_magnitude": SIGMA_MAGNITUDE}
    stars: dict[str, Estimate] = {}
    while True:
        for name, (curve, target, kind) in searches.items():
            # each search starts from the points its curve has evaluated on all its draws (σ*_acc, a little above
            # σ*_loss, from σ*_loss's probes), or else from its start
            if name not in stars:
                stars[name] = _sigma_star_on(curve, target, kind, sigma_init=starts[name], **search)
        # a curve with a σ* that misses the target (nan: σ* = 0 or inf, no error) gets twice the draws, the other
        # keeps its own; its searches run again from the old bracket, where the new draws are evaluated first
        short = {id(curve): curve for name, (curve, _, _) in searches.items()
                 if stars[name].relative_error > rel_error and curve.n < max_samples}
        if not short:
            break
        brackets = []
        for name, (curve, target, kind) in searches.items():
            if id(curve) not in short:
                continue
            value = stars.pop(name).value  # this search runs again, on the new draws
            if 0 < value < math.inf:
                above = [s for s, f in curve.known(EFFECT_COLUMN[kind]) if s > value and f >= target]
                brackets.append((curve, value, min(above, default=value)))
                starts[name] = value
        for curve in short.values():
            curve.n = min(2 * curve.n, max_samples)
        for curve, lo, hi in brackets:
            curve(lo), curve(hi)
    at_sigma = plain(sigma)
    row["rand_loss_increase"], row["rand_loss_increase_se"] = at_sigma.loss_increase, at_sigma.loss_increase_se
    row["rand_acc_drop"], row["rand_acc_drop_se"] = at_sigma.acc_drop, at_sigma.acc_drop_se
    for name in searches:
        row[name], row[f"{name}_se"] = stars[name].value, stars[name].error
    row["noise_draws"], row["noise_draws_magnitude"] = float(plain.n), float(magnitude.n)
    noise_met = all(not e.relative_error > rel_error for e in stars.values())

    row["eps_sharpness"] = epsilon_sharpness(model, tokens, labels, eps, eps_steps, eps_lr)
    hvp = _HessianVectorProduct(objective)
    krylov = _lanczos(hvp, lanczos_iters, ckpt.generator(2), rel_error)
    row["hessian_top_eig"], row["hessian_top_eig_err"] = krylov.top.value, krylov.top.error
    row["hessian_lanczos_iters"] = float(krylov.top.n)
    trace = _hutchinson(hvp, ckpt.generator(3), rel_error=rel_error, min_samples=min(hutchinson_samples,
                        max_hutchinson_samples), max_samples=max_hutchinson_samples, krylov=krylov)
    row["hessian_trace"], row["hessian_trace_se"] = trace.value, trace.error
    row["hessian_trace_samples"] = float(trace.n)
    met = noise_met and not krylov.top.relative_error > rel_error and not trace.relative_error > rel_error
    row["error_targets_met"] = float(met)
    log.debug("step %d: sharpness %s (noise evaluations: plain %d, magnitude %d)", ckpt.step, row,
              plain.evaluations, magnitude.evaluations)
    return row
