import contextlib
import copy
import io
import json
import os
import signal

import pandas as pd
import pytest
import torch

from grokinterp.analyze import analysis_dir
from grokinterp.checkpoints import RunStore, load_run
from grokinterp.cli import main
from grokinterp.config import ConfigError
from grokinterp.errors import RunError
from grokinterp.model import answer_logits, build_model
from grokinterp.plots import censored_median, data_efficiency_figure
from grokinterp.sweep import _batch, _Member, _Stack, data_efficiency, member_name, sweep_configs, train_many
from grokinterp.tasks import build_task
from grokinterp.trainer import answer_loss, forward_for, train

# Stacked and ordinary training are compared over whole runs in float64 (the ``float64_training`` fixture), where
# two implementations of one step stay ~1e-13 apart; in float32 their trajectories part chaotically, by an amount
# that depends on the CPU. The float32 claim is per step: test_stacked_float32_gradients_are_as_accurate below.
WEIGHT_TOL = 1e-9


def _max_diff(a: dict, b: dict, skip: frozenset = frozenset()) -> float:
    assert a.keys() == b.keys()
    return max(0.0 if torch.equal(a[k], b[k]) else (a[k].double() - b[k].double()).abs().max().item()
               for k in a if k not in skip)


def _three(tiny, **shared):
    """Three runs that differ in every stackable field."""
    return [tiny(model_seed=0, data_seed=0, frac_train=0.6, weight_decay=1.0, **shared),
            tiny(model_seed=1, data_seed=1, frac_train=0.4, weight_decay=0.1, **shared),
            tiny(model_seed=2, data_seed=2, frac_train=0.8, weight_decay=3.0, **shared)]


@pytest.mark.parametrize("shared", [{}, {"optimizer": "adam", "batch_size": 8, "freeze_biases": False},
                                    {"fast_path": False}],
                         ids=["adamw-full-batch", "adam-minibatch-biases", "hooked-forward"])
def test_stacked_runs_match_the_ordinary_trainer(tmp_path, tiny, shared, float64_training):
    configs = _three(tiny, **shared)
    # group_size 2: the runs are trained in two consecutive stacks (sorted by fraction: 0.4 + 0.6, then 0.8)
    results = train_many(configs, [tmp_path / f"m{i}" for i in range(3)], device="cpu", progress=False,
                         group_size=2)
    assert [r.stop_reason for r in results] == ["budget"] * 3 and [r.step for r in results] == [60] * 3
    for config, result in zip(configs, results):
        ours = result.run
        ref = train(config, tmp_path / f"ref_{ours.name}", device="cpu", progress=False).run
        assert ours.config == config
        assert torch.equal(ours.data.train_idx, ref.data.train_idx) and torch.equal(ours.data.val_idx,
                                                                                    ref.data.val_idx)
        assert ours.steps == ref.steps
        # b_K's true gradient is zero (it shifts all of a query's scores equally, which softmax ignores), so Adam
        # turns its rounding noise into lr-sized steps: a random walk in either trainer, with nothing to compare.
        noise = frozenset() if config.model.freeze_biases else frozenset({"blocks.0.attn.b_K"})
        for step in ref.steps:
            assert _max_diff(ours.state_dict(step), ref.state_dict(step), noise) < WEIGHT_TOL, step
        a, b = ours.metrics, ref.metrics
        assert list(a.columns) == list(b.columns) and list(a.step) == list(b.step)
        assert list(a.train_acc) == list(b.train_acc) and list(a.val_acc) == list(b.val_acc)
        for col in ("train_loss", "val_loss"):
            assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), rel=1e-9), col
        # Σ‖θ‖² includes b_K, whose random walk (see above) moves it by ~1e-7 relative
        assert a.weight_norm_sq.to_numpy() == pytest.approx(b.weight_norm_sq.to_numpy(), rel=1e-9 if not noise else 1e-5)
        assert list(a.lr) == list(b.lr)
        # the optimizer state is what torch.optim writes, so the ordinary trainer can resume from it
        sa, sb = ours.trainer_state, ref.trainer_state
        assert (sa.step, sa.finished, sa.stop_reason) == (sb.step, sb.finished, sb.stop_reason)
        assert sa.optimizer["param_groups"] == sb.optimizer["param_groups"]
        assert sa.optimizer["state"].keys() == sb.optimizer["state"].keys()
        trainable = [name for name, p in ref.model().named_parameters() if p.requires_grad]
        for i, state in sb.optimizer["state"].items():
            assert state.keys() == sa.optimizer["state"][i].keys()
            assert sa.optimizer["state"][i]["step"].dtype == state["step"].dtype
            assert sa.optimizer["state"][i]["step"] == state["step"]
            if trainable[i] not in noise:
                assert (sa.optimizer["state"][i]["exp_avg"] - state["exp_avg"]).abs().max() < WEIGHT_TOL
        biases = [k for k in ours.state_dict() if k.rsplit(".", 1)[-1].startswith("b_")]
        frozen = config.model.freeze_biases
        assert all((ours.state_dict()[k] == 0).all() for k in biases) == frozen


