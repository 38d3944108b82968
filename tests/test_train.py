import os
import signal

import pytest
import torch
import torch.nn.functional as F

from grokinterp.checkpoints import load_run
from grokinterp.model import answer_logits, build_model
from grokinterp.trainer import batch_indices, learning_rate, train


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics_without_time(run):
    return run.metrics.drop(columns=["time_s"])


def test_tiny_run_memorizes_and_logs_densely(tmp_path, tiny):
    result = train(tiny(), tmp_path / "run", device="cpu", progress=False)
    run = result.run
    assert result.stop_reason == "budget" and result.step == 60
    m = run.metrics
    assert list(m.step) == sorted(set(range(0, 61, 5)) | set(run.steps))  # every eval and every checkpoint
    assert m.train_acc.iloc[-1] == 1.0
    assert m.train_loss.iloc[-1] < 0.1 * m.train_loss.iloc[0]
    assert run.steps[0] == 0 and run.steps[-1] == 60 and len(run.steps) >= 8
    # the logged weight norm is the model's
    model = run.model()
    expected = sum(p.double().pow(2).sum().item() for p in model.parameters())
    assert m.weight_norm_sq.iloc[-1] == pytest.approx(expected, rel=1e-12)
    # the logged accuracy is the model's, recomputed from the checkpoint
    data = run.data
    logits = answer_logits(model, data.tokens[data.val_idx])
    assert m.val_acc.iloc[-1] == pytest.approx((logits.argmax(-1) == data.labels[data.val_idx]).double().mean().item())
    loss = F.cross_entropy(logits.double(), data.labels[data.val_idx]).item()
    assert m.val_loss.iloc[-1] == pytest.approx(loss, rel=1e-5)


def test_biases_stay_frozen_at_zero(tmp_path, tiny):
    run = train(tiny(), tmp_path / "run", device="cpu", progress=False).run
    weights = run.state_dict()
    biases = [k for k in weights if k.rsplit(".", 1)[-1].startswith("b_")]
    assert biases and all((weights[k] == 0).all() for k in biases)
    unfrozen = train(tiny(freeze_biases=False), tmp_path / "run2", device="cpu", progress=False).run
    assert any((unfrozen.state_dict()[k] != 0).any() for k in biases)


def test_initialization_depends_only_on_model_seed():
    from grokinterp.config import ModelConfig

    torch.manual_seed(1)
    a = build_model(ModelConfig(d_model=16, d_head=4, d_mlp=8, model_seed=3), 7).state_dict()
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    b = build_model(ModelConfig(d_model=16, d_head=4, d_mlp=8, model_seed=3), 7).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    c = build_model(ModelConfig(d_model=16, d_head=4, d_mlp=8, model_seed=4), 7).state_dict()
    assert _weights_equal(a, b) and not _weights_equal(a, c)


class Crash(Exception):
    pass


def _crash_at(step):
    def on_step(s):
        if s == step:
            raise Crash

    return on_step


@pytest.mark.parametrize("batch_size", [0, 8])
def test_resumed_run_matches_uninterrupted(tmp_path, tiny, batch_size):
    config = tiny(batch_size=batch_size)
    whole = train(config, tmp_path / "whole", device="cpu", progress=False).run
    with pytest.raises(Crash):
        train(config, tmp_path / "cut", device="cpu", progress=False, on_step=_crash_at(33))
    cut = load_run(tmp_path / "cut")
    assert cut.trainer_state.step < 33  # resumes from the last checkpoint before the crash
    resumed = train(config, tmp_path / "cut", resume=True, device="cpu", progress=False)
    assert resumed.step == 60
    assert _weights_equal(resumed.run.state_dict(60), whole.state_dict(60))
    assert _metrics_without_time(resumed.run).equals(_metrics_without_time(whole))
    for step in whole.steps:
        assert _weights_equal(resumed.run.state_dict(step), whole.state_dict(step)), step


