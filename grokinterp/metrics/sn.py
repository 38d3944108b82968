"""Representation and coset metrics of S_n models (Chughtai, Chan & Nanda 2023, "A Toy Model of Universality").

Irreps: for each irrep ρ of dimension d_ρ, the |G| × d_ρ² matrix B_ρ whose row g is ρ(g) flattened has orthogonal
columns of squared norm |G|/d_ρ (Schur orthogonality), and the spans of different irreps are orthogonal and
together fill R^|G| (the regular representation). So for a centred matrix W with rows indexed by group elements,
``FVE_ρ = ‖P_ρ W‖² / ‖W‖²`` with ``P_ρ = (d_ρ/|G|) B_ρ B_ρᵀ``; the FVEs sum to 1, and the trivial one is 0.

Logits: the model of Chughtai et al. answers with
``logit(z | x, y) ∝ Σ_ρ tr ρ(x)ρ(y)ρ(z⁻¹) = Σ_ρ χ_ρ(x·y·z⁻¹)`` over a few key irreps. ``logit_similarity`` is
the cosine between the model's logits (centred over z for each pair) and the template ``χ_ρ(c·z⁻¹)``, with c the
task's answer (c = x·y for perm_mul). Templates of different irreps are orthogonal (character orthogonality), so
the squared similarities add up to the fraction of logit variance that the character templates explain.

Cosets: the score of a labelling is between-label variance / total variance of the rows of W (1 when rows sit on
their label's centre, (k-1)/(|G|-1) on average for random labels of k classes). Each subgroup family is scored
by its best conjugate, and its baseline by the same "best of as many" over random labellings of the same sizes.
"""

import functools
import math

import numpy as np
import torch
from jaxtyping import Float, Int

from grokinterp.groups import SymmetricGroup
from grokinterp.metrics.base import Checkpoint
from grokinterp.model import answer_logits

KEY_IRREP_FVE = 0.05
"""An irrep is key when it explains more than 5% of the centred variance. A random S5 embedding puts d_ρ²/119 in
each irrep (13-30% in the 4-, 5- and 6-dimensional ones, 0.8% in sign), so a fresh model has 5 key irreps and a
grokked one only those it uses."""
N_BASELINE_DRAWS = 8  # random labellings averaged into each coset baseline
LOGIT_BATCH = 16_384  # pairs per forward pass (S6 has 518,400 pairs)
DIHEDRAL_GENERATORS = ((3, 4, 2, 0, 1), (0, 2, 1, 4, 3))  # (0 3)(1 4) and (1 2)(3 4): a dihedral group of order 10

RowMatrix = Float[np.ndarray, "order d"] | Float[torch.Tensor, "order d"]


@functools.lru_cache(maxsize=None)
def symmetric_group(n: int) -> SymmetricGroup:
    """One shared S_n per n, so its tables and irreps are built once per process."""
    return SymmetricGroup(n)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _check_rows(W: np.ndarray, group: SymmetricGroup) -> None:
    if W.shape[0] != group.order:
        raise ValueError(f"expected one row per element of S_{group.n} ({group.order}), got {W.shape[0]} rows")


# ---- irreps -----------------------------------------------------------------------------------------------------


def irrep_fve(W: RowMatrix, group: SymmetricGroup) -> dict[str, float]:
    """Fraction of the centred variance of W (rows = group elements) in each irrep's span, by irrep name.

    ``FVE_ρ = (d_ρ/|G|) ‖B_ρᵀ W‖² / ‖W‖²`` after centring W's rows; the values sum to 1 and 'trivial' is 0.
    """
    W = _as_numpy(W)
    _check_rows(W, group)
    W = W - W.mean(axis=0)
    total = float((W**2).sum())
    out = {}
    for rho in group.irreps:
        basis = rho.matrices.reshape(group.order, rho.dim**2)
        coeffs = basis.T @ W
        out[rho.name] = float(rho.dim / group.order * (coeffs**2).sum() / total) if total > 0 else 0.0
    return out


def key_irreps(fve: dict[str, float], threshold: float = KEY_IRREP_FVE) -> list[str]:
    """Irreps whose FVE exceeds ``threshold``, strongest first (the trivial irrep is never key)."""
    return [name for name, v in sorted(fve.items(), key=lambda kv: -kv[1]) if v > threshold and name != "trivial"]


_key_irreps_of = key_irreps  # for irrep_metrics, whose parameter of the same name shadows it