def test_passes_of_a_few_models_change_nothing(tmp_path, tiny, monkeypatch, float64_training):
    configs = _three(tiny, steps=30)
    whole = train_many(configs, [tmp_path / f"w{i}" for i in range(3)], device="cpu", progress=False)
    monkeypatch.setattr("grokinterp.sweep.CPU_ROWS_PER_PASS", 1)  # one model per forward/backward pass
    passes = train_many(configs, [tmp_path / f"p{i}" for i in range(3)], device="cpu", progress=False)
    for a, b in zip(whole, passes):
        assert _max_diff(a.run.state_dict(30), b.run.state_dict(30)) < WEIGHT_TOL
        assert list(a.run.metrics.val_acc) == list(b.run.metrics.val_acc)


def test_a_member_resumes_with_the_ordinary_trainer(tmp_path, tiny, float64_training):
    configs = _three(tiny, steps=30)[:2]
    results = train_many(configs, [tmp_path / "a", tmp_path / "b"], device="cpu", progress=False)
    member = results[1].run
    assert member.trainer_state.finished and member.steps[-1] == 30
    resumed = train(configs[1].replace(steps=60), member.path, resume=True, device="cpu", progress=False)
    assert resumed.step == 60 and resumed.stop_reason == "budget"
    whole = train(configs[1].replace(steps=60), tmp_path / "whole", device="cpu", progress=False).run
    assert _max_diff(resumed.run.state_dict(60), whole.state_dict(60)) < WEIGHT_TOL
    steps = resumed.run.metrics.step
    assert steps.is_monotonic_increasing and steps.is_unique and steps.iloc[-1] == 60


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "hooked-forward"])
def test_stacked_float32_gradients_are_as_accurate_as_the_ordinary_trainers(tmp_path, tiny, fast_path):
    """One float32 step of the stack gives each member a gradient as close to the float64 one as the ordinary
    trainer's own float32 gradient is, up to float32 rounding (the per-step half of the comparison above;
    measured, relative to the largest entry: at most 7.2e-7 for the stack and 5.6e-7 for the trainer)."""
    configs = _three(tiny, fast_path=fast_path)
    datas = [build_task(c.task.op, c.task.p, c.task.n, c.task.frac_train, c.task.data_seed) for c in configs]
    members = [_Member(c, RunStore.create(tmp_path / str(i), c, d), d.train_idx, d.val_idx)
               for i, (c, d) in enumerate(zip(configs, datas))]
    stack = _Stack(members, datas[0].n_symbols, torch.device("cpu"))
    stack.forward_backward(*_batch(members, datas[0], 1))
    for k, (config, data) in enumerate(zip(configs, datas)):
        model = build_model(config.model, data.n_symbols)
        with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens announces the dtype change
            exact = copy.deepcopy(model).to(torch.float64)
        tokens, labels = data.tokens[data.train_idx], data.labels[data.train_idx]
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]

        def gradients(model, forward):
            params = dict(model.named_parameters())
            loss = answer_loss(forward(model, tokens), labels)
            return dict(zip(trainable, torch.autograd.grad(loss, [params[n] for n in trainable])))

        truth = gradients(exact, answer_logits)
        own = gradients(model, forward_for(model, config.train))

        def error(grads):
            return max(float((grads[n].double() - truth[n]).abs().max() / truth[n].abs().max()) for n in trainable)

        stacked = error({n: stack.params[n].grad[k] for n in trainable})
        assert 0 < error(own) < 1e-6
        assert stacked <= max(4 * error(own), 1e-6), (stacked, error(own))


