"""The local learning coefficient: the exact stationary answer of SGLD on quadratics (d/2, or r/2 for a loss that
depends on r of the d parameters), honest standard errors, and purity on a tiny transformer."""

import math

import pandas as pd
import pytest
import torch
from test_sharpness import ONE_ROW, Quadratic, gen, half_square, spd

from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.llc import default_nbeta, estimate_llc, llc_metrics
from grokinterp.model import build_model
from grokinterp.tasks import build_task


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import tiny_config

    from grokinterp.checkpoints import load_run
    from grokinterp.trainer import train

    path = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(p=11, steps=40, checkpoints=4, log_checkpoints=3), path, device="cpu", progress=False)
    return load_run(path)


def discretized_llc(eigenvalues: torch.Tensor, nbeta: float, gamma: float, eps: float) -> float:
    """nβ · E[L] under the stationary law of the SGLD chain itself on L = ½ Σ λ_i w_i² (w* = 0): along each
    eigendirection w ← (1 − εc/2) w + √ε ξ with c = nβλ + γ, whose variance is 1 / (c (1 − εc/4))."""
    c = nbeta * eigenvalues + gamma
    return (nbeta * 0.5 * (eigenvalues / (c * (1 - eps * c / 4)))).sum().item()


def test_a_full_rank_quadratic_has_llc_d_over_2():
    eigenvalues = torch.linspace(1.0, 2.0, 6, dtype=torch.float64)
    model = Quadratic(spd(eigenvalues), torch.zeros(6, dtype=torch.float64))
    nbeta, gamma, eps = 1000.0, 1.0, 5e-5  # εc ≤ 0.1: the discretization shifts λ̂ by ~2.5%, computed exactly
    est = estimate_llc(model, *ONE_ROW, generator=gen(), step_size=eps, nbeta=nbeta, gamma=gamma, n_chains=8,
                       n_draws=2000, n_burnin=200, loss_fn=half_square)
    exact = discretized_llc(eigenvalues, nbeta, gamma, eps)
    assert exact == pytest.approx(3.0, rel=0.03)  # d/2, up to γ and the step size
    assert abs(est.value - exact) < 4 * est.se and est.se < 0.05 * est.value
    assert len(est.per_chain) == 8 and est.traces.shape == (8, 2000) and not est.diverged
    assert abs(est.drift) < 0.1 and est.init_loss == 0.0


def test_only_the_directions_the_loss_depends_on_count():
    """L = ½‖Rw‖² with R of rank 3 in 10 parameters: λ = 3/2, whatever the 7 flat directions do."""
    q, _ = torch.linalg.qr(torch.randn(10, 3, generator=gen(4), dtype=torch.float64))
    model = Quadratic(torch.eye(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64))
    model.r = torch.diag(torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64).sqrt()) @ q.T
    nbeta, gamma, eps = 1000.0, 1.0, 5e-5
    est = estimate_llc(model, *ONE_ROW, generator=gen(), step_size=eps, nbeta=nbeta, gamma=gamma, n_chains=8,
                       n_draws=2000, n_burnin=200, loss_fn=half_square)
    exact = discretized_llc(torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64), nbeta, gamma, eps)
    assert exact == pytest.approx(1.5, rel=0.03)
    assert abs(est.value - exact) < 4 * est.se


def test_standard_errors_match_the_spread_of_estimates_over_seeds():
    eigenvalues = torch.tensor([1.0, 2.0], dtype=torch.float64)
    model = Quadratic(spd(torch.cat([eigenvalues, torch.ones(3, dtype=torch.float64)])),
                      torch.zeros(5, dtype=torch.float64))
    runs = [estimate_llc(model, *ONE_ROW, generator=gen(seed), step_size=5e-5, nbeta=1000.0, gamma=1.0, n_chains=4,
                         n_draws=400, n_burnin=100, loss_fn=half_square) for seed in range(30)]
    values = torch.tensor([r.value for r in runs])
    assert values.std().item() == pytest.approx(sorted(r.se for r in runs)[15], rel=0.35)


def test_more_chains_run_until_the_standard_error_meets_its_target():
    """Chains come in batches of n_chains until se <= rel_error · λ̂: the first chains are those of a run without the
    target, and the target is met, or the budget spent."""
    model = Quadratic(spd(), torch.zeros(5, dtype=torch.float64))
    kwargs = dict(step_size=5e-5, nbeta=1000.0, gamma=1.0, n_chains=2, n_draws=100, n_burnin=20, loss_fn=half_square)
    two = estimate_llc(model, *ONE_ROW, generator=gen(), **kwargs)
    assert two.se > 0.05 * two.value  # 2 chains of 100 draws miss 5%
    met = estimate_llc(model, *ONE_ROW, generator=gen(), rel_error=0.05, max_chains=64, **kwargs)
    assert met.per_chain[:2] == two.per_chain and len(met.per_chain) % 2 == 0 and len(met.per_chain) > 2
    assert met.se <= 0.05 * met.value and met.traces.shape == (len(met.per_chain), 100)
    capped = estimate_llc(model, *ONE_ROW, generator=gen(), rel_error=1e-4, max_chains=5, **kwargs)
    assert len(capped.per_chain) == 5 and capped.se > 1e-4 * capped.value  # 2 + 2 + 1: the budget ran out
    with pytest.raises(ValueError, match=r"max_chains \(1\) must be at least n_chains \(2\)"):
        estimate_llc(model, *ONE_ROW, generator=gen(), rel_error=0.05, max_chains=1, **kwargs)