def _character_sums(
    logits: Float[np.ndarray, "n_pairs order"], answers: Int[np.ndarray, " n_pairs"], group: SymmetricGroup
) -> tuple[Float[np.ndarray, " n_irreps"], float]:
    # Σ_p Σ_z L̃[p, z] χ̃_ρ(c_p z⁻¹) for every irrep, and Σ L̃², with L̃ the logits centred over z and χ̃ the
    # centred character. Substituting w = c_p z⁻¹ (z = w⁻¹ c_p) turns the first into one gather and one matmul.
    centred = logits - logits.mean(axis=1, keepdims=True)
    by_w = np.take_along_axis(centred, group.mul[group.inv][:, answers].T, axis=1)
    chars = np.stack([rho.character for rho in group.irreps], axis=1)
    chars = chars - chars.mean(axis=0)
    return (by_w @ chars).sum(axis=0), float((centred**2).sum())


def _similarities(dots: np.ndarray, logit_sq: float, n_pairs: int, group: SymmetricGroup) -> dict[str, float]:
    out = {}
    for rho, dot in zip(group.irreps, dots):
        if rho.name == "trivial":
            continue  # constant over z: nothing is left after centring
        template_sq = n_pairs * float((rho.character**2).sum())  # Σ_w χ(w)² = |G| per pair (orthonormality)
        out[rho.name] = float(dot / math.sqrt(logit_sq * template_sq)) if logit_sq > 0 else 0.0
    return out


def logit_similarity(
    logits: Float[np.ndarray, "n_pairs order"] | Float[torch.Tensor, "n_pairs order"],
    answers: Int[np.ndarray, " n_pairs"] | Int[torch.Tensor, " n_pairs"],
    group: SymmetricGroup,
) -> dict[str, float]:
    """Cosine similarity, per non-trivial irrep ρ, between the answer logits (each row centred over z) and the
    template ``T[p, z] = χ_ρ(c_p · z⁻¹) = tr ρ(c_p)ρ(z⁻¹)``, where ``c_p`` is the correct answer of pair p.

    For perm_mul, ``c = x·y`` and the template is ``tr ρ(x)ρ(y)ρ(z⁻¹)``. The templates are mutually orthogonal, so
    the squares of the similarities sum to at most 1.
    """
    logits = _as_numpy(logits)
    answers = answers.cpu().numpy() if isinstance(answers, torch.Tensor) else np.asarray(answers)
    if logits.shape[1] != group.order:
        raise ValueError(f"expected logits over the {group.order} elements of S_{group.n}, got {logits.shape[1]}")
    dots, logit_sq = _character_sums(logits, answers.astype(np.int64), group)
    return _similarities(dots, logit_sq, len(answers), group)


@torch.no_grad()
def model_logit_similarity(ckpt: Checkpoint, group: SymmetricGroup) -> dict[str, float]:
    """``logit_similarity`` over every pair of the run's table, streamed in batches (S6 would not fit at once)."""
    tokens, labels = ckpt.data.tokens, ckpt.data.labels
    dots, logit_sq = np.zeros(len(group.irreps)), 0.0
    for start in range(0, len(labels), LOGIT_BATCH):
        logits = answer_logits(ckpt.model, tokens[start : start + LOGIT_BATCH])
        d, sq = _character_sums(_as_numpy(logits), labels[start : start + LOGIT_BATCH].cpu().numpy(), group)
        dots, logit_sq = dots + d, logit_sq + sq
    return _similarities(dots, logit_sq, len(labels), group)


