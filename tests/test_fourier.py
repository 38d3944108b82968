import math

import pytest
import torch

from grokinterp.metrics.fourier import (
    circle_chance,
    circle_fit,
    circle_score,
    fourier_basis,
    frequency_power,
    inverse_participation_ratio,
    key_frequencies,
    neuron_frequency_fractions,
    restricted_and_excluded_loss,
    top_k_fraction,
)


def circle_embedding(p: int, k: int, d: int = 16, seed: int = 0, radius: float = 1.0) -> torch.Tensor:
    """Tokens on a circle of frequency k, embedded in d dimensions by a random orthonormal pair of directions."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    x = torch.arange(p, dtype=torch.float64)
    w = 2 * math.pi * k / p
    return radius * torch.stack([torch.cos(w * x), torch.sin(w * x)], dim=1) @ q.T


@pytest.mark.parametrize("p", [5, 8, 13, 23])
def test_basis_is_orthonormal(p):
    basis, names = fourier_basis(p)
    assert basis.shape == (p, p) and len(names) == p
    assert torch.allclose(basis @ basis.T, torch.eye(p, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("p, k", [(13, 1), (13, 5), (23, 7), (23, 11)])
def test_circle_of_frequency_k_is_found_at_k(p, k):
    E = circle_embedding(p, k)
    power = frequency_power(E)
    assert int(power.argmax()) + 1 == k
    assert power[k - 1] / power.sum() > 0.999
    assert key_frequencies(power) == [k]
    assert inverse_participation_ratio(power) == pytest.approx(1.0)
    assert circle_score(E, k) == pytest.approx(1.0, abs=1e-12)
    assert circle_score(E, k % ((p - 1) // 2) + 1) == 0.0  # the wrong frequency has no plane at all


def test_random_embeddings_score_low():
    p = 23
    E = torch.randn(p, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    power = frequency_power(E)
    assert len(key_frequencies(power)) >= 8  # power is spread over most of the 11 frequencies
    assert inverse_participation_ratio(power) < 0.2
    assert top_k_fraction(power, 1) < 0.3
    # well below a circle, at the chance level of random embeddings of this shape (their mean score ± one sd)
    chance, sd = circle_chance(p, 128, list(range(1, 12)))
    assert max(abs(circle_score(E, k) - chance) for k in range(1, 12)) < 3 * sd and chance + 3 * sd < 0.95


def test_a_few_frequencies_are_all_key():
    p = 23
    E = torch.cat([circle_embedding(p, 3, seed=1, radius=2.0), circle_embedding(p, 8, seed=2)], dim=1)
    power = frequency_power(E)
    assert key_frequencies(power) == [3, 8]
    assert power[2] / power[7] == pytest.approx(4.0)
    assert inverse_participation_ratio(power) == pytest.approx((16 + 1) / 25)
    assert circle_score(E, 3) == pytest.approx(1.0) and circle_score(E, 8) == pytest.approx(1.0)


def test_equal_radius_circles_each_score_one_in_their_own_plane():
    """Four exact circles at k = 14, 35, 41, 52 (p = 113) in orthogonal planes: equal radii tie the principal
    components, which then mix the circles; each frequency's own Fourier plane does not."""
    p, freqs = 113, [14, 35, 41, 52]
    q, _ = torch.linalg.qr(torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = torch.arange(p, dtype=torch.float64)

    def embedding(radii):
        return sum(r * torch.stack([torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)], 1)
                   @ q[:, 2 * i:2 * i + 2].T for i, (k, r) in enumerate(zip(freqs, radii)))

    for radii in ([1.0, 0.9, 0.8, 0.7], [1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 1.0, 0.01]):
        assert [circle_score(embedding(radii), k) for k in freqs] == pytest.approx([1.0] * 4, abs=1e-12)
    # a translated embedding scores the same (the rows are centred)
    assert circle_score(embedding([1.0] * 4) + 5.0, 14) == pytest.approx(1.0, abs=1e-12)