def test_members_stop_on_their_own(tmp_path, tiny):
    base = tiny(steps=150)
    configs = [base.replace(frac_train=0.9, stop_val_acc=0.5, stop_patience=7),  # reaches 50% val acc early
               base.replace(model_seed=1, weight_decay=1e4),  # AdamW multiplies by 1 - lr·wd < -1: blows up
               base.replace(model_seed=2, data_seed=2)]
    results = train_many(configs, [tmp_path / f"m{i}" for i in range(3)], device="cpu", progress=False)
    early, diverged, full = (r.run for r in results)
    assert [r.stop_reason for r in results] == ["early_stop", "diverged", "budget"]
    reached = early.first_step_reaching("val_acc", 0.5)
    assert results[0].step == reached + 7 < 150
    assert results[1].step < results[0].step  # the others went on after each member left the stack
    assert results[2].step == 150 and full.metrics.step.iloc[-1] == 150
    for result in results:  # each member's last step is logged and checkpointed, and the run marked finished
        assert result.run.steps[-1] == result.step and result.run.metrics.step.iloc[-1] == result.step
        assert result.run.trainer_state.finished and result.run.trainer_state.stop_reason == result.stop_reason
    alone = train(configs[0], tmp_path / "alone", device="cpu", progress=False)
    assert alone.stop_reason == "early_stop" and alone.step == results[0].step


def test_ctrl_c_saves_every_member(tmp_path, tiny):
    configs = _three(tiny)

    def press_ctrl_c(step):
        if step == 22:
            os.kill(os.getpid(), signal.SIGINT)

    results = train_many(configs, [tmp_path / f"m{i}" for i in range(3)], device="cpu", progress=False,
                         group_size=2, on_step=press_ctrl_c)
    assert len(results) == 2  # the second group (the 0.8 run) never started
    assert not (tmp_path / "m2").exists()
    for result in results:
        assert result.stop_reason == "interrupted" and result.step == 22
        assert 22 in result.run.steps and not result.run.trainer_state.finished
    config = results[0].run.config
    assert train(config, results[0].run.path, resume=True, device="cpu", progress=False).step == 60


def test_unstackable_configs_are_refused_before_anything_is_written(tmp_path, tiny):
    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ConfigError, match=r"--lr is 0\.01 in the first and 0\.001 in run 1; stacked runs may differ "
                                          r"only in seeds, --frac-train, --weight-decay and the stop rule"):
        train_many([tiny(), tiny(lr=1e-3)], dirs, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="--optimizer sgd cannot be stacked"):
        train_many([tiny(optimizer="sgd")], dirs[:1], device="cpu", progress=False)
    (tmp_path / "b").mkdir()
    with pytest.raises(RunError, match="already exists"):
        train_many([tiny(), tiny(model_seed=1)], dirs, device="cpu", progress=False)
    assert not (tmp_path / "a").exists()


def test_grid_and_member_names(tiny):
    configs = sweep_configs(tiny(), seeds=[0, 3], fracs=[0.3, 1 / 3], weight_decays=[1.0])
    assert [(c.task.frac_train, c.train.weight_decay, c.model.model_seed, c.task.data_seed) for c in configs] == [
        (0.3, 1.0, 0, 0), (0.3, 1.0, 3, 3), (1 / 3, 1.0, 0, 0), (1 / 3, 1.0, 3, 3)]
    assert [member_name(c) for c in configs] == ["frac0.30_wd1_seed0", "frac0.30_wd1_seed3",
                                                 "frac0.333333_wd1_seed0", "frac0.333333_wd1_seed3"]
    assert member_name(tiny(weight_decay=0.03, model_seed=1, data_seed=2)) == "frac0.60_wd0.03_mseed1_dseed2"
    for kwargs, message in [({"seeds": []}, "--seeds is empty"), ({"fracs": [0.5, 0.5]}, "lists 0.5 twice"),
                            ({"fracs": [1.0]}, "strictly between 0 and 1"), ({"weight_decays": [-1.0]}, "negative")]:
        grid = {"seeds": [0], "fracs": [0.5], "weight_decays": [1.0], **kwargs}
        with pytest.raises(ConfigError, match=message):
            sweep_configs(tiny(), **grid)


