"""Fourier analysis of mod-p models (Nanda et al. 2023; Gromov 2023).

The Fourier basis over p tokens has orthonormal rows ``1/√p``, ``√(2/p) cos(w_k i)``, ``√(2/p) sin(w_k i)`` for
``k = 1..⌊(p-1)/2⌋`` with ``w_k = 2πk/p`` (and ``cos(π i)/√p`` when p is even). "Power at frequency k" of a matrix
whose rows are tokens is the squared norm of its cos_k and sin_k coefficient rows.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from grokinterp.metrics.base import Checkpoint, fast_forward_applies

KEY_POWER_FRACTION = 0.9  # key frequencies: the fewest, strongest first, that hold 90% of the non-constant power
NEURON_EXPLAINED = 0.85  # a neuron is "explained by one frequency" above this fraction of its variance (Nanda)
MAX_KEY_FREQS = 10  # restricted/excluded losses use at most this many frequencies


def fourier_basis(p: int) -> tuple[Float[torch.Tensor, "p p"], list[str]]:
    """Orthonormal Fourier basis (rows) over p tokens and the rows' names ('const', 'cos 1', 'sin 1', ...)."""
    i = torch.arange(p, dtype=torch.float64)
    rows, names = [torch.full((p,), 1 / math.sqrt(p), dtype=torch.float64)], ["const"]
    for k in range(1, (p - 1) // 2 + 1):
        w = 2 * math.pi * k / p
        rows += [torch.cos(w * i), torch.sin(w * i)]
        names += [f"cos {k}", f"sin {k}"]
    if p % 2 == 0:
        rows.append(torch.cos(math.pi * i))
        names.append(f"cos {p // 2}")
    basis = torch.stack(rows)
    return basis / basis.norm(dim=1, keepdim=True), names


def n_frequencies(p: int) -> int:
    return p // 2


def frequency_power(W: Float[torch.Tensor, "p d"]) -> Float[torch.Tensor, " n_freq"]:
    """Power of each frequency k = 1..p//2 in a matrix whose rows are the p tokens (constant term dropped)."""
    p = W.shape[0]
    basis, _ = fourier_basis(p)
    coeffs = basis @ W.to(torch.float64)
    power = coeffs.pow(2).sum(dim=1)
    freq = torch.zeros(n_frequencies(p), dtype=torch.float64)
    k_of_row = torch.tensor([0] + [(r + 1) // 2 for r in range(1, p)], dtype=torch.long)
    freq.index_add_(0, k_of_row[1:] - 1, power[1:])
    return freq


def key_frequencies(power: Float[torch.Tensor, " n_freq"], fraction: float = KEY_POWER_FRACTION) -> list[int]:
    """The fewest frequencies (1-based, strongest first) holding ``fraction`` of the total power."""
    order = torch.argsort(power, descending=True)
    cumulative = torch.cumsum(power[order], 0) / power.sum().clamp_min(1e-300)
    n = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)).item()) + 1
    return [int(k) + 1 for k in order[: min(n, len(order))]]


def top_k_fraction(power: Float[torch.Tensor, " n_freq"], k: int) -> float:
    """Fraction of the power in the k strongest frequencies."""
    return float(power.sort(descending=True).values[:k].sum() / power.sum().clamp_min(1e-300))


def inverse_participation_ratio(power: Float[torch.Tensor, " n_freq"]) -> float:
    """IPR = Σ|F_k|⁴ / (Σ|F_k|²)² with |F_k|² the power: 1 for one frequency, 1/n for n equal ones."""
    return float(power.pow(2).sum() / power.sum().pow(2).clamp_min(1e-300))


