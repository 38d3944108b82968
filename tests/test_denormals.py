"""Denormals are flushed on every thread that trains or analyses, and only values below float32's smallest normal
change: no denormal reaches a matmul of a step whose logits' gradient is full of them, every OpenMP worker is
switched (and switched back), and a run's loss curve is the same with and without the flush."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import grokinterp.denormals as denormals
from grokinterp.config import ModelConfig
from grokinterp.denormals import flush_denormals, thread_mode
from grokinterp.fastpath import fast_answer_logits
from grokinterp.metrics.sharpness import epsilon_sharpness
from grokinterp.model import answer_logits, build_model
from grokinterp.objective import answer_loss
from grokinterp.sweep import train_many
from grokinterp.tasks import build_task
from grokinterp.trainer import train

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.baddbmm.default, torch.ops.aten.addbmm.default, torch.ops.aten.matmul.default}


def denormal_count(t: torch.Tensor) -> int:
    """Entries of a float32 tensor that are denormal, read off the bits (under DAZ a float comparison would see 0)."""
    bits = t.detach().contiguous().view(torch.int32)
    return int(((bits & 0x7F800000) == 0).logical_and_((bits & 0x007FFFFF) != 0).sum())


class MatmulInputs(TorchDispatchMode):
    """Counts denormal entries in the float32 inputs of every matmul dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.matmuls = self.denormals = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.matmuls += 1
            self.denormals += sum(denormal_count(a) for a in args
                                  if isinstance(a, torch.Tensor) and a.dtype == torch.float32)
        return func(*args, **(kwargs or {}))


def worker_survivors() -> int:
    """How many of 2^21 products 1e-30 · 1e-10 (= 1e-40, a denormal) stay non-zero: all of them with no flush, half
    with only the calling thread flushing (the other half runs on the second OpenMP thread), none with every
    thread flushing. Counted on the bits, so the count is not itself subject to the mode."""
    x = torch.full((1 << 21,), 1e-30)
    return int(((x * 1e-10).view(torch.int32) != 0).sum())


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    before = thread_mode()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(all(before))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saturated_model():
    """A model of x+y mod 23 whose unembedding is scaled up until the softmax saturates: many wrong answers get a
    probability around 1e-40, so d(loss)/d(logits) holds many float32 denormals (as after memorization)."""
    data = build_task("add", 23, 5, 0.5, 0)
    model = build_model(ModelConfig(d_model=32, n_heads=2, d_head=16, d_mlp=64), data.n_symbols)
    with torch.no_grad():
        logits = answer_logits(model, data.tokens)
        model.W_U.mul_(60.0 / logits.std().item())  # logits spread over ±200: gaps of 87-104 give denormals
    return model, data.tokens[data.train_idx], data.labels[data.train_idx]


