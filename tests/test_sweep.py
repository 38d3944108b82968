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
from grokinterp.checkpoints import RunStore, TrainerState, load_run
from grokinterp.cli import main
from grokinterp.config import ConfigError
from grokinterp.errors import RunError
from grokinterp.fastpath import fast_logits_from_params
from grokinterp.model import answer_logits, build_model
from grokinterp.objective import answer_loss
from grokinterp.plots import censored_median, min_fraction, steps_figure, sweep_figure
from grokinterp.sweep import (
    grid_configs,
    member_name,
    member_state,
    parse_grid_axis,
    raise_budget,
    read_manifest,
    results_table,
    run_members,
    sweep_configs,
    train_many,
    write_manifest,
)
from grokinterp.tasks import build_task
from grokinterp.trainer import ModelStack, _batch, _Interrupt, _Member, stack_mismatch, train, train_group

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
    monkeypatch.setattr("grokinterp.trainer.CPU_ROWS_PER_PASS", 1)  # one model per forward/backward pass
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
    members = [_Member(c, RunStore.create(tmp_path / str(i), c, d), d) for i, (c, d) in enumerate(zip(configs, datas))]
    stack = ModelStack(configs, datas[0].n_symbols, torch.device("cpu"))
    assert stack.fast == fast_path
    stack.forward_backward(*_batch(members, datas[0], 1), step=1)
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
        forward = (lambda m, t: fast_logits_from_params(dict(m.named_parameters()), t, m.cfg)) if fast_path else \
            answer_logits
        own = gradients(model, forward)

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


def test_runs_that_cannot_share_a_stack_train_in_groups_of_their_own(tmp_path, tiny):
    configs = [tiny(steps=20), tiny(steps=20, lr=1e-3), tiny(steps=20, optimizer="sgd", lr=0.1)]
    assert stack_mismatch(configs[:2]).startswith("cannot train these runs in one stack: --lr is 0.01 in the first "
                                                  "and 0.001 in run 1")
    assert stack_mismatch([tiny(dropout=0.1), tiny(dropout=0.1, model_seed=1)]) == (
        "runs with dropout are trained one at a time, not in a stack")
    assert stack_mismatch([tiny(), tiny(model_seed=3, weight_noise=0.01, grad_noise=0.1, frac_train=0.4)]) is None
    # the loop itself refuses a stack it cannot train, before it writes anything
    with pytest.raises(ConfigError, match="cannot train these runs in one stack: --lr"):
        train_group(configs[:2], [tmp_path / "x0", tmp_path / "x1"], [False, False], torch.device("cpu"),
                    interrupt=_Interrupt())
    assert not (tmp_path / "x0").exists() and not (tmp_path / "x1").exists()
    results = train_many(configs, [tmp_path / f"m{i}" for i in range(3)], device="cpu", progress=False)
    for i, (config, result) in enumerate(zip(configs, results)):
        alone = train(config, tmp_path / f"alone{i}", device="cpu", progress=False).run
        assert _max_diff(result.run.state_dict(), alone.state_dict()) == 0  # a group of one is the lone trainer
    dirs = [tmp_path / "a", tmp_path / "b"]
    (tmp_path / "b").mkdir()
    with pytest.raises(RunError, match="already exists"):
        train_many([tiny(), tiny(model_seed=1)], dirs, device="cpu", progress=False)
    assert not (tmp_path / "a").exists()


def test_grid_axes_from_the_command_line():
    assert parse_grid_axis("frac_train=0.2:0.8:0.2") == ("frac_train", [0.2, 0.4, 0.6, 0.8])
    assert parse_grid_axis("frac-train=0.3,0.5") == ("frac_train", [0.3, 0.5])
    assert parse_grid_axis("op=add,x/y,perm_mul") == ("op", ["add", "x/y", "perm_mul"])
    assert parse_grid_axis("seed=0:3:1") == ("seed", [0, 1, 2, 3])
    assert parse_grid_axis("orthograd=true,off") == ("orthograd", [True, False])
    assert parse_grid_axis("weight_noise=0,0.01") == ("weight_noise", [0.0, 0.01])
    for spec, message in [("lr", "expects FIELD=VALUES"), ("learning_rate=1", "unknown config field 'learning_rate'"),
                          ("lr=1,x", "--grid lr expects numbers, got 'x'"), ("steps=1.5", "expects whole numbers"),
                          ("lr=1,,2", "comma-separated list"), ("lr=0.1,0.1", "lists 0.1 twice"),
                          ("lr=1:0:0.1", "STOP >= START"), ("lr=0:1:0", "STEP > 0"), ("orthograd=maybe", "true or false"),
                          ("seed=-1,2", ">= 0"), ("lr=1,inf", "finite")]:
        with pytest.raises(ConfigError, match=message):
            parse_grid_axis(spec)