def neuron_frequency_fractions(acts: Float[torch.Tensor, "p p d_mlp"]) -> Float[torch.Tensor, "d_mlp n_freq"]:
    """For each neuron, the fraction of its (non-constant) variance over the (a, b) grid carried by 2D Fourier
    terms built from frequency k alone: {1, cos_k, sin_k}(a) × {1, cos_k, sin_k}(b) minus the constant.

    The transform and its squares run in the activations' own precision (float32 activations carry ~1e-7 relative
    error already; the fractions then differ from a float64 transform by ~1e-7, in a third of the time), the sums
    in float64; every frequency's 3 × 3 block is gathered at once."""
    p = acts.shape[0]
    dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32
    basis = fourier_basis(p)[0].to(dtype)
    acts = acts.to(dtype)
    n_neurons = acts.shape[2]
    over_a = (basis @ acts.reshape(p, -1)).reshape(p, p, n_neurons)  # [i, b, n]: transform a (two matmuls,
    power = (over_a.permute(0, 2, 1) @ basis.T).square()  # [i, n, j]; the 3-operand einsum was 30x slower)
    constant = power[0, :, 0].double()
    total = power.sum(dim=(0, 2), dtype=torch.float64) - constant
    # the rows {const, cos k, sin k} of each frequency k (an even p's k = p/2 has no sine: its third row is masked)
    ks = torch.arange(1, n_frequencies(p) + 1)
    rows = torch.stack([torch.zeros_like(ks), 2 * ks - 1, (2 * ks).clamp_max(p - 1)], dim=1)  # [k, 3]
    real = torch.stack([torch.ones_like(ks), torch.ones_like(ks), (2 * ks < p).long()], dim=1).to(power.dtype)
    blocks = power[rows[:, :, None], :, rows[:, None, :]] * (real[:, :, None] * real[:, None, :])[..., None]
    return ((blocks.sum(dim=(1, 2), dtype=torch.float64) - constant) / total.clamp_min(1e-300)).T  # [n, k]


def _key_direction_basis(p: int, freqs: list[int]) -> Float[torch.Tensor, "p_sq n_dirs"]:
    """Orthonormal columns cos(w_k(a+b)), sin(w_k(a+b)) over the p² pairs (a, b), a-major."""
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    cols = []
    for k in freqs:
        w = 2 * math.pi * k / p
        cols += [torch.cos(w * (a + b)), torch.sin(w * (a + b))]
    q, _ = torch.linalg.qr(torch.stack(cols, dim=1))
    return q


def restricted_and_excluded_loss(
    logits: Float[torch.Tensor, "p_sq p"],
    labels: Int[torch.Tensor, " p_sq"],
    train_rows: Int[torch.Tensor, " n_train"],
    freqs: list[int],
) -> tuple[float, float]:
    """Nanda et al.'s progress measures, for logits over all p² pairs (a-major rows).

    Restricted loss: keep only the components of the logits along cos(w_k(a+b)), sin(w_k(a+b)) for the key
    frequencies, plus each output's mean over pairs; cross-entropy over all pairs. Excluded loss: remove those
    components; cross-entropy on the training pairs."""
    p = logits.shape[1]
    logits = logits.to(torch.float64)
    q = _key_direction_basis(p, freqs)
    mean = logits.mean(dim=0, keepdim=True)
    centred = logits - mean
    along = q @ (q.T @ centred)
    restricted = F.cross_entropy(along + mean, labels).item()
    excluded = F.cross_entropy((logits - along)[train_rows], labels[train_rows]).item()
    return restricted, excluded


