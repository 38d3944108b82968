"""Each intervention of ``grokinterp.interventions`` (and the StableMax loss of ``grokinterp.objective``) against a
case whose answer is known: one hand-computed step, a formula fed chosen gradients, a bit-exact resume, and a
stack whose members each match a lone run."""

import contextlib
import io
import logging
import math

import pytest
import torch

from grokinterp.checkpoints import load_run
from grokinterp.cli import main
from grokinterp.config import ConfigError
from grokinterp.interventions import (
    GRAD_NOISE,
    UPDATE_NOISE,
    WEIGHT_NOISE,
    Interventions,
    dropout_hooks,
    gaussian_like,
    generator,
)
from grokinterp.model import answer_logits, build_model
from grokinterp.objective import answer_loss, row_losses, stablemax_log_probs
from grokinterp.sweep import train_many
from grokinterp.tasks import build_task
from grokinterp.trainer import ModelStack, train

WEIGHT_TOL = 1e-9  # float64 trajectories of two implementations of one step (see test_sweep)


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _is_weight(name: str, tensor: torch.Tensor) -> bool:
    """Not a buffer (the causal mask, attention's -inf fill value)."""
    return tensor.is_floating_point() and tensor.numel() > 0 and not name.endswith("IGNORE")


def _max_diff(a: dict, b: dict) -> float:
    """Largest entry-wise gap over the weights."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if _is_weight(k, a[k]))


# -- bad values: one line, exit 2, nothing written -----------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--weight-noise", "-0.1"], "--weight-noise must be >= 0 and finite, got -0.1"),
    (["--update-noise", "inf"], "--update-noise must be >= 0 and finite"),
    (["--grad-noise", "-1"], "--grad-noise must be >= 0 and finite"),
    (["--dropout", "1"], "--dropout must lie in [0, 1), got 1.0"),
    (["--attn-dropout", "-0.2"], "--attn-dropout must lie in [0, 1)"),
    (["--loss", "hinge"], "unknown --loss 'hinge'; choose one of: ce, stablemax"),
    (["--wd-target", "middle"], "unknown --wd-target 'middle'; choose one of: origin, init"),
    (["--grokfast", "fft"], "unknown --grokfast 'fft'; choose one of: none, ema, ma"),
    (["--grokfast-alpha", "1"], "--grokfast-alpha must lie in [0, 1)"),
    (["--grokfast-window", "0"], "--grokfast-window must be at least 1"),
    (["--norm-scale", "-2"], "--norm-scale must be >= 0 and finite"),
])
def test_bad_intervention_values_are_one_line_exit_2(tmp_path, capsys, flags, message):
    argv = ["train", "--preset", "quick", "--p", "7", "--steps", "5", "--out", str(tmp_path), "--name", "r",
            "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_every_intervention_is_a_documented_flag(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, words in [("--loss", "stablemax"), ("--wd-target", "step-0 weights"), ("--weight-noise", "before"),
                        ("--update-noise", "after each update"), ("--grad-noise", "gradient"),
                        ("--dropout", "residual stream"), ("--attn-dropout", "attention pattern"),
                        ("--grokfast", "Lee et al."), ("--orthograd", "Prieto et al."), ("--norm-scale", "Omnigrok")]:
        assert flag in text and words in text, flag


# -- one step by hand --------------------------------------------------------------------------------------------
def _by_hand(config, *, weight_noise=0.0, grad_noise=0.0, update_noise=0.0, wd_init=0.0, wd_origin=0.0):
    """Weights after one SGD step (its first step: momentum has nothing to add), computed from scratch in float64:
    w₁ = w₀ − lr·(∇L(w₀ + σ_w·ε₁) + σ_g·ε₂ + wd·(w₀ − target)) + σ_u·ε₃, with ε drawn as the trainer draws them;
    the target is w₀ itself for decay toward the initialization (no pull on the first step), 0 for the origin."""
    t = config.task
    data = build_task(t.op, t.p, t.n, t.frac_train, t.data_seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = build_model(config.model, data.n_symbols).to(torch.float64)
    seed, lr = config.model.model_seed, config.train.lr
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    names = list(trainable)

    def draws(stream):
        return dict(zip(names, (e[0] for e in gaussian_like([p.unsqueeze(0) for p in trainable.values()], [seed],
                                                             1, stream))))

    with torch.no_grad():
        for n, eps in draws(WEIGHT_NOISE).items():
            trainable[n].add_(weight_noise * eps)
    rows = data.train_idx
    answer_loss(answer_logits(model, data.tokens[rows]), data.labels[rows]).backward()
    g_noise, u_noise = draws(GRAD_NOISE), draws(UPDATE_NOISE)
    return {n: start[n] - lr * (p.grad + grad_noise * g_noise[n] + wd_init * (start[n] - start[n])
                                + wd_origin * start[n]) + update_noise * u_noise[n] for n, p in trainable.items()}


@pytest.mark.parametrize("knobs", [
    {"weight_noise": 0.1}, {"grad_noise": 0.5}, {"update_noise": 0.05}, {"wd_init": 3.0},
    {"weight_noise": 0.1, "grad_noise": 0.5, "update_noise": 0.05, "wd_init": 3.0},
], ids=["weight-noise", "grad-noise", "update-noise", "wd-to-init", "all"])
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "hooked"])
def test_one_step_is_the_formula(tmp_path, tiny, float64_training, knobs, fast_path):
    overrides = {k: v for k, v in knobs.items() if k != "wd_init"}
    if "wd_init" in knobs:
        overrides.update(weight_decay=knobs["wd_init"], wd_target="init")
    else:
        overrides.update(weight_decay=0.0)
    config = tiny(optimizer="sgd", lr=0.1, warmup_steps=0, steps=1, fast_path=fast_path, **overrides)
    run = train(config, tmp_path / "r", device="cpu", progress=False).run
    expected = _by_hand(config, **knobs)
    got = run.state_dict(1)
    assert _max_diff({n: got[n] for n in expected}, expected) < 1e-12
    # and it matters: without the noise, or with decay toward the origin instead, the step lands elsewhere
    assert _max_diff({n: got[n] for n in expected}, _by_hand(config, wd_origin=knobs.get("wd_init", 0.0))) > 1e-3


# -- weight decay: origin and initialization ---------------------------------------------------------------------
def _stack(config, values):
    """A one-tensor 'model stack' [K, 3, 4] with given values and a zero gradient."""
    w = torch.tensor(values, dtype=torch.float64).requires_grad_()
    w.grad = torch.zeros_like(w)
    return {"w": w}


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_weight_decay_to_the_origin_is_torchs_own(tiny, optimizer):
    """Our per-model decay (the optimizer built without any) takes the same step as torch's optimizer with its
    own weight_decay, for each model of a stack with its own decay."""
    from grokinterp.trainer import make_optimizer

    decays = [0.5, 2.0]
    configs = [tiny(optimizer=optimizer, weight_decay=wd, model_seed=k) for k, wd in enumerate(decays)]
    gen = torch.Generator().manual_seed(0)
    w0, g = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64), torch.randn(2, 3, 4, generator=gen,
                                                                                dtype=torch.float64)
    ours = w0.clone().requires_grad_()
    opt = make_optimizer([ours], configs[0].train, weight_decay=0.0)
    inter = Interventions(configs, None)
    for step in (1, 2):
        ours.grad = g.clone()
        inter.transform_gradients({"w": ours}, step, configs[0].train.lr)
        opt.step()
    for k, wd in enumerate(decays):
        ref = w0[k].clone().requires_grad_()
        ref_opt = make_optimizer([ref], configs[k].train)
        assert ref_opt.param_groups[0]["weight_decay"] == wd
        for _ in (1, 2):
            ref.grad = g[k].clone()
            ref_opt.step()
        assert torch.allclose(ours[k], ref, rtol=0, atol=1e-15), k


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_to_the_initialization_pulls_toward_the_step0_weights(tiny, optimizer):
    init = torch.full((1, 3, 4), 2.0, dtype=torch.float64)
    config = tiny(optimizer=optimizer, weight_decay=0.5, wd_target="init", lr=0.1)
    inter = Interventions([config], {"w": init})
    params = _stack(config, [[[3.0] * 4] * 3])
    inter.transform_gradients(params, 1, 0.1)
    w, g = params["w"], params["w"].grad
    if optimizer == "adamw":  # decoupled: w ← w − lr·wd·(w − w₀), gradient untouched
        assert torch.allclose(w, torch.full_like(w, 3 - 0.1 * 0.5 * 1)) and not g.any()
    else:  # L2 toward w₀: g ← g + wd·(w − w₀)
        assert torch.equal(w, torch.full_like(w, 3.0)) and torch.allclose(g, torch.full_like(g, 0.5))
    at_init = _stack(config, init.tolist())  # at the initialization there is nothing to decay
    inter.transform_gradients(at_init, 1, 0.1)
    assert torch.equal(at_init["w"], init) and not at_init["w"].grad.any()


def test_weight_decay_to_the_initialization_keeps_a_run_near_it(tmp_path, tiny):
    """With a large decay, a run decayed toward its initialization stays closer to it than one decayed toward
    the origin, which shrinks its weights."""
    runs = {target: train(tiny(weight_decay=20.0, wd_target=target, lr=0.01, steps=40), tmp_path / target,
                          device="cpu", progress=False).run for target in ("origin", "init")}

    def distance(run, step):
        a, b = run.state_dict(step), run.state_dict(0)
        return math.sqrt(sum((a[k] - b[k]).double().pow(2).sum().item() for k in a if _is_weight(k, a[k])))

    assert distance(runs["init"], 40) < 0.5 * distance(runs["origin"], 40)
    norm = {t: run.metrics.weight_norm_sq.iloc[-1] for t, run in runs.items()}
    assert norm["origin"] < 0.8 * runs["origin"].metrics.weight_norm_sq.iloc[0] < norm["init"]


# -- noise: per model, per step, and exactly undone ------------------------------------------------------------------
def test_noise_draws_belong_to_a_model_and_a_step():
    params = [torch.zeros(3, 50, 40), torch.zeros(3, 7)]
    stacked = gaussian_like(params, [5, 7, 9], 4, GRAD_NOISE)
    lone = gaussian_like([p[:1] for p in params], [7], 4, GRAD_NOISE)
    assert all(torch.equal(s[1], l[0]) for s, l in zip(stacked, lone))  # a model's noise ignores its stack
    assert not torch.equal(stacked[0][0], stacked[0][1])
    later = gaussian_like(params, [5, 7, 9], 5, GRAD_NOISE)
    assert not torch.equal(stacked[0], later[0])
    other = gaussian_like(params, [5, 7, 9], 4, UPDATE_NOISE)
    assert not torch.equal(stacked[0], other[0])
    draws = stacked[0].flatten()
    assert abs(draws.mean().item()) < 0.03 and abs(draws.std().item() - 1) < 0.03


def test_weight_noise_is_removed_exactly(tiny):
    configs = [tiny(weight_noise=0.2), tiny(weight_noise=0.0, model_seed=1)]
    inter = Interventions(configs, None)
    w = torch.randn(2, 30, 20)
    params = {"w": w.clone()}
    restore = inter.perturb(params, 3)
    eps = gaussian_like([w], [0, 1], 3, WEIGHT_NOISE)[0]
    assert torch.equal(params["w"][0], w[0] + eps[0] * 0.2)
    assert torch.equal(params["w"][1], w[1])  # σ = 0 leaves model 1 alone
    restore()
    assert torch.equal(params["w"], w)
    assert Interventions([tiny()], None).perturb(params, 3) is None


def test_grad_noise_has_the_asked_std(tiny):
    inter = Interventions([tiny(grad_noise=0.3, weight_decay=0.0), tiny(grad_noise=0.03, weight_decay=0.0,
                                                                         model_seed=1)], None)
    params = _stack(None, torch.zeros(2, 200, 100).tolist())
    inter.transform_gradients(params, 7, 1e-3)
    g = params["w"].grad
    assert abs(g[0].std().item() / 0.3 - 1) < 0.02 and abs(g[1].std().item() / 0.03 - 1) < 0.02
    assert abs(g[0].mean().item()) < 0.01


# -- Grokfast ---------------------------------------------------------------------------------------------------------
def _fed(inter, gradients):
    """Feed the filter one gradient per step (a [K=1] tensor each); returns what the optimizer would see."""
    out = []
    for step, value in enumerate(gradients, start=1):
        params = _stack(None, [[[0.0]]])
        params["w"].grad = torch.tensor([[[value]]], dtype=torch.float64)
        inter.transform_gradients(params, step, 1e-3)
        out.append(params["w"].grad.item())
    return out


def test_grokfast_ema_is_lee_et_als_filter(tiny):
    a, lamb = 0.8, 2.0
    inter = Interventions([tiny(grokfast="ema", grokfast_alpha=a, weight_decay=0.0)], None)
    g = [1.0, -2.0, 4.0]
    h1 = g[0]
    h2 = a * h1 + (1 - a) * g[1]
    h3 = a * h2 + (1 - a) * g[2]
    assert _fed(inter, g) == pytest.approx([g[0] + lamb * h1, g[1] + lamb * h2, g[2] + lamb * h3], abs=1e-14)
    assert inter.lamb == 2.0  # the paper's default for ema when --grokfast-lamb is 0


def test_grokfast_ma_waits_for_a_full_window(tiny):
    inter = Interventions([tiny(grokfast="ma", grokfast_window=3, grokfast_lamb=0.5, weight_decay=0.0)], None)
    g = [1.0, 2.0, 6.0, -3.0]
    assert _fed(inter, g) == pytest.approx([1.0, 2.0, 6.0 + 0.5 * 3.0, -3.0 + 0.5 * 5.0 / 3], abs=1e-14)


def test_grokfast_state_follows_its_model_through_a_stack(tiny):
    configs = [tiny(grokfast="ema", weight_decay=0.0, model_seed=k) for k in range(3)]
    inter = Interventions(configs, None)
    params = _stack(None, torch.zeros(3, 2, 2).tolist())
    params["w"].grad = torch.arange(12, dtype=torch.float64).view(3, 2, 2)
    inter.transform_gradients(params, 1, 1e-3)
    saved = inter.state(2)
    inter.keep([0, 2])
    assert torch.equal(inter.filter["w"][1], saved["grokfast"]["w"])
    reloaded = Interventions(configs[:1], None)
    reloaded.load_state([saved], torch.device("cpu"))
    assert torch.equal(reloaded.filter["w"][0], saved["grokfast"]["w"]) and reloaded.pushed == saved["grokfast_pushed"]


# -- ⊥Grad and the constant norm -----------------------------------------------------------------------------------
def test_orthograd_removes_the_component_along_the_weights_and_keeps_the_norm(tiny):
    inter = Interventions([tiny(orthograd=True, weight_decay=0.0), tiny(orthograd=True, weight_decay=0.0)], None)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64) + 3 * w  # a large component along w
    params = {"w": w.clone().requires_grad_()}
    params["w"].grad = g.clone()
    inter.transform_gradients(params, 1, 1e-3)
    out = params["w"].grad
    for k in range(2):
        assert abs((out[k] * w[k]).sum().item()) < 1e-12
        assert out[k].norm().item() == pytest.approx(g[k].norm().item(), rel=1e-12)
        perp = g[k] - (g[k] * w[k]).sum() / (w[k] * w[k]).sum() * w[k]
        assert torch.allclose(out[k], perp * g[k].norm() / perp.norm(), atol=1e-12)


def test_norm_scale_starts_at_that_multiple_and_holds_the_norm(tmp_path, tiny):
    base = train(tiny(steps=20), tmp_path / "base", device="cpu", progress=False).run
    held = train(tiny(steps=20, norm_scale=2.0, weight_decay=0.0), tmp_path / "held", device="cpu",
                 progress=False).run
    ref, ours = base.metrics.weight_norm_sq, held.metrics.weight_norm_sq
    assert ours.iloc[0] == pytest.approx(4 * ref.iloc[0], rel=1e-6)
    assert (ours / ours.iloc[0] - 1).abs().max() < 1e-5  # float32 weights, float64 norms
    assert held.metrics.train_loss.iloc[-1] < 0.5 * held.metrics.train_loss.iloc[0]  # and it still learns


# -- dropout ----------------------------------------------------------------------------------------------------------
def test_dropout_hooks_drop_at_the_rate_and_rescale():
    hooks = dict(dropout_hooks(2, 0.25, 0.5, generator(0, 1, 4)))
    assert set(hooks) == {"blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.0.hook_attn_out",
                          "blocks.0.hook_mlp_out", "blocks.1.attn.hook_pattern", "blocks.1.hook_attn_out",
                          "blocks.1.hook_mlp_out"}
    x = torch.ones(100, 200)
    out = hooks["blocks.0.hook_mlp_out"](x)
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.75, rel=1e-7)]
    assert abs((out == 0).double().mean().item() - 0.25) < 0.01
    assert abs((hooks["blocks.1.attn.hook_pattern"](x) == 0).double().mean().item() - 0.5) < 0.01
    assert dropout_hooks(1, 0.0, 0.0, generator(0, 1, 4)) == []


def test_dropout_trains_through_the_forward_and_evaluates_without_it(tmp_path, tiny, caplog):
    config = tiny(dropout=0.3, attn_dropout=0.1, steps=30)
    with caplog.at_level(logging.INFO, logger="grokinterp.trainer"):
        run = train(config, tmp_path / "drop", device="cpu", progress=False).run
    assert "not the fast path (dropout acts inside the HookedTransformer forward)" in caplog.text
    plain = train(tiny(steps=30), tmp_path / "plain", device="cpu", progress=False).run
    assert not _weights_equal(run.state_dict(30), plain.state_dict(30))
    # the logged loss is the model's own, without dropout
    model = run.model(30)
    rows = run.data.train_idx
    with torch.no_grad():
        loss = answer_loss(answer_logits(model, run.data.tokens[rows]), run.data.labels[rows]).item()
    assert run.metrics.train_loss.iloc[-1] == pytest.approx(loss, rel=1e-5)
    stack = ModelStack([config], run.data.n_symbols, torch.device("cpu"))
    assert not stack.fast and ModelStack([tiny(weight_noise=0.1, grokfast="ema")], run.data.n_symbols,
                                         torch.device("cpu")).fast


# -- StableMax ---------------------------------------------------------------------------------------------------------
def test_stablemax_values_and_gradient():
    logits = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    s = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)  # x+1 for x ≥ 0, 1/(1−x) below
    assert torch.allclose(stablemax_log_probs(logits), (s / s.sum()).log(), atol=1e-15)
    assert row_losses(logits, torch.tensor([1]), "stablemax").item() == pytest.approx(-math.log(2 / 3.5), abs=1e-14)
    # no collapse: a logit margin that drives softmax's loss to exactly 0 leaves StableMax's positive, with a
    # finite, non-zero gradient
    big = torch.tensor([[800.0, 0.0, -800.0]], dtype=torch.float64, requires_grad=True)
    assert row_losses(big.detach().float(), torch.tensor([0]), "ce").item() == 0.0
    loss = row_losses(big, torch.tensor([0]), "stablemax")
    loss.backward()
    assert 0 < loss.item() and torch.isfinite(big.grad).all() and big.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        row_losses(big, torch.tensor([0]), "hinge")


def test_a_stablemax_run_logs_its_own_loss(tmp_path, tiny):
    run = train(tiny(loss="stablemax", steps=30), tmp_path / "sm", device="cpu", progress=False).run
    model = run.model(30)
    rows = run.data.train_idx
    with torch.no_grad():
        logits = answer_logits(model, run.data.tokens[rows])
    stable = row_losses(logits, run.data.labels[rows], "stablemax").mean().item()
    assert run.metrics.train_loss.iloc[-1] == pytest.approx(stable, rel=1e-6)
    assert run.metrics.train_loss.iloc[-1] < 0.5 * run.metrics.train_loss.iloc[0]


# -- resume and stacks -------------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


EVERY = {
    "weight-noise": {"weight_noise": 0.05},
    "update-noise": {"update_noise": 0.01},
    "grad-noise": {"grad_noise": 0.1},
    "dropout": {"dropout": 0.2, "attn_dropout": 0.1},
    "wd-to-init": {"wd_target": "init"},
    "grokfast-ema": {"grokfast": "ema"},
    "grokfast-ma": {"grokfast": "ma", "grokfast_window": 4},
    "orthograd": {"orthograd": True},
    "norm-scale": {"norm_scale": 1.5, "weight_decay": 0.0},
    "stablemax": {"loss": "stablemax"},
    "minibatch-noise": {"batch_size": 8, "weight_noise": 0.05},
}


@pytest.mark.parametrize("knobs", EVERY.values(), ids=EVERY.keys())
def test_every_intervention_resumes_bit_for_bit(tmp_path, tiny, knobs):
    config = tiny(**knobs)
    whole = train(config, tmp_path / "whole", device="cpu", progress=False).run

    def crash(step):
        if step == 33:
            raise Crash

    with pytest.raises(Crash):
        train(config, tmp_path / "cut", device="cpu", progress=False, on_step=crash)
    assert 0 < load_run(tmp_path / "cut").trainer_state.step < 33
    resumed = train(config, tmp_path / "cut", resume=True, device="cpu", progress=False).run
    for step in whole.steps:
        assert _weights_equal(resumed.state_dict(step), whole.state_dict(step)), step
    cols = [c for c in whole.metrics.columns if c != "time_s"]
    assert resumed.metrics[cols].equals(whole.metrics[cols])
    assert load_run(tmp_path / "cut").config == config


STACKS = {
    "noise-and-decay-to-init": ({"wd_target": "init"},
                                [{"weight_noise": 0.05, "weight_decay": 1.0},
                                 {"grad_noise": 0.1, "update_noise": 0.01, "weight_decay": 0.3},
                                 {"weight_noise": 0.02, "grad_noise": 0.05, "weight_decay": 3.0, "frac_train": 0.8}]),
    "grokfast-orthograd-norm": ({"grokfast": "ema", "orthograd": True, "norm_scale": 1.2},
                                [{"weight_decay": 0.0}, {"weight_decay": 0.5, "frac_train": 0.4},
                                 {"weight_noise": 0.03, "weight_decay": 0.1}]),
    "grokfast-ma-stablemax-minibatch": ({"grokfast": "ma", "grokfast_window": 5, "loss": "stablemax",
                                         "batch_size": 8}, [{}, {"update_noise": 0.02}, {"frac_train": 0.8}]),
}


@pytest.mark.parametrize("shared, members", STACKS.values(), ids=STACKS.keys())
def test_stacked_members_with_their_own_interventions_match_lone_runs(tmp_path, tiny, float64_training, shared,
                                                                     members):
    configs = [tiny(model_seed=k, data_seed=k, steps=40, **shared, **own) for k, own in enumerate(members)]
    results = train_many(configs, [tmp_path / f"m{k}" for k in range(3)], device="cpu", progress=False)
    for k, (config, result) in enumerate(zip(configs, results)):
        lone = train(config, tmp_path / f"lone{k}", device="cpu", progress=False).run
        assert result.run.steps == lone.steps
        for step in lone.steps:
            assert _max_diff(result.run.state_dict(step), lone.state_dict(step)) < WEIGHT_TOL, (k, step)


def test_dropout_runs_are_not_stacked(tiny):
    from grokinterp.trainer import stack_mismatch

    assert stack_mismatch([tiny(dropout=0.1), tiny(dropout=0.1, model_seed=1)]) is not None
    assert stack_mismatch([tiny(weight_noise=0.1), tiny(weight_noise=0.0, model_seed=1)]) is None
    with pytest.raises(ConfigError):
        tiny(dropout=1.0)