def test_grid_members_and_names(tiny):
    members = grid_configs(tiny(), [("op", ["add", "x-y"]), ("frac_train", [0.5]), ("seed", [0, 1])])
    assert [name for name, _, _ in members] == ["add_frac0.50_seed0", "add_frac0.50_seed1", "sub_frac0.50_seed0",
                                                "sub_frac0.50_seed1"]
    name, config, values = members[3]
    assert (config.task.op, config.task.frac_train, config.model.model_seed, config.task.data_seed) == ("sub", 0.5,
                                                                                                        1, 1)
    assert values == {"op": "sub", "frac_train": 0.5, "seed": 1}
    assert member_name({"weight_noise": 0.01, "orthograd": True, "wd_target": "init"}) == (
        "weight_noise0.01_orthogradon_wd_targetinit")
    assert member_name({"frac_train": 1 / 3}) == "frac0.333333"
    with pytest.raises(ConfigError, match=r"sweep member weight_noise=-1.0: --weight-noise must be >= 0"):
        grid_configs(tiny(), [("weight_noise", [0.0, -1.0])])
    with pytest.raises(ConfigError, match="seed sets model_seed and data_seed"):
        grid_configs(tiny(), [("seed", [0]), ("model_seed", [1])])
    with pytest.raises(ConfigError, match="needs a grid"):
        grid_configs(tiny(), [])
    # the shorthand flags: fraction-major, as before
    configs = sweep_configs(tiny(), seeds=[0, 3], fracs=[0.3, 1 / 3], weight_decays=[1.0])
    assert [(c.task.frac_train, c.train.weight_decay, c.model.model_seed, c.task.data_seed) for c in configs] == [
        (0.3, 1.0, 0, 0), (0.3, 1.0, 3, 3), (1 / 3, 1.0, 0, 0), (1 / 3, 1.0, 3, 3)]
    for kwargs, message in [({"seeds": []}, "--seeds is empty"), ({"fracs": [0.5, 0.5]}, "lists 0.5 twice"),
                            ({"fracs": [1.0]}, "strictly between 0 and 1"), ({"weight_decays": [-1.0]}, "negative")]:
        grid = {"seeds": [0], "fracs": [0.5], "weight_decays": [1.0], **kwargs}
        with pytest.raises(ConfigError, match=message):
            sweep_configs(tiny(), **grid)