def test_ctrl_c_saves_and_resumes(tmp_path, tiny):
    config = tiny()

    def press_ctrl_c(step):
        if step == 22:
            os.kill(os.getpid(), signal.SIGINT)

    result = train(config, tmp_path / "run", device="cpu", progress=False, on_step=press_ctrl_c)
    assert result.stop_reason == "interrupted" and result.step == 22
    assert 22 in result.run.steps and result.run.trainer_state.step == 22
    assert not result.run.trainer_state.finished
    resumed = train(config, tmp_path / "run", resume=True, device="cpu", progress=False)
    whole = train(config, tmp_path / "whole", device="cpu", progress=False)
    assert _weights_equal(resumed.run.state_dict(60), whole.run.state_dict(60))


def test_resume_can_extend_the_budget(tmp_path, tiny):
    """A 30-step run extended to 60 equals a run given 60 steps from the start, where both schedules checkpoint."""
    short = train(tiny(steps=30), tmp_path / "run", device="cpu", progress=False).run
    short_steps = short.steps
    longer = train(tiny(steps=60), tmp_path / "run", resume=True, device="cpu", progress=False)
    assert longer.step == 60 and longer.run.config.train.steps == 60
    assert longer.run.metrics.step.is_monotonic_increasing and longer.run.metrics.step.is_unique
    whole = train(tiny(steps=60), tmp_path / "whole", device="cpu", progress=False).run
    extended = longer.run
    # the extension keeps the short run's checkpoints and then follows the longer schedule
    assert set(short_steps) | {s for s in whole.steps if s > 30} == set(extended.steps)
    for step in set(whole.steps) & set(extended.steps):
        assert _weights_equal(extended.state_dict(step), whole.state_dict(step)), step
    both = sorted(set(extended.metrics.step) & set(whole.metrics.step))
    assert both[-1] == 60 and len(both) >= 12
    assert _metrics_without_time(extended).loc[both].equals(
        _metrics_without_time(whole).loc[both])


def test_early_stop_after_patience(tmp_path, tiny):
    config = tiny(frac_train=0.9, steps=400, stop_val_acc=0.5, stop_patience=7, eval_every=5)
    result = train(config, tmp_path / "run", device="cpu", progress=False)
    run = result.run
    reached = run.first_step_reaching("val_acc", 0.5)
    assert reached is not None, "the tiny task should pass 50% validation accuracy"
    assert result.stop_reason == "early_stop" and result.step == reached + 7
    assert run.steps[-1] == result.step and run.metrics.step.iloc[-1] == result.step
    assert run.trainer_state.finished


def test_warmup_and_batches():
    from grokinterp.config import TrainConfig

    cfg = TrainConfig(lr=1e-3, warmup_steps=10)
    assert learning_rate(cfg, 1) == pytest.approx(1e-4) and learning_rate(cfg, 10) == 1e-3
    assert learning_rate(cfg, 500) == 1e-3
    assert batch_indices(100, 0, 0, 5) is None and batch_indices(100, 100, 0, 5) is None
    epoch = torch.cat([batch_indices(100, 32, 7, s) for s in range(1, 5)])
    assert sorted(epoch.tolist()) == list(range(100))  # one epoch covers the training set once
    assert torch.equal(batch_indices(100, 32, 7, 6), batch_indices(100, 32, 7, 6))
    assert not torch.equal(batch_indices(100, 32, 7, 1), batch_indices(100, 32, 8, 1))
    assert [len(batch_indices(100, 32, 7, s)) for s in range(1, 6)] == [32, 32, 32, 4, 32]  # a short last batch
    next_epoch = torch.cat([batch_indices(100, 32, 7, s) for s in range(5, 9)])
    assert sorted(next_epoch.tolist()) == list(range(100)) and not torch.equal(next_epoch, epoch)  # reshuffled


