"""Clock vs Pizza measures on cases with known answers: logits that depend on a − b alone or ignore it, and a
transformer whose attention is uniform (it feeds the sum of the two embeddings forward, so the gradients agree)."""

import math

import pytest
import torch

from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.clock_pizza import clock_pizza_metrics, distance_irrelevance, gradient_symmetricity
from grokinterp.model import build_model
from grokinterp.tasks import build_task


def test_distance_irrelevance_of_known_logits():
    p = 13
    a = torch.arange(p, dtype=torch.float64)[:, None]
    b = torch.arange(p, dtype=torch.float64)[None, :]
    w = 2 * math.pi * 3 / p
    pizza = torch.cos(w * (a - b) / 2).abs().expand(p, p)  # a function of the distance only
    clock = torch.sin(w * (a + b)) + 0.0 * b  # ignores the distance
    assert distance_irrelevance(pizza) == pytest.approx(0.0, abs=1e-12)
    assert distance_irrelevance(clock) == pytest.approx(1.0, abs=1e-12)
    # half of each: q = mean_d std_s / std = sqrt(var_clock) / sqrt(var_clock + var_pizza), the two being uncorrelated
    mixed = pizza + clock
    expected = clock.std(correction=0) / (clock.std(correction=0) ** 2 + pizza.std(correction=0) ** 2).sqrt()
    assert distance_irrelevance(mixed) == pytest.approx(expected.item(), rel=1e-9)
    with pytest.raises(ValueError, match="odd p"):
        distance_irrelevance(torch.zeros(8, 8))


def tiny_add_model(p: int = 11):
    from conftest import tiny_config

    cfg = tiny_config(p=p)
    data = build_task("add", p, cfg.task.n, cfg.task.frac_train, cfg.task.data_seed)
    return cfg, data, build_model(cfg.model, data.n_symbols).to(torch.float64).eval()


def test_uniform_attention_makes_the_gradients_symmetric():
    cfg, data, model = tiny_add_model()
    with torch.no_grad():
        for block in model.blocks:  # W_Q = 0: every score is equal, the pattern is uniform over [a, b, =]
            block.attn.W_Q.zero_()
    tokens = data.tokens[:40]
    outputs = torch.arange(40) % 11
    mean, se = gradient_symmetricity(model, tokens, outputs)
    assert mean == pytest.approx(1.0, abs=1e-12) and se == pytest.approx(0.0, abs=1e-12)
    # an initialized model's attention is nearly uniform, so nearly symmetric; sharp attention is not
    _, _, generic = tiny_add_model()
    near, _ = gradient_symmetricity(generic, tokens, outputs)
    with torch.no_grad():
        for block in generic.blocks:
            block.attn.W_Q.mul_(30.0)
            block.attn.W_K.mul_(30.0)
    sharp, se = gradient_symmetricity(generic, tokens, outputs)
    assert 0.99 < near < 1.0 and sharp < 0.9 and se > 0


def test_clock_pizza_row_and_where_it_applies(tmp_path):
    cfg, data, model = tiny_add_model()
    ckpt = Checkpoint(step=7, model=model, data=data, config=cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    row = clock_pizza_metrics(ckpt, n_triples=64)
    assert set(row) == {"gradient_symmetricity", "gradient_symmetricity_se", "distance_irrelevance"}
    assert -1 <= row["gradient_symmetricity"] <= 1 and 0 <= row["distance_irrelevance"] <= 1.0 + 1e-12
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert clock_pizza_metrics(ckpt, n_triples=64) == row  # seeded by (seed, step)

    from conftest import tiny_config

    from grokinterp.analyze import metrics_for
    from grokinterp.checkpoints import load_run
    from grokinterp.cli import main
    from grokinterp.trainer import train

    path = tmp_path / "sub"
    train(tiny_config(op="sub", p=7, steps=4, checkpoints=2, log_checkpoints=0), path, device="cpu", progress=False)
    assert "clock-pizza" not in metrics_for(load_run(path))
    assert main(["analyze", str(path), "--metric", "clock-pizza", "--out", str(tmp_path / "a")]) == 2