def test_a_sweep_continues_where_it_stopped_bit_for_bit(tmp_path, tiny):
    """Interrupted mid-run (any signal the caller names), a sweep resumes its unfinished members from their last
    checkpoints, skips finished ones, and every member ends exactly where an uninterrupted run does."""
    grid = [("frac_train", [0.4, 0.6]), ("seed", [0, 1])]
    members = grid_configs(tiny(steps=40), grid)
    folder = tmp_path / "sw"
    write_manifest(folder, tiny(steps=40), grid, members)
    assert [m.name for m in read_manifest(folder)] == [n for n, _, _ in members]
    first = run_members(folder, names=[members[0][0]], device="cpu", progress=False)  # one member alone, to the end
    assert [r.stop_reason for r in first] == ["budget"] and member_state(folder, members[0][0]) == "finished"
    finished_file = folder / members[0][0] / "trainer_state.pt"
    before = finished_file.stat().st_mtime_ns

    def terminate(step):
        if step == 17:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = run_members(folder, device="cpu", progress=False, signals=(signal.SIGTERM,), on_step=terminate)
    assert [r.stop_reason for r in stopped] == ["interrupted"] * 3 and {r.step for r in stopped} == {17}
    assert [member_state(folder, n) for n, _, _ in members] == ["finished", "partial", "partial", "partial"]
    resumed = run_members(folder, device="cpu", progress=False)
    assert [r.stop_reason for r in resumed] == ["budget"] * 3
    assert finished_file.stat().st_mtime_ns == before  # the finished member was not touched
    assert run_members(folder, device="cpu", progress=False) == []
    reference = tmp_path / "uninterrupted"  # the same groups, trained without a signal
    write_manifest(reference, tiny(steps=40), grid, members)
    run_members(reference, names=[members[0][0]], device="cpu", progress=False)
    run_members(reference, device="cpu", progress=False)
    for name, config, _ in members:
        ours, ref = load_run(folder / name), load_run(reference / name)
        # an interrupted member also keeps the checkpoint it wrote when the signal came (step 17)
        assert set(ref.steps) <= set(ours.steps) and set(ours.steps) - set(ref.steps) <= {17}
        for step in ref.steps:
            assert _max_diff(ours.state_dict(step), ref.state_dict(step)) == 0, (name, step)
        pd.testing.assert_frame_equal(ours.metrics.drop(columns="time_s"), ref.metrics.drop(columns="time_s"))
    table = results_table(folder)
    assert table.finished.all() and list(table.run) == [n for n, _, _ in members]


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
    argv = ["sweep", "--out", str(out), "--analyses-out", str(analyses), "--name", "grid", "--grid", "op=add,sub",
            "--fracs", "0.5,0.7", "--seeds", "1", "--device", "cpu", *TINY[2:]]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    names = ["add_frac0.50_seed1", "add_frac0.70_seed1", "sub_frac0.50_seed1", "sub_frac0.70_seed1"]
    assert sorted(p.name for p in (out / "grid").iterdir()) == [*names, "sweep.json"]
    manifest = json.loads((out / "grid" / "sweep.json").read_text())
    assert manifest["grid"] == [["op", ["add", "sub"]], ["frac_train", [0.5, 0.7]], ["seed", [1]]]
    assert [m["name"] for m in manifest["members"]] == names
    run = load_run(out / "grid" / names[3])
    assert run.config.task.op == "sub" and run.config.task.frac_train == 0.7
    assert run.config.model.model_seed == 1 == run.config.task.data_seed
    assert run.steps[-1] == 40 and run.metrics.train_acc.iloc[-1] == 1.0

    folder = analysis_dir(out / "grid", analyses)  # beside the members' own analyses
    assert folder == analysis_dir(out / "grid" / names[0], analyses).parent
    table = pd.read_csv(folder / "results.csv")
    assert list(table.run) == names and table.finished.all() and set(table.steps_trained) == {40}
    assert list(table.op) == ["add", "add", "sub", "sub"] and list(table.commutative) == [True, True, False, False]
    assert set(table.setting) == {"baseline"} and (table.best_val_acc <= 1).all()
    for figure in ("min-fraction", "best-val", "steps"):
        html = (folder / f"{figure}.html").read_text()
        assert len(html) > 1_000_000 and str(folder / f"{figure}.html") in stdout  # plotly.js inlined
    lines = stdout.splitlines()
    assert lines[1].split()[:4] == ["op", "frac", "train", "seed"]
    assert [line.split()[:2] for line in lines[2:6]] == [["add", "0.5"], ["add", "0.7"], ["sub", "0.5"], ["sub", "0.7"]]

    # the same command again continues the sweep: nothing left to train
    assert main(argv) == 0
    assert "4 of 4 finished; 0 trained now" in capsys.readouterr().out
    assert main(["plot", str(out / "grid"), "steps", "--analyses-out", str(analyses)]) == 0
    assert "steps: 4 finished run(s)" in capsys.readouterr().out
    assert main(["plot", str(out / "grid"), "pie", "--analyses-out", str(analyses)]) == 2
    assert "unknown figure 'pie'; choose one of: min-fraction, best-val, steps" in capsys.readouterr().err
    assert main(["train", "--resume", str(out / "grid" / names[0]), "--steps", "50", "--no-progress"]) == 0
    assert load_run(out / "grid" / names[0]).steps[-1] == 50


def _fake_member(folder, name, config, val_at, last, best):
    """A finished member whose metrics log reaches 99% validation accuracy at ``val_at`` (None: never)."""
    store = RunStore.create(folder / name, config, build_task(config.task.op, 7, 5, config.task.frac_train,
                                                              config.task.data_seed))
    steps = sorted({0, 10, last} | ({val_at} if val_at else set()))
    store.rewrite_metrics({"step": s, "train_acc": 1.0, "weight_norm_sq": 4.0,
                           "val_acc": 0.995 if val_at is not None and s >= val_at else best} for s in steps)
    store.write_trainer_state(TrainerState(last, {}, True, "budget"))