def test_too_large_a_step_diverges_and_says_so():
    model = Quadratic(spd(), torch.zeros(5, dtype=torch.float64))
    est = estimate_llc(model, *ONE_ROW, generator=gen(), step_size=1.0, nbeta=1000.0, gamma=1.0, n_chains=2,
                       n_draws=200, n_burnin=10, loss_fn=half_square)
    assert est.diverged and math.isnan(est.value)
    with pytest.raises(ValueError, match="n_burnin"):
        estimate_llc(model, *ONE_ROW, generator=gen(), n_draws=10, n_burnin=10, loss_fn=half_square)


def test_llc_row_of_a_tiny_transformer_is_pure_and_seeded():
    from conftest import tiny_config

    cfg = tiny_config()
    data = build_task(cfg.task.op, cfg.task.p, cfg.task.n, cfg.task.frac_train, cfg.task.data_seed)
    model = build_model(cfg.model, data.n_symbols).eval()
    ckpt = Checkpoint(step=3, model=model, data=data, config=cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    row = llc_metrics(ckpt, n_chains=3, n_draws=30, n_burnin=10, batch_size=8, max_chains=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert set(row) == {"llc", "llc_se", "llc_chain0", "llc_chain1", "llc_chain2", "llc_chains", "llc_init_loss",
                        "llc_drift", "llc_diverged", "llc_nbeta"}
    assert all(math.isfinite(v) for v in row.values()) and row["llc_diverged"] == 0.0
    assert row["llc_nbeta"] == pytest.approx(default_nbeta(len(data.train_idx)))
    assert row["llc"] == pytest.approx(sum(row[f"llc_chain{c}"] for c in range(3)) / 3)
    assert llc_metrics(ckpt, n_chains=3, n_draws=30, n_burnin=10, batch_size=8, max_chains=3) == row
    other = llc_metrics(Checkpoint(step=4, model=model, data=data, config=cfg), n_chains=3, n_draws=30, n_burnin=10,
                        batch_size=8, max_chains=3)
    assert other["llc"] != row["llc"] and other["llc_init_loss"] == row["llc_init_loss"]


def test_calibration_writes_a_table_traces_and_a_figure_and_refuses_bad_input(tiny_run, tmp_path, capsys):
    from grokinterp.analyze import analysis_dir
    from grokinterp.cli import main

    args = ["calibrate-llc", str(tiny_run.path), "--out", str(tmp_path), "--no-progress", "--step-sizes",
            "1e-4,1e-3", "--nbetas", "5,20", "--param", "n_draws=20", "--param", "n_burnin=5", "--param",
            "n_chains=2", "--param", "batch_size=8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("step size") == 4 and "llc_calibration.csv" in out
    folder = analysis_dir(tiny_run, tmp_path)
    summary = pd.read_csv(folder / "llc_calibration.csv")
    traces = pd.read_csv(folder / "llc_calibration_traces.csv")
    assert list(zip(summary.step_size, summary.nbeta)) == [(1e-4, 5), (1e-3, 5), (1e-4, 20), (1e-3, 20)]
    assert summary.step.unique().tolist() == [tiny_run.steps[-1]] and len(traces) == 4 * 2 * 20
    # each setting's λ̂ is the mean of its chains, and the traces are the running nβ(L_B(w_t) − L(w*))
    assert summary.llc.to_numpy() == pytest.approx(summary[["llc_chain0", "llc_chain1"]].mean(axis=1).to_numpy())
    kept = traces[(traces.step_size == 1e-3) & (traces.nbeta == 20) & (traces.draw >= 5)]
    assert kept.llc_trace.mean() == pytest.approx(summary.llc.iloc[3])
    assert "<html" in (folder / "llc_calibration.html").read_text()[:200].lower()
    # one line for bad input, nothing written
    for bad, message in ((["--step-sizes", "1e-4,x"], "--step-sizes takes numbers separated by commas"),
                         (["--step-sizes", "0,1e-4"], "every step size must be a positive number"),
                         (["--param", "step_size=1e-3"], "calibrate-llc sweeps step_size"),
                         (["--step", "999999"], "step 999999 has no checkpoint"),
                         (["--param", "n_chains=0"], "n_chains must be > 0"),
                         (["--param", "n_burnin=600"], "n_burnin (600) must be below n_draws (500)")):
        assert main(["calibrate-llc", str(tiny_run.path), "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_llc_is_asked_for_by_name_and_left_out_of_all(tiny_run, tmp_path, capsys):
    from grokinterp.analyze import analyze, metrics_for

    assert "llc" not in metrics_for(tiny_run)
    result = analyze(tiny_run, "llc", steps=f"{tiny_run.steps[-2]}:", out_root=tmp_path, progress=False,
                     params={"n_chains": 2, "n_draws": 12, "n_burnin": 2, "batch_size": 8})
    assert result.computed == 2 and {"llc", "llc_se", "llc_chain0", "llc_chain1"} <= set(result.table.columns)
    html = result.html_path.read_text()
    assert '"name":"llc_chain0"' in html.replace(" ", "")  # the chains are drawn on the llc panel


def test_the_fast_forward_gives_the_model_forwards_chains(monkeypatch):
    from conftest import tiny_config

    import grokinterp.metrics.sharpness as sharpness

    cfg = tiny_config()
    data = build_task(cfg.task.op, cfg.task.p, cfg.task.n, cfg.task.frac_train, cfg.task.data_seed)
    model = build_model(cfg.model, data.n_symbols).to(torch.float64).eval()
    ckpt = Checkpoint(step=3, model=model, data=data, config=cfg)
    assert sharpness.fast_forward_applies(model, ckpt.train_tokens)
    kwargs = dict(n_chains=2, n_draws=20, n_burnin=5, batch_size=8)
    fast = llc_metrics(ckpt, **kwargs)
    monkeypatch.setattr(sharpness, "fast_forward_applies", lambda m, t: False)
    slow = llc_metrics(ckpt, **kwargs)
    assert fast == pytest.approx(slow, rel=1e-9)