class _AnswerMeans:
    """Σ of the logit rows per correct answer c, and the count of pairs per answer: the projection of the logits
    (as functions of the pair, one per output z) onto functions of the answer is the per-answer mean."""

    def __init__(self, order: int):
        self.sums = np.zeros((order, order))
        self.counts = np.zeros(order)

    def add(self, logits: np.ndarray, answers: np.ndarray) -> None:
        np.add.at(self.sums, answers, logits)
        np.add.at(self.counts, answers, 1.0)

    def components(self, group: SymmetricGroup) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(the mean over pairs, one value per output z; for every non-trivial irrep ρ, the [answer c, output z]
        component of the centred per-answer means in ρ's isotypic subspace: (d_ρ/|G|) B_ρ B_ρᵀ M̃, with B_ρ the
        |G| × d_ρ² matrix entries ρ(c)_ij, orthogonal with squared norms |G|/d_ρ by Schur orthogonality)."""
        if not (self.counts == self.counts[0]).all():
            raise ValueError("restricted/excluded losses need every answer reached by equally many pairs")
        means = self.sums / self.counts[:, None]
        mean_z = means.mean(axis=0)
        centred = means - mean_z
        comps = {}
        for rho in group.irreps:
            if rho.name == "trivial":
                continue
            basis = rho.matrices.reshape(group.order, rho.dim**2)
            comps[rho.name] = rho.dim / group.order * basis @ (basis.T @ centred)
        return mean_z, comps


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy in float64."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_z - logits[np.arange(len(labels)), labels]


def restricted_and_excluded_losses(
    batches,
    group: SymmetricGroup,
    key_irreps: list[str],
) -> dict[str, float]:
    """Chughtai et al.'s S_n counterparts of Nanda's progress measures, for every non-trivial irrep ρ alone and for
    the set of ``key_irreps``.

    ``batches()`` yields (logits [pairs, |G|], answers [pairs], in_train [pairs]) over every pair of the table, and
    is called twice. The logits of pair (x, y) for output z are split into their mean over pairs, their components
    along functions of the answer c in each irrep's isotypic subspace (the span of the ρ(c)_ij), and the rest.
    Restricted loss of a set K: cross-entropy over all pairs of the mean plus the K components alone. Excluded
    loss: cross-entropy over the training pairs of the logits with the K components removed. For logits
    ∝ Σ_{ρ∈K} χ_ρ(c·z⁻¹) (the character algorithm) the restricted loss is the full loss and the excluded loss is
    log |G|."""
    acc = _AnswerMeans(group.order)
    for logits, answers, _ in batches():
        acc.add(logits, answers)
    mean_z, comps = acc.components(group)
    keys = [group.irrep(k).name for k in key_irreps]
    sets = {**{name: [name] for name in comps}, "keys": keys}
    answers_all = np.arange(group.order)
    out: dict[str, float] = {}
    for label, members in sets.items():
        kept = mean_z + sum((comps[m] for m in members), np.zeros_like(mean_z))  # [c, z]: one row per answer
        out[f"restricted_loss_{label}"] = float((_cross_entropy(kept, answers_all) * acc.counts).sum()
                                                / acc.counts.sum())
    removed = {label: sum((comps[m] for m in members), np.zeros((group.order, group.order)))
               for label, members in sets.items()}
    totals, n_train = dict.fromkeys(sets, 0.0), 0
    for logits, answers, in_train in batches():
        rows, ans = logits[in_train], answers[in_train]
        n_train += len(ans)
        for label in sets:
            totals[label] += float(_cross_entropy(rows - removed[label][ans], ans).sum())
    for label in sets:
        out[f"excluded_loss_{label}"] = totals[label] / n_train if n_train else math.nan
    return out


# ---- cosets -----------------------------------------------------------------------------------------------------


def conjugates(group: SymmetricGroup, subgroup: Int[np.ndarray, " subgroup"]) -> list[Int[np.ndarray, " subgroup"]]:
    """The distinct conjugates g H g⁻¹ of a subgroup, as sorted element indices, in order of first appearance."""
    seen, out = set(), []
    for g in range(group.order):
        conj = np.sort(group.mul[group.mul[g, subgroup], group.inv[g]])
        key = tuple(conj.tolist())
        if key not in seen:
            seen.add(key)
            out.append(conj)
    return out


def subgroup_families(group: SymmetricGroup) -> dict[str, list[Int[np.ndarray, " subgroup"]]]:
    """The subgroups whose cosets we look for, by family: 'stabilizer' (the n point stabilizers ≅ S_{n-1}),
    'alternating' (A_n) and, for S5 only, 'dihedral' (⟨(0 3)(1 4), (1 2)(3 4)⟩ ≅ D5 of order 10, and its 6
    conjugates)."""
    families = {
        "stabilizer": [group.point_stabilizer(i) for i in range(group.n)],
        "alternating": [group.alternating()],
    }
    if group.n == 5:
        families["dihedral"] = conjugates(group, group.generate(DIHEDRAL_GENERATORS))
    return families


def coset_score(W: RowMatrix, labels: Int[np.ndarray, " order"], method: str = "variance") -> float:
    """How well the rows of W cluster by ``labels``: 'variance' = between-label / total variance (0 to 1), or
    'silhouette' = scikit-learn's mean silhouette (-1 to 1; needs 2 <= labels < rows)."""
    W = _as_numpy(W)
    labels = np.asarray(labels, dtype=np.int64)
    if method == "silhouette":
        from sklearn.metrics import silhouette_score

        return float(silhouette_score(W, labels))
    if method != "variance":
        raise ValueError(f"unknown coset score method {method!r}; choose 'variance' or 'silhouette'")
    W = W - W.mean(axis=0)
    total = float((W**2).sum())
    if total == 0:
        return 0.0
    one_hot = np.eye(labels.max() + 1)[labels]
    sums = one_hot.T @ W
    between = float(((sums**2).sum(axis=1) / one_hot.sum(axis=0)).sum())
    return between / total