# -- data efficiency --------------------------------------------------------------------------------------------
def _fake_run(path, tiny, frac, wd, seed, train_at, val_at, last):
    """A run directory whose metrics log reaches 99% train/val accuracy at the given steps (None: never)."""
    config = tiny(frac_train=frac, weight_decay=wd, model_seed=seed, data_seed=seed)
    store = RunStore.create(path, config, build_task("add", 7, 5, frac, seed))
    steps = sorted({0, 10, last} | {s for s in (train_at, val_at) if s is not None})
    store.rewrite_metrics({"step": s, "train_acc": 1.0 if train_at is not None and s >= train_at else 0.5,
                           "val_acc": 0.995 if val_at is not None and s >= val_at else 0.2} for s in steps)
    return path


def test_data_efficiency_table_and_figure(tmp_path, tiny):
    runs = [_fake_run(tmp_path / "c", tiny, 0.5, 1.0, 0, 10, None, 500),
            _fake_run(tmp_path / "a", tiny, 0.3, 1.0, 0, 20, 100, 150),
            _fake_run(tmp_path / "b", tiny, 0.3, 1.0, 1, 10, 300, 400),
            _fake_run(tmp_path / "d", tiny, 0.3, 0.1, 0, 10, 250, 250)]
    table = data_efficiency(runs)
    assert list(table.columns) == ["run", "frac_train", "weight_decay", "seed", "train_99_step", "val_99_step",
                                   "steps_trained"]
    assert list(table.run) == ["d", "a", "b", "c"]  # by fraction, weight decay, seed
    assert table.train_99_step.tolist() == [10, 20, 10, 10]
    assert table.val_99_step.tolist()[:3] == [250, 100, 300] and pd.isna(table.val_99_step.iloc[3])
    assert table.steps_trained.tolist() == [250, 150, 400, 500]

    fig = data_efficiency_figure("t", table)
    medians = {t.name: list(t.y) for t in fig.data if t.name and "median" in t.name}
    assert medians == {"weight decay 0.1 (median)": [250.0], "weight decay 1 (median)": [200.0, None]}
    open_markers = [t for t in fig.data if t.marker.symbol and str(t.marker.symbol).endswith("-open")
                    and t.x[0] is not None]
    assert len(open_markers) == 1 and list(open_markers[0].y) == [500.0] and list(open_markers[0].x) == [0.5]
    assert [t.name for t in fig.data if t.showlegend is not False and t.x == (None,)] == [
        "seed 0", "seed 1", "not reached (drawn at its budget)"]


def test_censored_median():
    assert censored_median([100, None, 300]) == 300  # a missing run is later than any that reached
    assert censored_median([1, 2, 3, 4]) == 2.5
    assert censored_median([100, None]) is None and censored_median([100, None, None]) is None
    assert censored_median([]) is None


# -- command line -----------------------------------------------------------------------------------------------
TINY = ["--op", "add", "--p", "7", "--d-model", "32", "--n-heads", "2", "--d-head", "16", "--d-mlp", "64",
        "--steps", "40", "--lr", "0.01", "--eval-every", "5", "--checkpoints", "4", "--log-checkpoints", "2",
        "--stop-val-acc", "0", "--no-progress"]