def fourier_plane_basis(E: Float[torch.Tensor, "p d"], k: int) -> Float[torch.Tensor, "d 2"]:
    """An orthonormal basis (columns) of the Fourier plane of frequency k in embedding space: the span of the
    centred embedding's components C_k = Σ_x cos(w_k x) E_x and S_k = Σ_x sin(w_k x) E_x (w_k = 2πk/p), the first
    column along C_k. A column is 0 where the span has fewer dimensions: one where C_k and S_k are parallel (or
    k = p/2, where sin vanishes), both where the embedding has no power at k. Each frequency has its own plane,
    so circles of equal radius at other frequencies cannot mix into it the way they mix into tied principal
    components."""
    p, d = E.shape
    centred = E.to(torch.float64) - E.to(torch.float64).mean(dim=0, keepdim=True)
    w = 2 * math.pi * k / p * torch.arange(p, dtype=torch.float64)
    components = torch.stack([torch.cos(w), torch.sin(w)]) @ centred  # [2, d]: C_k, S_k
    _, s, vh = torch.linalg.svd(components, full_matrices=False)
    total = centred.square().sum()
    rank = int((s.square() > 1e-20 * max(float(total), 1e-300) * p).sum())  # rounding noise is not a direction
    basis = torch.zeros(d, 2, dtype=torch.float64)
    if rank == 2:
        basis = torch.linalg.qr(components.T).Q  # Gram-Schmidt of (C_k, S_k): well conditioned at full rank
    elif rank == 1:
        basis[:, 0] = vh[0]
    return basis


def fourier_plane(E: Float[torch.Tensor, "p d"], k: int) -> Float[torch.Tensor, "p 2"]:
    """Coordinates of the centred rows in the Fourier plane of frequency k (``fourier_plane_basis``)."""
    centred = E.to(torch.float64) - E.to(torch.float64).mean(dim=0, keepdim=True)
    return centred @ fourier_plane_basis(E, k)


def circle_fit(coords: Float[torch.Tensor, "p 2"], k: int) -> float:
    """The fraction of Σ_x |z_x|² captured by the best circle a·e^{±i w_k x} through 2D points z_x:
    max(|Σ z_x e^{−i w_k x}|², |Σ z_x e^{i w_k x}|²) / (p Σ|z_x|²).

    1 exactly when the points lie on a circle centred at the origin, traversed in the order x ↦ kx mod p; ½ for
    points on a line, z_x ∝ cos(w_k x + φ) (half a circle each way); 0 for no points off the origin."""
    p = coords.shape[0]
    z = torch.complex(coords[:, 0], coords[:, 1])
    phase = torch.exp(-2j * math.pi * k * torch.arange(p, dtype=torch.float64) / p)
    norm = z.abs().pow(2).sum()
    if float(norm) == 0.0:
        return 0.0
    return float(max((z * phase).sum().abs().pow(2), (z * phase.conj()).sum().abs().pow(2)) / (p * norm))


def circle_score(E: Float[torch.Tensor, "p d"], k: int) -> float:
    """How well the tokens sit on a circle in the order 2πkx/p, in the Fourier plane of k (``fourier_plane``):
    ``circle_fit`` of the rows' coordinates there.

    A perfect circle at k scores 1 whatever its radius and whatever other frequencies do in directions orthogonal
    to it; power of other frequencies inside the plane lowers it. Random embeddings score well above 0, since
    the plane is the one where the rows' k-th component is largest: ``circle_chance`` measures that level."""
    return circle_fit(fourier_plane(E, k), k)


CHANCE_DRAWS = 64  # random embeddings behind each run's chance level (its standard error is ~1% of it)


def circle_chance(p: int, d: int, freqs: list[int], draws: int = CHANCE_DRAWS, seed: int = 0) -> tuple[float, float]:
    """The circle score of random embeddings of the run's shape: rows E_x ~ N(0, I_d), p of them, scored at each
    of ``freqs``; (mean, standard deviation of one embedding's score) over ``draws`` seeded draws.

    It depends on p and d, hardly on k: about d / (d + p) (0.53 at p = 113, d = 128), since the plane is fitted
    to the rows' own k-th component, which puts about d units of variance along it against about p from the other
    frequencies. A trained embedding's score means something only well above it (a few standard deviations)."""
    return _circle_chance(p, d, tuple(freqs), draws, seed)