def test_a_permutation_task_trains(tmp_path, tiny):
    run = train(tiny(op="perm_conj", n=3, frac_train=0.5, steps=60), tmp_path / "s3", device="cpu",
                progress=False).run
    assert run.data.n_symbols == 6 and run.model().cfg.d_vocab == 7 and run.model().cfg.d_vocab_out == 6
    assert run.metrics.train_acc.iloc[-1] == 1.0


def test_fast_path_trains_the_same_weights_as_the_plain_forward(tmp_path, tiny, monkeypatch, float64_training):
    """The trainer takes the fast path for a 1-layer model and the HookedTransformer forward otherwise, and both
    train the same run. Compared in float64 (the ``float64_training`` fixture): in float32 the two trajectories
    part chaotically once Adam divides a rounding difference by a near-zero gradient, by an amount that depends on
    the CPU (here 2.2e-5 after 30 steps; the same comparison in test_fastpath gave 0.062 on an Intel Xeon). Per step
    the fast path's float32 gradients are as accurate as the plain forward's (test_fastpath checks them against
    float64). Measured in float64 after 60 steps: 2.5e-14."""
    import grokinterp.trainer as trainer

    used = []
    monkeypatch.setattr(trainer, "fast_logits_from_params", lambda p, t, c: used.append(1) or
                        __import__("grokinterp.fastpath").fastpath.fast_logits_from_params(p, t, c))
    fast = train(tiny(), tmp_path / "fast", device="cpu", progress=False).run
    assert used, "a 1-layer model trains through the fast path by default"
    n_fast = len(used)
    plain = train(tiny(fast_path=False), tmp_path / "plain", device="cpu", progress=False).run
    assert len(used) == n_fast
    a, b = fast.state_dict(), plain.state_dict()
    assert a["embed.W_E"].dtype == torch.float64
    worst = max(float((a[k] - b[k]).abs().max()) for k, _ in fast.model().named_parameters())
    print(f"max |Δw| after 60 float64 steps, fast path vs plain forward: {worst:.2g}")
    assert 0 < worst < 1e-10, worst
    assert fast.metrics.train_loss.to_numpy() == pytest.approx(plain.metrics.train_loss.to_numpy(), rel=1e-10)
    assert (fast.metrics.train_acc.values == plain.metrics.train_acc.values).all()
    two_layers = train(tiny(steps=5, n_layers=2), tmp_path / "deep", device="cpu", progress=False)
    assert len(used) == n_fast and two_layers.step == 5  # falls back to the HookedTransformer forward


def test_fast_path_training_is_the_same_maths_in_float64(tiny):
    """In float32 any two summation orders part ways once a rounding flips a ReLU at zero (the plain forward does
    against itself with its rows reordered); in float64 the fast path must track the plain forward for 100 steps."""
    import contextlib
    import io

    from grokinterp.fastpath import fast_answer_logits
    from grokinterp.tasks import build_task

    config = tiny()
    data = build_task("add", 7, 5, 0.6, 0)
    tokens, labels = data.tokens[data.train_idx], data.labels[data.train_idx]
    with contextlib.redirect_stdout(io.StringIO()):
        models = [build_model(config.model, 7).double() for _ in range(2)]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=1.0)
                  for m in models]
    for _ in range(100):
        for model, optimizer, forward in zip(models, optimizers, (answer_logits, fast_answer_logits)):
            loss = F.cross_entropy(forward(model, tokens), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    gap = max(float((p - q).detach().abs().max()) for p, q in zip(*(m.parameters() for m in models)))
    assert gap < 1e-10, gap


def test_cpu_training_uses_deterministic_kernels_and_restores_the_settings(tmp_path, tiny):
    """Deterministic kernels during training (bit-exact resume), without the NaN fill of new tensors (a debugging
    guard that cost ~10% of a step); the caller's settings come back afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    seen = []
    train(tiny(steps=2), tmp_path / "run", device="cpu", progress=False,
          on_step=lambda step: seen.append((torch.are_deterministic_algorithms_enabled(),
                                            torch.utils.deterministic.fill_uninitialized_memory)))
    assert seen == [(True, False)] * 2
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before
