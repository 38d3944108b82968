"""The metric registry: every analysis ``grokinterp analyze --metric NAME`` can run, filled in one place.

A per-checkpoint metric is a pure function ``(Checkpoint, **params) -> dict[str, float]`` (one row per step).
``prepare``, when given, computes run-level parameters once from the run's last checkpoint (e.g. the key Fourier
frequencies that every step is then measured against), so every row of a table uses the same ones.

Each metric carries a ``version``: the analysis cache keys its rows on it, so bump it whenever the metric's
numbers would change for the same weights and parameters (new maths, a changed module constant, a fixed bug).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grokinterp.config import RunConfig
from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.clock_pizza import clock_pizza_metrics
from grokinterp.metrics.fourier import circle_metrics, circle_points, embedding_key_frequencies, fourier_metrics
from grokinterp.metrics.llc import check_llc_params, llc_metrics
from grokinterp.metrics.sharpness import sharpness_metrics
from grokinterp.metrics.sn import coset_metrics, coset_points, embedding_key_irreps, irrep_metrics
from grokinterp.metrics.stability import softmax_collapse_metrics
from grokinterp.metrics.weights import weight_norm_metrics


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., dict[str, float]] | None
    """Per-checkpoint function; None for metrics read off the metrics log (phases)."""
    description: str
    families: tuple[str, ...] = ("mod", "perm")
    """Task families the metric applies to."""
    prepare: Callable[[Checkpoint], dict[str, Any]] | None = None
    points: Callable[..., list[dict]] | None = None
    """Per-token 2D points (panel, token, x, y, colour) for figures, computed at a few snapshot steps."""
    ops: tuple[str, ...] | None = field(default=None, kw_only=True)
    """Operations the metric applies to, where it is narrower than its families (None: every operation)."""
    in_all: bool = field(default=True, kw_only=True)
    """Run by ``--metric all``; False for a metric too slow to run over every checkpoint unasked (ask by name)."""
    param_rules: dict[str, str] = field(default_factory=dict, kw_only=True)
    """The range of a numeric parameter where it is not "positive" (> 0): "nonnegative" or "fraction" (0, 1]."""
    check: Callable[[dict[str, Any], RunConfig], str | None] | None = field(default=None, kw_only=True)
    """What the parameters must satisfy together or against the run (a key frequency below p/2, n_burnin below
    n_draws): given the effective parameters and the run's config, what is wrong in one line, or None."""
    version: int = field(kw_only=True)
    """Bumped whenever the numbers change for the same weights and parameters, so cached rows of older maths are
    recomputed."""


def _check_key_freqs(params: dict[str, Any], config: RunConfig) -> str | None:
    n_freqs = config.task.p // 2
    freqs = params.get("key_freqs") or []
    if any(not 1 <= k <= n_freqs for k in freqs):
        return f"key_freqs must lie in 1..{n_freqs} (p = {config.task.p}), got {freqs}"
    return None


def _check_key_irreps(params: dict[str, Any], config: RunConfig) -> str | None:
    from grokinterp.metrics.sn import symmetric_group

    names = symmetric_group(config.task.n).irrep_aliases
    unknown = [k for k in params.get("key_irreps") or [] if k not in names]
    if unknown:
        return f"S_{config.task.n} has no irrep {unknown[0]!r}; choose from: {', '.join(names)}"
    return None


def _final_key_freqs(ckpt: Checkpoint) -> dict[str, Any]:
    return {"key_freqs": embedding_key_frequencies(ckpt)}


def _final_key_irreps(ckpt: Checkpoint) -> dict[str, Any]:
    return {"key_irreps": embedding_key_irreps(ckpt)}


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> None:
    if metric.name in METRICS:
        raise RuntimeError(f"metric {metric.name!r} is registered twice")
    METRICS[metric.name] = metric


register(Metric("phases", None, "steps where train/val accuracy pass 50% and 99%, and the grokking delay",
                version=1))
register(Metric("weight-norm", weight_norm_metrics, "Σ‖θ‖² in total and per component (embed, attn, mlp, unembed)",
                version=1))
register(Metric("fourier", fourier_metrics, "Fourier power of W_E/W_U per frequency, sparsity, neurons explained "
                "by one frequency, restricted and excluded loss", families=("mod",), prepare=_final_key_freqs,
                check=_check_key_freqs, version=2))
register(Metric("circles", circle_metrics, "how well the embedding sits on a circle in the Fourier plane of each "
                "key frequency, beside the chance level of random embeddings of the same shape",
                families=("mod",), prepare=_final_key_freqs, points=circle_points, check=_check_key_freqs, version=2))
register(Metric("cosets", coset_metrics, "how strongly W_E/W_U rows cluster by left and right cosets of point "
                "stabilizers, A_n and (S5) a dihedral subgroup, against random labels of the same sizes",
                families=("perm",), points=coset_points, version=1))
register(Metric("irreps", irrep_metrics, "fraction of W_E/W_U variance in each irreducible representation, key "
                "irreps, the logits' similarity to tr ρ(x)ρ(y)ρ(z⁻¹), and restricted and excluded losses per irrep "
                "and for the key irreps (the last checkpoint's)", families=("perm",),
                prepare=_final_key_irreps, param_rules={"threshold": "fraction"}, check=_check_key_irreps, version=2))
register(Metric("sharpness", sharpness_metrics, "training-loss sharpness under weight perturbation: expected loss "
                "increase at fixed σ, σ* by a secant search (plain and magnitude-aware), ε-sharpness (maximized), Hessian "
                "top eigenvalue (Lanczos) and trace (Hutchinson, deflated); each sampled column X with X_se, drawn "
                "until rel_error or a budget",
                param_rules={"magnitude_eps": "nonnegative", "eps_steps": "nonnegative", "acc_target": "fraction",
                             "rel_error": "fraction"},
                version=3))
register(Metric("softmax-collapse", softmax_collapse_metrics, "share of training rows whose float32/float64 "
                "softmax gives the correct class probability exactly 1, share of exactly-zero gradient entries, mean "
                "logit norm and margin (Prieto et al. 2025)", version=1))
register(Metric("llc", llc_metrics, "local learning coefficient λ̂ = nβ(E[L] − L(w*)) by SGLD chains localized at the "
                "weights (Lau et al. 2023), with per-chain estimates, a standard error (more chains until rel_error or "
                "max_chains) and a drift check; calibrate "
                "step_size and nbeta first with `grokinterp calibrate-llc`; not part of --metric all (slow)",
                param_rules={"n_burnin": "nonnegative", "rel_error": "nonnegative"}, check=check_llc_params,
                in_all=False, version=2))
register(Metric("clock-pizza", clock_pizza_metrics, "gradient symmetricity (± se) and distance irrelevance, which "
                "tell the Clock from the Pizza algorithm (Zhong et al. 2023): Pizza ≈ 1 and ≈ 0, Clock lower and ≈ 1",
                families=("mod",), ops=("add",), version=2))