def test_circle_fit_of_known_shapes():
    p, k, j = 23, 4, 9
    x = torch.arange(p, dtype=torch.float64)
    w, v = 2 * math.pi * k / p, 2 * math.pi * j / p
    # another frequency inside the plane: z = e^{iw_k x} + ½e^{iw_j x} keeps 1 / (1 + ¼) of Σ|z|² on the circle
    mixed = torch.stack([torch.cos(w * x) + 0.5 * torch.cos(v * x), torch.sin(w * x) + 0.5 * torch.sin(v * x)], 1)
    assert circle_score(mixed, k) == pytest.approx(0.8, abs=1e-12)
    # a line, z ∝ cos(w_k x + φ): half a circle each way; and an ellipse of axes a, b: max(a+b)² / (2(a² + b²))
    assert circle_score(torch.cos(w * x + 0.3)[:, None] * torch.tensor([[1.0, 2.0]]), k) == pytest.approx(0.5)
    ellipse = torch.stack([2 * torch.cos(w * x), torch.sin(w * x)], 1)
    assert circle_score(ellipse, k) == pytest.approx(9 / 10)
    # traversed backwards (x ↦ −kx) is the same circle; no points off the origin score 0
    assert circle_fit(torch.stack([torch.cos(w * x), -torch.sin(w * x)], 1), k) == pytest.approx(1.0)
    assert circle_fit(torch.zeros(p, 2, dtype=torch.float64), k) == 0.0


def test_chance_level_follows_the_shape_not_the_seed():
    """Random embeddings score about d / (d + p) in the plane fitted to their own k-th component."""
    for p, d in ((113, 128), (23, 16), (113, 512)):
        chance, sd = circle_chance(p, d, [3, 7])
        assert chance == pytest.approx(d / (d + p), rel=0.1) and 0 < sd < 0.1
    assert circle_chance(23, 16, [3]) == circle_chance(23, 16, [3])  # seeded
    other, _ = circle_chance(23, 16, [3], seed=1)
    assert other != circle_chance(23, 16, [3])[0] and other == pytest.approx(circle_chance(23, 16, [3])[0], rel=0.1)


def test_neurons_of_one_frequency():
    p, k = 13, 4
    w = 2 * math.pi * k / p
    a = torch.arange(p, dtype=torch.float64)[:, None]
    b = torch.arange(p, dtype=torch.float64)[None, :]
    pure = torch.relu(torch.cos(w * (a + b)) + 0.3)  # relu of a frequency-k function: harmonics of k appear
    mixed = torch.cos(w * a) + torch.cos(2 * math.pi * 2 * b / p)
    acts = torch.stack([torch.cos(w * (a + b)), mixed, pure], dim=2)
    fractions = neuron_frequency_fractions(acts)
    assert fractions[0, k - 1] == pytest.approx(1.0)
    assert fractions[1].max() == pytest.approx(0.5)
    assert fractions.sum(dim=1).le(1 + 1e-9).all()
    # float32 activations are transformed in float32: the same fractions to float32 rounding
    assert (neuron_frequency_fractions(acts.float()) - fractions).abs().max() < 1e-5


def test_restricted_loss_of_the_clock_algorithm():
    """Logits ∝ cos(w_k(a+b-c)) (Nanda's algorithm) live entirely on the key directions."""
    p, keys = 13, [2, 5]
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    c = torch.arange(p, dtype=torch.float64)
    labels = (a + b) % p
    logits = sum(torch.cos(2 * math.pi * k / p * ((a + b)[:, None] - c[None, :])) for k in keys) * 20.0
    train = torch.arange(0, p * p, 3)
    restricted, excluded = restricted_and_excluded_loss(logits, labels, train, keys)
    full = torch.nn.functional.cross_entropy(logits, labels).item()
    assert restricted == pytest.approx(full, rel=1e-9)
    assert excluded == pytest.approx(math.log(p), rel=1e-9)  # nothing left: uniform logits
    wrong = restricted_and_excluded_loss(logits, labels, train, [1])
    assert wrong[0] == pytest.approx(math.log(p), rel=1e-6) and wrong[1] == pytest.approx(full, rel=1e-6)


def test_fourier_row_by_the_fast_path_is_the_models_own(monkeypatch):
    """The fourier metric takes its logits and MLP activations from the fast path where it applies: in float64 its
    row equals the one from the model's own forward."""
    from conftest import tiny_config

    import grokinterp.metrics.base as base
    import grokinterp.metrics.fourier as fourier
    from grokinterp.metrics.base import Checkpoint
    from grokinterp.model import build_model
    from grokinterp.tasks import build_task

    cfg = tiny_config(p=11)
    data = build_task("add", 11, 5, 0.5, 0)
    model = build_model(cfg.model, data.n_symbols).to(torch.float64).eval()
    ckpt = Checkpoint(step=0, model=model, data=data, config=cfg)
    assert base.fast_forward_applies(model, data.tokens)
    fast = fourier.fourier_metrics(ckpt)
    monkeypatch.setattr(fourier, "fast_forward_applies", lambda m, t: False)
    monkeypatch.setattr(base, "fast_forward_applies", lambda m, t: False)
    slow = fourier.fourier_metrics(ckpt)
    assert fast == pytest.approx(slow, rel=1e-10, abs=1e-12)