@functools.lru_cache(maxsize=64)  # the same for every checkpoint of a run: computed once per process
def _circle_chance(p: int, d: int, freqs: tuple[int, ...], draws: int, seed: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.tensor([circle_score(torch.randn(p, d, generator=g, dtype=torch.float64), k)
                           for _ in range(draws) for k in freqs], dtype=torch.float64)
    return float(scores.mean()), float(scores.std()) if len(scores) > 1 else 0.0


def embedding_key_frequencies(ckpt: Checkpoint) -> list[int]:
    """Key frequencies of the checkpoint's token embedding W_E (at most MAX_KEY_FREQS)."""
    p = _require_mod(ckpt)
    return key_frequencies(frequency_power(ckpt.model.W_E[:p].detach().cpu()))[:MAX_KEY_FREQS]


def _require_mod(ckpt: Checkpoint) -> int:
    from grokinterp.tasks import OPERATIONS

    op = OPERATIONS[ckpt.config.task.op]
    if op.family != "mod":
        raise ValueError(f"the fourier metrics need a mod-p task; run's task is {op.name} ({op.formula})")
    return ckpt.config.task.p


def all_pair_rows(ckpt: Checkpoint) -> Int[torch.Tensor, " p_sq"] | None:
    """Row of each (a, b) pair in a-major order, if the table has all p² pairs (not for division)."""
    p = ckpt.data.n_symbols
    if len(ckpt.data.labels) != p * p:
        return None
    tokens = ckpt.data.tokens
    order = torch.argsort(tokens[:, 0] * p + tokens[:, 1])
    return order


def mlp_activations(ckpt: Checkpoint, rows: torch.Tensor) -> Float[torch.Tensor, "n_examples d_mlp"] | None:
    """Post-activation of the first MLP at the answer position, for the given table rows."""
    if ckpt.model.cfg.attn_only:
        return None
    name = "blocks.0.mlp.hook_post"
    _, cache = ckpt.model.run_with_cache(ckpt.data.tokens[rows], names_filter=lambda n: n == name)
    return cache[name][:, -1, :]


def _logits_and_mlp_activations(ckpt: Checkpoint, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The answer logits and ``mlp_activations`` of the given rows: where the fast path applies, the logits the
    checkpoint shares between metrics (``Checkpoint.table_logits``) and the activations by the fast path; else both
    from one forward pass of the model."""
    tokens = ckpt.data.tokens[rows]
    if ckpt.model.cfg.attn_only:
        return ckpt.table_logits[rows], None
    if fast_forward_applies(ckpt.model, tokens):
        from grokinterp.fastpath import answer_mlp_post

        return ckpt.table_logits[rows], answer_mlp_post(ckpt.model, tokens)
    name = "blocks.0.mlp.hook_post"
    logits, cache = ckpt.model.run_with_cache(ckpt.data.tokens[rows], names_filter=lambda n: n == name)
    return logits[:, -1, :], cache[name][:, -1, :]


@torch.no_grad()
def fourier_metrics(ckpt: Checkpoint, key_freqs: list[int] | None = None) -> dict[str, float | int]:
    """Fourier power of the embedding (W_E) and unembedding (W_U), sparsity, neurons explained by one frequency,
    and the restricted/excluded losses for ``key_freqs`` (default: this checkpoint's own key frequencies)."""
    p = _require_mod(ckpt)
    model = ckpt.model
    embed_power = frequency_power(model.W_E[:p].detach().cpu())
    unembed_power = frequency_power(model.W_U.detach().cpu().T)
    own_keys = key_frequencies(embed_power)
    row: dict[str, float | int] = {
        "embed_n_key_freqs": len(own_keys),
        "embed_top1_freq": own_keys[0],
        "embed_top5_fraction": top_k_fraction(embed_power, 5),
        "embed_ipr": inverse_participation_ratio(embed_power),
        "unembed_n_key_freqs": len(key_frequencies(unembed_power)),
        "unembed_top5_fraction": top_k_fraction(unembed_power, 5),
        "unembed_ipr": inverse_participation_ratio(unembed_power),
    }
    keys = (key_freqs or own_keys)[:MAX_KEY_FREQS]
    row["key_freqs_power_fraction"] = float(embed_power[[k - 1 for k in keys]].sum() / embed_power.sum())
    rows = all_pair_rows(ckpt)
    if rows is not None:
        logits, acts = _logits_and_mlp_activations(ckpt, rows)  # one forward for both
        labels = ckpt.data.labels[rows]
        position = torch.empty_like(rows)
        position[rows] = torch.arange(len(rows), device=rows.device)
        train_rows = position[ckpt.data.train_idx]
        row["restricted_loss"], row["excluded_loss"] = restricted_and_excluded_loss(
            logits.cpu(), labels.cpu(), train_rows.cpu(), keys)
        if acts is not None:
            fractions = neuron_frequency_fractions(acts.cpu().reshape(p, p, -1))
            row["neurons_explained_one_freq"] = float((fractions.max(dim=1).values >= NEURON_EXPLAINED).double().mean())
    for k in range(1, n_frequencies(p) + 1):
        row[f"embed_power_k{k}"] = float(embed_power[k - 1] / embed_power.sum())
    return row


@torch.no_grad()
def circle_metrics(ckpt: Checkpoint, key_freqs: list[int] | None = None) -> dict[str, float]:
    """Circle score of the embedding in the Fourier plane of each key frequency (default: this checkpoint's own),
    with the chance level of random embeddings of the same shape (``circle_chance``) beside it."""
    p = _require_mod(ckpt)
    E = ckpt.model.W_E[:p].detach().cpu()
    freqs = key_freqs or embedding_key_frequencies(ckpt)
    scores = {k: circle_score(E, k) for k in freqs}
    row = {f"circle_k{k}": s for k, s in scores.items()}
    row["circle_mean"] = float(np.mean(list(scores.values())))
    row["circle_max"] = float(max(scores.values()))
    row["circle_chance"], row["circle_chance_sd"] = circle_chance(p, E.shape[1], freqs)
    return row


def tsne_2d(X: Float[torch.Tensor, "rows d"], seed: int) -> Float[np.ndarray, "rows 2"]:
    """A seeded 2D t-SNE of the rows (perplexity scaled to the number of rows)."""
    from sklearn.manifold import TSNE

    rows = X.shape[0]
    tsne = TSNE(n_components=2, perplexity=float(min(30, max(2, rows // 4))), random_state=seed, init="pca")
    return tsne.fit_transform(X.detach().cpu().double().numpy())


@torch.no_grad()
def circle_points(ckpt: Checkpoint, key_freqs: list[int] | None = None, max_panels: int = 4) -> list[dict]:
    """Per-token 2D points for figures: the embedding in the Fourier plane of each key frequency (coloured by
    k·x mod p, so a circle shows a rainbow in order), and a t-SNE of the output-layer rows (W_U columns) as in
    Power et al."""
    p = _require_mod(ckpt)
    E = ckpt.model.W_E[:p].detach().cpu()
    out = []
    for k in (key_freqs or embedding_key_frequencies(ckpt))[:max_panels]:
        coords = fourier_plane(E, k)
        score = circle_fit(coords, k)
        for x in range(p):
            out.append({"panel": f"W_E circle, k={k}", "token": x, "x": float(coords[x, 0]),
                        "y": float(coords[x, 1]), "colour": (k * x) % p,
                        "note": f"Fourier plane of k={k}, circle score {score:.2f}"})
    xy = tsne_2d(ckpt.model.W_U.T, ckpt.seed)
    out += [{"panel": "t-SNE of W_U columns", "token": x, "x": float(xy[x, 0]), "y": float(xy[x, 1]), "colour": x,
             "note": "coloured by token"} for x in range(p)]
    return out
