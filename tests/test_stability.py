"""Softmax collapse on hand-built logits whose float32 and float64 roundings are known, and on a model whose logits
are scaled up."""

import pytest
import torch

from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.stability import softmax_collapse_metrics, softmax_collapse_stats
from grokinterp.model import build_model
from grokinterp.tasks import build_task


def test_collapse_in_float32_and_float64_on_known_margins():
    v = 113
    logits = torch.zeros(4, v, dtype=torch.float64)
    logits[0, 0] = 200.0  # exp(−200) = 1.4e-87: 0 in float32, and absorbed by 1 in float64: collapsed in both
    logits[1, 0] = 30.0  # Σ = 1 + 112·9.4e-14: 1 in float32 (eps 1.2e-7), not in float64 (eps 2.2e-16)
    logits[2, 0] = 5.0  # collapsed in neither
    logits[3, 0] = 200.0  # confidently wrong (label 1): its correct-class probability is 0, not 1
    labels = torch.tensor([0, 0, 0, 1])
    row = softmax_collapse_stats(logits, labels)
    assert row["softmax_collapse_f32"] == 0.5 and row["softmax_collapse_f64"] == 0.25
    # exactly-zero gradient entries: row 0 all 113 in float32 (every exp underflows) and its correct class in
    # float64; row 1 its correct class in float32; row 3 its 111 other classes in float32
    assert row["zero_grad_f32"] == pytest.approx((113 + 1 + 0 + 111) / (4 * v), abs=0)
    assert row["zero_grad_f64"] == pytest.approx(1 / (4 * v), abs=0)
    assert row["logit_norm"] == pytest.approx((200 + 30 + 5 + 200) / 4)
    assert row["logit_margin"] == pytest.approx((200 + 30 + 5 - 200) / 4)


def test_scaling_the_unembedding_collapses_a_model_softmax():
    """W_U → αW_U scales the answer logits by α (the model's biases are frozen at zero): large α collapses every
    row the model gets right."""
    from conftest import tiny_config

    cfg = tiny_config()
    data = build_task(cfg.task.op, cfg.task.p, cfg.task.n, cfg.task.frac_train, cfg.task.data_seed)
    model = build_model(cfg.model, data.n_symbols).eval()
    ckpt = Checkpoint(step=0, model=model, data=data, config=cfg)
    base = softmax_collapse_metrics(ckpt)
    assert base["softmax_collapse_f32"] == base["softmax_collapse_f64"] == 0.0  # an initialized model is unsure
    with torch.no_grad():
        model.unembed.W_U.mul_(1e6)
    scaled = softmax_collapse_metrics(ckpt)
    assert scaled == base  # a Checkpoint computes its logits once: new weights need a new Checkpoint
    scaled = softmax_collapse_metrics(Checkpoint(step=0, model=model, data=data, config=cfg))
    assert scaled["logit_norm"] == pytest.approx(1e6 * base["logit_norm"], rel=1e-4)
    assert scaled["logit_margin"] == pytest.approx(1e6 * base["logit_margin"], rel=1e-4)
    logits = model(data.tokens[data.train_idx])[:, -1]
    correct = (logits.argmax(-1) == data.labels[data.train_idx]).double().mean().item()
    assert scaled["softmax_collapse_f32"] == scaled["softmax_collapse_f64"] == pytest.approx(correct)