def random_label_draws(
    W: RowMatrix,
    labels: Int[np.ndarray, " order"],
    n_draws: int = N_BASELINE_DRAWS,
    best_of: int = 1,
    seed: int = 0,
    method: str = "variance",
) -> Float[np.ndarray, " n_draws"]:
    """For each of ``n_draws`` draws, the best ``coset_score`` among ``best_of`` random shuffles of ``labels`` (same
    label sizes); their mean is the baseline. ``best_of`` = the number of conjugates makes it the fair baseline for
    a max over conjugates."""
    W = _as_numpy(W)
    rng = np.random.default_rng(seed)
    return np.array([max(coset_score(W, rng.permutation(labels), method) for _ in range(best_of))
                     for _ in range(n_draws)])


def coset_scores(
    W: RowMatrix,
    group: SymmetricGroup,
    families: dict[str, list[np.ndarray]] | None = None,
    n_draws: int = N_BASELINE_DRAWS,
    seed: int = 0,
    method: str = "variance",
) -> dict[str, float]:
    """For each subgroup family (default ``subgroup_families(group)``) and side: ``{side}_{family}``, the best
    score over the family's conjugates of the left (gH) or right (Hg) coset labelling, and
    ``{side}_{family}_baseline``, the same for random labellings of the same sizes (shared by both sides), with its
    standard error over the draws, ``..._baseline_se``."""
    W = _as_numpy(W)
    _check_rows(W, group)
    out = {}
    for family, subgroups in (families or subgroup_families(group)).items():
        for side, cosets in (("left", group.left_cosets), ("right", group.right_cosets)):
            out[f"{side}_{family}"] = max(coset_score(W, cosets(h), method) for h in subgroups)
        draws = random_label_draws(W, group.left_cosets(subgroups[0]), n_draws, len(subgroups), seed, method)
        se = float(draws.std(ddof=1) / np.sqrt(len(draws))) if len(draws) > 1 else math.nan
        for side in ("left", "right"):
            out[f"{side}_{family}_baseline"], out[f"{side}_{family}_baseline_se"] = float(draws.mean()), se
    return out


# ---- per-checkpoint rows ----------------------------------------------------------------------------------------


def _require_perm(ckpt: Checkpoint) -> SymmetricGroup:
    from grokinterp.tasks import OPERATIONS

    op = OPERATIONS[ckpt.config.task.op]
    if op.family != "perm":
        raise ValueError(
            f"the S_n metrics need a permutation task (perm_mul, ...); run's task is {op.name} ({op.formula})"
        )
    group = symmetric_group(ckpt.config.task.n)
    if ckpt.data.n_symbols != group.order:
        raise ValueError(f"run's data has {ckpt.data.n_symbols} symbols, but S_{group.n} has {group.order} elements")
    return group


def _embed_unembed(ckpt: Checkpoint, order: int) -> tuple[np.ndarray, np.ndarray]:
    return _as_numpy(ckpt.model.W_E[:order]), _as_numpy(ckpt.model.W_U.T)


def embedding_key_irreps(ckpt: Checkpoint, threshold: float = KEY_IRREP_FVE) -> list[str]:
    """Key irreps of the checkpoint's embedding (FVE above ``threshold``), strongest first."""
    group = _require_perm(ckpt)
    return key_irreps(irrep_fve(_embed_unembed(ckpt, group.order)[0], group), threshold)