def test_results_table_and_the_population_figures(tmp_path, tiny):
    grid = [("op", ["add", "sub"]), ("weight_noise", [0.0, 0.01]), ("frac_train", [0.3, 0.6]), ("seed", [0, 1])]
    members = grid_configs(tiny(steps=500), grid)
    folder = tmp_path / "sw"
    write_manifest(folder, tiny(steps=500), grid, members)
    # add generalizes from 30% for both seeds; sub needs 60% (seed 0 only at 30%); with noise, sub never does
    reach = {("add", 0.0, 0.3): (100, 200), ("add", 0.0, 0.6): (50, 60), ("add", 0.01, 0.3): (150, 300),
             ("add", 0.01, 0.6): (80, 90), ("sub", 0.0, 0.3): (400, None), ("sub", 0.0, 0.6): (200, 250),
             ("sub", 0.01, 0.3): (None, None), ("sub", 0.01, 0.6): (None, None)}
    for name, config, values in members:
        if values == {"op": "sub", "weight_noise": 0.01, "frac_train": 0.6, "seed": 1}:
            continue  # one member never started
        val_at = reach[(values["op"], values["weight_noise"], values["frac_train"])][values["seed"]]
        _fake_member(folder, name, config, val_at, 500, best=0.4 + values["seed"] / 10)
    table = results_table(folder)
    assert list(table.columns[:7]) == ["run", "op", "commutative", "frac_train", "seed", "setting", "weight_noise"]
    assert len(table) == 16 and table.finished.sum() == 15
    missing = table[~table.finished]
    assert list(missing.run) == ["sub_weight_noise0.01_frac0.60_seed1"] and missing.stop_reason.iloc[0] == "not started"
    assert set(table.setting) == {"weight_noise=0", "weight_noise=0.01"}
    row = table[table.run == "sub_weight_noise0_frac0.30_seed0"].iloc[0]
    assert row.val_99_step == 400 and row.best_val_acc == 0.995 and row.final_weight_norm == 2.0
    assert row.steps_trained == 500 and row.budget == 500 and not row.commutative
    assert table[table.run == "sub_weight_noise0_frac0.30_seed1"].best_val_acc.iloc[0] == 0.5

    done = table[table.finished]
    summary = min_fraction(done).set_index(["op", "setting"])
    assert summary.loc[("add", "weight_noise=0"), "min_frac"] == 0.3
    assert summary.loc[("sub", "weight_noise=0"), "min_frac"] == 0.3  # half the seeds (seed 0) at 30%
    assert (summary.loc[("sub", "weight_noise=0"), "seed_low"], summary.loc[("sub", "weight_noise=0"), "seed_high"]) \
        == (0.3, 0.6)
    assert pd.isna(summary.loc[("sub", "weight_noise=0.01"), "min_frac"])
    fig = sweep_figure("min-fraction", "sw", table)
    assert "1 of 16 members not finished and left out: sub_weight_noise0.01_frac0.60_seed1" in fig.layout.title.text
    bars = {t.name: dict(zip(t.x, t.y)) for t in fig.data}
    assert bars["weight_noise=0"] == {"add (c)": 0.3, "sub": 0.3}
    assert bars["weight_noise=0.01"]["add (c)"] == 0.3 and pd.isna(bars["weight_noise=0.01"]["sub"])
    fig = sweep_figure("best-val", "sw", table)
    lines = {t.name: (list(t.x), list(t.y)) for t in fig.data}
    assert lines["sub · weight_noise=0.01"] == ([0.3, 0.6], [pytest.approx(0.45), 0.4])  # 0.6: seed 0 alone
    fig = steps_figure("t", done)
    medians = {t.name: list(t.y) for t in fig.data if t.name and "median" in t.name}
    assert medians["add · weight_noise=0 (median)"] == [150.0, 55.0]
    assert medians["sub · weight_noise=0 (median)"] == [None, 225.0]  # one of two seeds missing: no median


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
        (["--grid", "lr=0.1", "--lr", "0.2"], "--lr is set by the sweep's grid"),
        (["--grid", "weight_decay=1"], "--grid sets weight_decay twice"),
        (["--grid", "dropout=0,1"], "sweep member dropout=1.0, frac_train=0.5, weight_decay=1.0, seed=0: --dropout must lie in [0, 1)"),
        (["--grid", "loss=ce,hinge"], "unknown --loss 'hinge'"),
        (["--grid", "op=add,pow"], "unknown operation 'pow'"),
        (["--grid", "colour=red"], "unknown config field 'colour'"),
        (["--group-size", "0"], "--group-size must be at least 1"),
        (["--group-size", "two"], "invalid int value: 'two'"),
        (["--device", "tpu"], "unknown --device 'tpu'"),
        (["--name", "a/b"], "must be a plain folder name"),
    ],
)
def test_bad_sweep_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, flags, message):
    out, analyses = tmp_path / "ckpt", tmp_path / "analyses"
    tiny = TINY[2:] if any(f.startswith("op=") for f in flags) else TINY  # the grid sets the operation
    argv = ["sweep", "--out", str(out), "--analyses-out", str(analyses), "--name", "s", *tiny, *GRID, *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grokinterp: error: ") and message in err[0], err
    assert not out.exists() and not analyses.exists()


def test_sweep_needs_a_grid_and_a_folder_of_its_own(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path), *TINY]) == 2
    assert "a sweep needs a grid: give --grid FIELD=VALUES" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main(["sweep", "--out", str(tmp_path), "--name", "taken", *GRID, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep folder" in err[0] and "already exists with another grid" in err[0]
    assert not any((tmp_path / "taken").iterdir())
    assert main(["sweep", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "nowhere is not a sweep folder" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(tmp_path / "taken"), "--lr", "0.1"]) == 2
    assert "--resume continues a sweep as its sweep.json says" in capsys.readouterr().err


def test_group_size_one_trains_ordinary_runs_one_after_another(tmp_path, tiny):
    configs = _three(tiny)
    results = train_many(configs, [tmp_path / f"m{i}" for i in range(3)], device="cpu", progress=False, group_size=1)
    alone = train(configs[1], tmp_path / "alone", device="cpu", progress=False)
    assert [r.run.config for r in results] == configs
    a, b = results[1].run.state_dict(), alone.run.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)  # the ordinary trainer itself: bit for bit


def test_a_resumed_sweep_can_raise_every_budget(tmp_path, capsys):
    """`sweep --resume SWEEP --steps N` trains every run that spent its budget on to N, from its last checkpoint,
    ending bit-for-bit where a sweep given N from the start ends; a smaller budget or another flag is refused in
    one line and rewrites nothing."""
    def argv(steps, name):
        tiny = list(TINY)
        tiny[tiny.index("--steps") + 1] = str(steps)
        return ["sweep", "--out", str(tmp_path / "ckpt"), "--analyses-out", str(tmp_path / "an"), "--name", name,
                *tiny, "--seeds", "0,1", "--fracs", "0.5", "--weight-decays", "1"]

    assert main(argv(20, "short")) == 0
    folder = tmp_path / "ckpt" / "short"
    manifest = (folder / "sweep.json").read_text()
    for flags, message in ((["--steps", "10"], "--steps 10 is below the budget of frac0.50_wd1_seed0 (20)"),
                           (["--steps", "40", "--lr", "0.1"], "only --steps may be given")):
        capsys.readouterr()
        assert main(["sweep", "--resume", str(folder), "--no-progress", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert (folder / "sweep.json").read_text() == manifest
    raised = raise_budget(folder, 40, write=False)
    assert [m.config.train.steps for m in raised] == [40, 40] and (folder / "sweep.json").read_text() == manifest

    assert main(["sweep", "--resume", str(folder), "--steps", "40", "--no-progress"]) == 0
    assert [m.config.train.steps for m in read_manifest(folder)] == [40, 40]
    assert main(argv(40, "long")) == 0
    for name in ("frac0.50_wd1_seed0", "frac0.50_wd1_seed1"):
        ours, ref = load_run(folder / name), load_run(tmp_path / "ckpt" / "long" / name)
        assert ours.trainer_state.step == 40 and ours.trainer_state.finished and ours.config.train.steps == 40
        assert _max_diff(ours.state_dict(40), ref.state_dict(40)) == 0
        a, b = ours.metrics.drop(columns="time_s"), ref.metrics.drop(columns="time_s")
        common = sorted(set(a.step) & set(b.step))
        assert len(common) >= 8
        pd.testing.assert_frame_equal(a.loc[common], b.loc[common])
    assert results_table(folder).finished.all()
    assert member_state(folder, "frac0.50_wd1_seed0", budget=60) == "partial"  # a budget raised again
    raise_budget(folder, 60, write=True)
    assert not results_table(folder).finished.any() and member_state(folder, "frac0.50_wd1_seed1",
                                                                      budget=60) == "partial"
