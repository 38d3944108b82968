import math

import pytest
import torch

from grokinterp.metrics.fourier import (
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
    score, i, j = circle_score(E, k)
    assert score > 0.999 and (i, j) == (0, 1)
    assert circle_score(E, k % ((p - 1) // 2) + 1)[0] < 0.05  # the wrong frequency does not fit


def test_random_embeddings_score_low():
    p = 23
    E = torch.randn(p, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    power = frequency_power(E)
    assert len(key_frequencies(power)) >= 8  # power is spread over most of the 11 frequencies
    assert inverse_participation_ratio(power) < 0.2
    assert top_k_fraction(power, 1) < 0.3
    assert max(circle_score(E, k)[0] for k in range(1, 12)) < 0.5


def test_a_few_frequencies_are_all_key():
    p = 23
    E = torch.cat([circle_embedding(p, 3, seed=1, radius=2.0), circle_embedding(p, 8, seed=2)], dim=1)
    power = frequency_power(E)
    assert key_frequencies(power) == [3, 8]
    assert power[2] / power[7] == pytest.approx(4.0)
    assert inverse_participation_ratio(power) == pytest.approx((16 + 1) / 25)
    assert circle_score(E, 3)[0] > 0.999 and circle_score(E, 8)[0] > 0.999


def test_neurons_of_one_frequency():
    p, k = 13, 4
    w = 2 * math.pi * k / p
    a = torch.arange(p, dtype=torch.float64)[:, None]
    b = torch.arange(p, dtype=torch.float64)[None, :]
    pure = torch.relu(torch.cos(w * (a + b)) + 0.3)  # relu of a frequency-k function: harmonics of k appear
    mixed = torch.cos(w * a) + torch.cos(2 * math.pi * 2 * b / p)
    fractions = neuron_frequency_fractions(torch.stack([torch.cos(w * (a + b)), mixed, pure], dim=2))
    assert fractions[0, k - 1] == pytest.approx(1.0)
    assert fractions[1].max() == pytest.approx(0.5)
    assert fractions.sum(dim=1).le(1 + 1e-9).all()


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