@torch.no_grad()
def model_restricted_and_excluded_losses(ckpt: Checkpoint, group: SymmetricGroup,
                                         keys: list[str]) -> dict[str, float]:
    """``restricted_and_excluded_losses`` of the model over every pair of the run's table, in batches."""
    tokens, labels = ckpt.data.tokens, ckpt.data.labels
    in_train = torch.zeros(len(labels), dtype=torch.bool)
    in_train[ckpt.data.train_idx.cpu()] = True
    starts = range(0, len(labels), LOGIT_BATCH)
    kept: list[np.ndarray] | None = [] if len(starts) == 1 else None  # one batch (S5): computed once, used twice

    def batches():
        for i, start in enumerate(starts):
            if kept:
                logits = kept[i]
            else:
                logits = _as_numpy(answer_logits(ckpt.model, tokens[start : start + LOGIT_BATCH]))
                if kept is not None:
                    kept.append(logits)
            stop = start + LOGIT_BATCH
            yield logits, labels[start:stop].cpu().numpy(), in_train[start:stop].numpy()

    return restricted_and_excluded_losses(batches, group, keys)


def irrep_metrics(ckpt: Checkpoint, threshold: float = KEY_IRREP_FVE,
                  key_irreps: list[str] | None = None) -> dict[str, float]:
    """Irrep FVE of the embedding (W_E rows of the group elements) and unembedding (W_U columns), the number of key
    irreps of each, the logit similarity to each irrep's character template, and the restricted and excluded
    losses of each irrep and of ``key_irreps`` (default: this checkpoint's own key irreps; ``analyze`` passes the
    last checkpoint's, as the Fourier losses use the last checkpoint's key frequencies).

    ``unembed_fve_embed_keys``: unembedding variance in the embedding's key irreps. ``logit_character_fve``: logit
    variance explained by all character templates (Σ similarity²); ``logit_key_fve``: by the embedding's key irreps.
    """
    group = _require_perm(ckpt)
    embed, unembed = (irrep_fve(W, group) for W in _embed_unembed(ckpt, group.order))
    keys = _key_irreps_of(embed, threshold)
    sims = model_logit_similarity(ckpt, group)
    row: dict[str, float] = {}
    for prefix, fve in (("embed_fve", embed), ("unembed_fve", unembed)):
        row.update({f"{prefix}_{name}": v for name, v in fve.items() if name != "trivial"})
    row["n_key_irreps_embed"] = float(len(keys))
    row["n_key_irreps_unembed"] = float(len(_key_irreps_of(unembed, threshold)))
    row["unembed_fve_embed_keys"] = float(sum(unembed[k] for k in keys))
    row.update({f"logit_sim_{name}": v for name, v in sims.items()})
    row["logit_character_fve"] = float(sum(v**2 for v in sims.values()))
    row["logit_key_fve"] = float(sum(sims[k] ** 2 for k in keys))
    row.update(model_restricted_and_excluded_losses(ckpt, group, key_irreps if key_irreps is not None else keys))
    return row


def coset_metrics(ckpt: Checkpoint, n_draws: int = N_BASELINE_DRAWS) -> dict[str, float]:
    """Coset clustering (between/total variance) of the embedding, ``coset_{left|right}_{family}``, and of the
    unembedding, ``unembed_coset_...``, each with its ``..._baseline`` from random labellings seeded by ckpt.seed."""
    group = _require_perm(ckpt)
    embed, unembed = _embed_unembed(ckpt, group.order)
    families = subgroup_families(group)
    row = {f"coset_{k}": v for k, v in coset_scores(embed, group, families, n_draws, ckpt.seed).items()}
    unembed_scores = coset_scores(unembed, group, families, n_draws, ckpt.seed)
    row.update({f"unembed_coset_{k}": v for k, v in unembed_scores.items()})
    return row


def coset_points(ckpt: Checkpoint) -> list[dict]:
    """Per-element 2D points for figures: a t-SNE of the embedding rows, coloured by the left and by the right
    cosets of the point stabilizer of n-1 (and, for S5, of the dihedral subgroup)."""
    from grokinterp.metrics.fourier import tsne_2d

    group = _require_perm(ckpt)
    xy = tsne_2d(ckpt.model.W_E[: group.order], ckpt.seed)
    subgroups = {f"Stab({group.n - 1})": group.point_stabilizer(group.n - 1)}
    if group.n == 5:
        subgroups["D5"] = group.generate(DIHEDRAL_GENERATORS)
    out = []
    for name, subgroup in subgroups.items():
        for side, labels in (("left gH", group.left_cosets(subgroup)), ("right Hg", group.right_cosets(subgroup))):
            out += [{"panel": f"t-SNE of W_E by {side}, H = {name}", "token": g, "x": float(xy[g, 0]),
                     "y": float(xy[g, 1]), "colour": int(labels[g]), "note": f"coset {int(labels[g])}"}
                    for g in range(group.order)]
    return out