def step_matmul_denormals(model, tokens, labels, forward) -> tuple[int, int]:
    """(matmuls, denormal inputs) of one training step: forward, float64 loss, backward, AdamW update."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1.0)
    with MatmulInputs() as seen:
        loss = answer_loss(forward(model, tokens), labels)
        loss.backward()
        optimizer.step()
    return seen.matmuls, seen.denormals


@pytest.mark.parametrize("forward", [fast_answer_logits, answer_logits], ids=["fast-path", "plain-forward"])
def test_no_denormal_reaches_a_matmul_when_flushing(forward, two_threads):
    model, tokens, labels = saturated_model()
    logits = forward(model, tokens).detach().requires_grad_()
    answer_loss(logits, labels).backward()
    assert denormal_count(logits.grad) > 0.05 * logits.numel()  # the case is denormal-heavy

    matmuls, found = step_matmul_denormals(copy.deepcopy(model), tokens, labels, forward)
    assert matmuls >= 4 and found > 0  # without the flush they reach the backward matmuls (so this test can fail)
    with flush_denormals():
        matmuls, found = step_matmul_denormals(copy.deepcopy(model), tokens, labels, forward)
    assert matmuls >= 4 and found == 0


def test_every_openmp_thread_is_switched_and_switched_back(two_threads):
    torch.set_flush_denormal(False)
    assert worker_survivors() == 1 << 21
    torch.set_flush_denormal(True)
    assert worker_survivors() == 1 << 20  # what torch's own switch does: the calling thread only
    torch.set_flush_denormal(False)
    with flush_denormals():
        assert thread_mode() == (True, True) and worker_survivors() == 0
        torch.set_num_threads(3)  # a worker created inside the block copies the calling thread's mode
        assert worker_survivors() == 0
        with flush_denormals():  # nesting leaves the outer block's mode in place
            pass
        assert worker_survivors() == 0
    assert thread_mode() == (False, False)
    torch.set_num_threads(2)
    assert worker_survivors() == 1 << 21  # every thread has its previous mode back

    torch.set_flush_denormal(True)  # a caller that had switched only its own thread gets exactly that back
    with flush_denormals():
        assert worker_survivors() == 0
    assert thread_mode() == (True, True) and worker_survivors() == 1 << 20


def test_the_private_switch_and_enabled_false_do_nothing(two_threads, monkeypatch):
    torch.set_flush_denormal(False)
    with flush_denormals(enabled=False):
        assert worker_survivors() == 1 << 21
    monkeypatch.setattr(denormals, "_FLUSH", False)
    with flush_denormals():
        assert worker_survivors() == 1 << 21


def test_without_an_openmp_pool_the_calling_thread_still_flushes(two_threads, monkeypatch):
    torch.set_flush_denormal(False)
    monkeypatch.setattr(denormals, "_libgomp", lambda: None)
    with flush_denormals():
        assert thread_mode() == (True, True)
    assert thread_mode() == (False, False)


def test_training_sweeps_and_sharpness_run_with_every_thread_flushing(tmp_path, tiny, two_threads):
    torch.set_flush_denormal(False)
    seen = []

    def record(step):
        seen.append((thread_mode(), worker_survivors()))

    train(tiny(steps=2), tmp_path / "fast", device="cpu", progress=False, on_step=record)
    train(tiny(steps=2, fast_path=False), tmp_path / "plain", device="cpu", progress=False, on_step=record)
    train_many([tiny(steps=2), tiny(steps=2, model_seed=1)], [tmp_path / "s0", tmp_path / "s1"], device="cpu",
               progress=False, on_step=record)
    assert seen == [((True, True), 0)] * 6

    model, tokens, labels = saturated_model()

    def loss_fn(out, labels):
        seen.append((thread_mode(), worker_survivors()))
        return answer_loss(out[:, -1], labels)

    epsilon_sharpness(model, tokens, labels, steps=1, loss_fn=loss_fn)
    assert seen[6:] and all(s == ((True, True), 0) for s in seen[6:])
    assert thread_mode() == (False, False) and worker_survivors() == 1 << 21


def test_the_loss_curve_is_the_same_with_and_without_the_flush(tmp_path, tiny, monkeypatch, one_thread):
    """x+y mod 23 trained without weight decay to a training loss of ~2e-5, where 6% of d(loss)/d(logits) is
    denormal, logs the same losses and accuracies to float32 rounding with and without the flush (measured: equal
    to the last bit): only values below 1.2e-38 change, and Adam's ε keeps a gradient made of them from moving a
    weight. One thread, for speed on a busy machine; the thread test above covers the workers."""
    config = tiny(p=23, steps=300, weight_decay=0.0, eval_every=10, checkpoints=1, log_checkpoints=0)
    flushed = train(config, tmp_path / "flushed", device="cpu", progress=False).run
    monkeypatch.setattr(denormals, "_FLUSH", False)
    kept = train(config, tmp_path / "kept", device="cpu", progress=False).run

    model, data = kept.model(), kept.data
    logits = fast_answer_logits(model, data.tokens[data.train_idx]).detach().requires_grad_()
    answer_loss(logits, data.labels[data.train_idx]).backward()
    assert denormal_count(logits.grad) > 0.02 * logits.numel()  # the run did reach the denormal regime
    a, b = flushed.metrics, kept.metrics
    assert list(a.step) == list(b.step)
    for col in ("train_loss", "val_loss"):
        assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), rel=1e-5), col
    assert list(a.train_acc) == list(b.train_acc) and list(a.val_acc) == list(b.val_acc)