def test_sweep_end_to_end(tmp_path, capsys):
    out, analyses = tmp_path / "ckpt", tmp_path / "analyses"
    assert main(["sweep", "--out", str(out), "--analyses-out", str(analyses), "--name", "grid", "--seeds", "0,1",
                 "--fracs", "0.5,0.7", "--weight-decays", "1", "--device", "cpu", *TINY]) == 0
    stdout = capsys.readouterr().out
    names = ["frac0.50_wd1_seed0", "frac0.50_wd1_seed1", "frac0.70_wd1_seed0", "frac0.70_wd1_seed1"]
    assert sorted(p.name for p in (out / "grid").iterdir()) == [*names, "sweep.json"]
    manifest = json.loads((out / "grid" / "sweep.json").read_text())
    assert manifest["seeds"] == [0, 1] and manifest["fracs"] == [0.5, 0.7] and manifest["weight_decays"] == [1.0]
    assert [m["name"] for m in manifest["members"]] == names
    run = load_run(out / "grid" / names[3])
    assert run.config.task.frac_train == 0.7 and run.config.model.model_seed == 1 == run.config.task.data_seed
    assert run.steps[-1] == 40 and run.metrics.train_acc.iloc[-1] == 1.0

    folder = analysis_dir(out / "grid", analyses)  # beside the members' own analyses
    assert folder == analysis_dir(out / "grid" / names[0], analyses).parent
    table = pd.read_csv(folder / "data_efficiency.csv")
    assert sorted(table.run) == names and set(table.steps_trained) == {40}
    html = (folder / "data_efficiency.html").read_text()
    assert "steps to 99% validation accuracy" in html and len(html) > 1_000_000  # plotly.js inlined
    lines = stdout.splitlines()
    assert lines[1].split() == ["frac", "wd", "seed", "val", "99%", "steps"]
    assert [line.split()[:3] for line in lines[2:6]] == [["0.5", "1", "0"], ["0.5", "1", "1"], ["0.7", "1", "0"],
                                                         ["0.7", "1", "1"]]
    assert str(folder / "data_efficiency.html") in stdout

    assert main(["runs", str(out / "grid")]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == names
    assert main(["train", "--resume", str(out / "grid" / names[0]), "--steps", "50", "--no-progress"]) == 0
    assert load_run(out / "grid" / names[0]).steps[-1] == 50


GRID = ["--seeds", "0", "--fracs", "0.5", "--weight-decays", "1"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", ""], "--seeds expects a comma-separated list such as 0,1,2, got ''"),
        (["--seeds", "0,,1"], "--seeds expects a comma-separated list"),
        (["--seeds", "0,x"], "--seeds expects whole numbers such as 0,1,2, got 'x'"),
        (["--fracs", "0.3,abc"], "--fracs expects numbers such as 0.3,0.5,0.7, got 'abc'"),
        (["--fracs", "0.3,1.5"], "--fracs: 1.5 is not a training fraction"),
        (["--fracs", "0.01"], "leaves the training split empty"),
        (["--weight-decays", "-1"], "--weight-decays: -1 is negative"),
        (["--seeds", "1,1"], "--seeds lists 1 twice"),
        (["--frac-train", "0.5"], "--frac-train is set by the sweep's grid"),
        (["--model-seed", "3"], "--model-seed is set by the sweep's grid"),
        (["--optimizer", "sgd"], "--optimizer sgd cannot be stacked"),
        (["--group-size", "0"], "--group-size must be at least 1"),
        (["--group-size", "two"], "invalid int value: 'two'"),
        (["--device", "tpu"], "unknown --device 'tpu'"),
        (["--name", "a/b"], "must be a plain folder name"),
    ],
)
def test_bad_sweep_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, flags, message):
    out, analyses = tmp_path / "ckpt", tmp_path / "analyses"
    argv = ["sweep", "--out", str(out), "--analyses-out", str(analyses), "--name", "s", *TINY, *GRID, *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grokinterp: error: ") and message in err[0], err
    assert not out.exists() and not analyses.exists()


def test_sweep_needs_its_grid_and_a_new_folder(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path), "--seeds", "0", *TINY]) == 2
    assert "required: --fracs, --weight-decays" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main(["sweep", "--out", str(tmp_path), "--name", "taken", *GRID, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep folder" in err[0] and "already exists; pick another --name" in err[0]
    assert not any((tmp_path / "taken").iterdir())


def test_group_size_one_trains_ordinary_runs_one_after_another(tmp_path, tiny):
    configs = _three(tiny)
    results = train_many(configs, [tmp_path / f"m{i}" for i in range(3)], device="cpu", progress=False, group_size=1)
    alone = train(configs[1], tmp_path / "alone", device="cpu", progress=False)
    assert [r.run.config for r in results] == configs
    a, b = results[1].run.state_dict(), alone.run.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)  # the ordinary trainer itself: bit for bit
