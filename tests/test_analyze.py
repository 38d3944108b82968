import hashlib
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from grokinterp.analyze import analysis_dir, analyze, select_steps
from grokinterp.checkpoints import load_run
from grokinterp.cli import main
from grokinterp.errors import AnalysisError, RunError
from grokinterp.metrics import METRICS
from grokinterp.metrics.base import Checkpoint
from grokinterp.metrics.phases import phases_from_log
from grokinterp.metrics.weights import weight_norms
from grokinterp.trainer import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import tiny_config

    path = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(p=11, steps=40, checkpoints=4, log_checkpoints=3), path, device="cpu", progress=False)
    return load_run(path)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_phases_of_a_known_log():
    rows = [{"step": s, "train_acc": t, "val_acc": v} for s, t, v in
            [(0, 0.0, 0.0), (10, 0.6, 0.0), (20, 1.0, 0.01), (30, 1.0, 0.2), (40, 1.0, 0.7), (50, 1.0, 0.995)]]
    phases = phases_from_log(rows)
    assert (phases.train_50, phases.train_99, phases.val_50, phases.val_99) == (10, 20, 40, 50)
    assert phases.grokking_delay == 30
    assert phases.spans() == [("memorization", 0, 20), ("plateau", 20, 40), ("transition", 40, 50)]
    never = phases_from_log(rows[:3])
    assert never.val_99 is None and never.grokking_delay is None
    assert never.spans() == [("memorization", 0, 20)]


def test_weight_norms_by_component():
    state = {"embed.W_E": torch.ones(2, 3), "pos_embed.W_pos": torch.ones(1, 3), "blocks.0.attn.W_Q": 2 * torch.ones(2),
             "blocks.0.mlp.W_in": torch.ones(4), "unembed.W_U": torch.ones(5), "ln_final.w": torch.ones(1)}
    norms = weight_norms(state)
    assert norms == {"norm_sq_embed": 9.0, "norm_sq_attn": 8.0, "norm_sq_mlp": 4.0, "norm_sq_unembed": 5.0,
                     "norm_sq_ln": 1.0, "norm_sq_total": 27.0}


@pytest.fixture(scope="module")
def tiny_perm_run(tmp_path_factory):
    from conftest import tiny_config

    path = tmp_path_factory.mktemp("runs") / "s4"
    train(tiny_config(op="perm_mul", n=4, frac_train=0.5, steps=10, checkpoints=2, log_checkpoints=0), path,
          device="cpu", progress=False)
    return load_run(path)


def test_every_metric_leaves_the_weights_alone(tiny_run, tiny_perm_run):
    for name, metric in METRICS.items():
        if metric.fn is None:
            continue
        run = tiny_run if "mod" in metric.families else tiny_perm_run
        step = run.steps[-1]
        model = run.model(step)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt = Checkpoint(step, model, run.data, run.config)
        params = metric.prepare(ckpt) if metric.prepare else {}
        row = metric.fn(ckpt, **params)
        assert row and all(isinstance(v, (int, float)) for v in row.values()), name
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), name


def test_analyze_writes_a_row_per_checkpoint_and_caches(tiny_run, tmp_path):
    weights_before = {s: _digest(tiny_run.path / "weights" / f"step_{s:07d}.safetensors") for s in tiny_run.steps}
    first = analyze(tiny_run, "fourier", out_root=tmp_path, progress=False)
    table = pd.read_csv(first.csv_path)
    assert list(table.step) == tiny_run.steps and first.computed == len(tiny_run.steps)
    assert {"embed_ipr", "restricted_loss", "excluded_loss", "embed_power_k1", "embed_power_k5"} <= set(table.columns)
    assert table.filter(like="embed_power_k").sum(axis=1).round(9).eq(1).all()  # fractions of the power
    html = first.html_path.read_text()
    assert "plotly" in html and len(html) > 1_000_000  # self-contained: plotly.js is inlined
    again = analyze(tiny_run, "fourier", out_root=tmp_path, progress=False)
    assert again.computed == 0 and again.table.equals(first.table)
    assert weights_before == {s: _digest(tiny_run.path / "weights" / f"step_{s:07d}.safetensors")
                              for s in tiny_run.steps}


def test_several_metrics_read_each_checkpoint_once_and_give_the_rows_of_one_at_a_time(tiny_run, tmp_path,
                                                                                      monkeypatch):
    """``analyze_metrics`` loops over checkpoints: one read of each (plus the last, for ``prepare``) serves every
    metric, and the forward passes they share are computed once per checkpoint; the rows equal those of each
    metric analysed alone, and the cache then holds them for a single-metric call."""
    import grokinterp.metrics.base as base
    from grokinterp.analyze import analyze_metrics

    names = ["weight-norm", "fourier", "softmax-collapse", "clock-pizza", "phases"]
    alone = {name: analyze(tiny_run, name, out_root=tmp_path / "alone", progress=False).table for name in names}
    reads, forwards = [], []
    model, logits = type(tiny_run).model, base.metric_answer_logits
    monkeypatch.setattr(type(tiny_run), "model", lambda self, step=None, **kw: reads.append(step) or model(self, step, **kw))
    monkeypatch.setattr(base, "metric_answer_logits", lambda m, t: forwards.append(len(t)) or logits(m, t))
    results = analyze_metrics(tiny_run, names, out_root=tmp_path / "together", progress=False, workers=1)
    assert [r.metric for r in results] == names
    assert sorted(reads) == sorted([tiny_run.steps[-1], *tiny_run.steps])
    n_train, n_table = len(tiny_run.data.train_idx), len(tiny_run.data.labels)
    assert sorted(forwards) == sorted([n_train, n_table] * len(tiny_run.steps))  # one of each per checkpoint
    for result in results:
        pd.testing.assert_frame_equal(result.table, alone[result.metric])
        if result.metric != "phases":
            assert result.computed == len(tiny_run.steps)
            assert analyze(tiny_run, result.metric, out_root=tmp_path / "together", progress=False).computed == 0


def test_workers_give_the_rows_of_one_process_and_name_or_skip_what_they_cannot_read(tiny_run, tmp_path):
    import shutil

    from grokinterp.analyze import analyze_metrics

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.path, copy)
    run = load_run(copy)
    names = ["weight-norm", "fourier", "sharpness", "clock-pizza"]
    params = {"sharpness": {"max_samples": 4, "lanczos_iters": 4, "max_hutchinson_samples": 4}}
    for workers, device, message in ((0, "cpu", "workers must be at least 1, got 0"),
                                     (2, "cuda", "workers analyse on CPU threads; on cuda use one")):
        with pytest.raises(AnalysisError, match=message):
            analyze_metrics(run, names, out_root=tmp_path / "refused", workers=workers, device=device)
    assert not (tmp_path / "refused").exists()
    serial = analyze_metrics(run, names, out_root=tmp_path / "one", progress=False, params=params, workers=1)
    forked = analyze_metrics(run, names, out_root=tmp_path / "two", progress=False, params=params, workers=2)
    for one, two in zip(serial, forked):
        assert two.computed == len(run.steps)
        pd.testing.assert_frame_equal(one.table, two.table, rtol=1e-4)  # one thread a worker: float rounding
    # a checkpoint whose bytes no longer match its digest fails inside a worker: it is named, or skipped
    bad = run.steps[3]
    weights = copy / "weights" / f"step_{bad:07d}.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RunError, match=f"step_{bad:07d}"):
        analyze_metrics(run, names, out_root=tmp_path / "three", progress=False, params=params, workers=2)
    assert not (analysis_dir(run, tmp_path / "three") / "fourier.csv").exists()
    skipped = analyze_metrics(run, names, out_root=tmp_path / "three", progress=False, params=params, workers=2,
                              skip_corrupt=True)
    for one, result in zip(serial, skipped):
        assert result.skipped == [bad] and list(result.table.step) == [s for s in run.steps if s != bad]
        pd.testing.assert_frame_equal(result.table, one.table[one.table.step != bad].reset_index(drop=True),
                                      rtol=1e-4)


def test_ctrl_c_during_a_forked_analysis_is_one_line_and_keeps_the_finished_rows(tmp_path):
    """SIGINT reaches the parent (the workers ignore it): exit 130 with one line and no worker tracebacks, no worker
    left behind, the rows finished so far in the cache, and the same command afterwards computes only the rest."""
    import signal
    import subprocess
    import sys
    import time

    run = _tiny_run(tmp_path / "run", steps=40, checkpoints=20)
    out = tmp_path / "analyses"
    # llc with a fixed number of chains and draws: every checkpoint takes the same time (~0.3 s), so the signal
    # lands with most of them still to do
    command = [sys.executable, "-m", "grokinterp", "analyze", str(run.path), "--metric", "llc", "--out", str(out),
               "--no-progress", "--workers", "2", "--param", "n_draws=300", "--param", "rel_error=0"]
    # as from a terminal: a test run in the background (CI) inherits SIGINT ignored, and Python keeps it so
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    cache = analysis_dir(run, out) / ".cache" / "llc.jsonl"
    deadline = time.monotonic() + 120
    while not (cache.exists() and cache.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip().splitlines() == ["grokinterp: interrupted; the rows finished so far are cached: the same "
                                        "command again computes only the rest"]
    done = len([line for line in cache.read_text().splitlines() if line.strip()])
    assert 2 <= done < len(run.steps)
    rest = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0 and f"{len(run.steps) - done} checkpoint(s) computed, {done} from cache" in rest.stdout


def test_step_selection():
    steps = [0, 1, 2, 5, 10, 20, 40]
    assert select_steps(steps, None) == steps
    assert select_steps(steps, "0,10") == [0, 10]
    assert select_steps(steps, "2:10") == [2, 5, 10]
    assert select_steps(steps, "20:") == [20, 40]
    with pytest.raises(AnalysisError, match="step 7 has no checkpoint; the nearest is 5"):
        select_steps(steps, "7")
    with pytest.raises(AnalysisError, match="use 'all'"):
        select_steps(steps, "ten")
    with pytest.raises(AnalysisError, match="selects no checkpoint"):
        select_steps(steps, "100:200")


def test_corrupt_checkpoint_is_named_or_skipped(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.path, copy)
    run = load_run(copy)
    bad = run.steps[2]
    (copy / "weights" / f"step_{bad:07d}.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunError, match=f"step_{bad:07d}.safetensors is corrupt or truncated"):
        analyze(run, "weight-norm", out_root=tmp_path / "a", progress=False)
    assert not (analysis_dir(run, tmp_path / "a") / "weight-norm.csv").exists()  # no partial output
    result = analyze(run, "weight-norm", out_root=tmp_path / "a", progress=False, skip_corrupt=True)
    assert result.skipped == [bad] and bad not in list(result.table.step)
    assert len(result.table) == len(run.steps) - 1
    (copy / "weights" / f"step_{run.steps[0]:07d}.safetensors").write_bytes(b"")  # the init snapshot is gone too
    circles = analyze(run, "circles", out_root=tmp_path / "a", progress=False, skip_corrupt=True)
    points = pd.read_csv(analysis_dir(run, tmp_path / "a") / "circles_points.csv")
    assert len(circles.skipped) == 2 and not set(points.step) & {run.steps[0], bad}


def test_report_and_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "analyses"
    assert main(["analyze", str(tiny_run.path), "--metric", "all", "--out", str(out), "--no-progress"]) == 0
    folder = analysis_dir(tiny_run, out)
    assert folder.parent == out and folder.name.startswith("tiny-")  # outside ./checkpoints: name and a digest
    for name in ("phases", "weight-norm", "fourier", "circles"):
        assert (folder / f"{name}.csv").exists() and (folder / f"{name}.html").exists()
    points = pd.read_csv(folder / "circles_points.csv")
    assert points.step.min() == 0 and points.step.max() == tiny_run.steps[-1]  # snapshots from init to the end
    assert set(points.token) == set(range(11)) and "t-SNE of W_U columns" in set(points.panel)
    assert main(["report", str(tiny_run.path), "--out", str(out)]) == 0
    page = (folder / "report.html").read_text()
    assert page.count("<div") > 4 and "weight-norm" in page and "fourier" in page
    capsys.readouterr()
    assert main(["analyze", str(tiny_run.path), "--metric", "nope", "--out", str(out)]) == 2
    assert "unknown metric 'nope'; choose one of: phases, weight-norm" in capsys.readouterr().err
    assert main(["analyze", str(tiny_run.path), "--metric", "fourier", "--workers", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grokinterp: error: ") and "--workers must be at least 1, got 0" in err[0]


def test_permutation_runs_get_their_own_metrics(tiny_perm_run, tmp_path, capsys):
    assert main(["analyze", str(tiny_perm_run.path), "--metric", "fourier", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("grokinterp: error: metric 'fourier' applies to mod tasks, but run s4 is perm_mul (perm); "
                   "choose another metric")
    assert main(["analyze", str(tiny_perm_run.path), "--metric", "all", "--out", str(tmp_path), "--no-progress"]) == 0
    folder = analysis_dir(tiny_perm_run, tmp_path)
    for name in ("phases", "weight-norm", "cosets", "irreps"):
        assert (folder / f"{name}.csv").exists()
    points = pd.read_csv(folder / "cosets_points.csv")
    assert set(points.token) == set(range(24)) and points.panel.nunique() == 2  # left and right cosets of Stab(3)
    assert (points.groupby(["step", "panel"]).colour.nunique() == 4).all()  # 4 cosets of S3 in S4
    irreps = pd.read_csv(folder / "irreps.csv")
    fve = irreps.filter(like="embed_fve_").drop(columns=[c for c in irreps if c.startswith("unembed")])
    assert fve.sum(axis=1).round(6).eq(1).all()  # the centred embedding decomposes fully over the irreps


# -- the cache is keyed on what was analysed (issue 15, section 1) --------------------------------------------------

def _tiny_run(path, **overrides):
    from conftest import tiny_config

    config = tiny_config(**{"steps": 10, "checkpoints": 2, "log_checkpoints": 0, **overrides})
    train(config, path, device="cpu", progress=False)
    return load_run(path)


def _assert_own_norms(table: pd.DataFrame, run) -> None:
    """The table holds exactly the run's checkpoints, with Σ‖θ‖² of the run's own weights."""
    assert list(table.step) == run.steps
    for step, total in zip(table.step, table.norm_sq_total):
        expected = weight_norms(dict(run.model(int(step)).named_parameters()))["norm_sq_total"]
        assert total == pytest.approx(expected, rel=1e-12), step


def test_two_sweep_members_with_one_name_get_their_own_numbers_and_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    member = "frac0.30_wd1_seed0"
    runs = {"swA": _tiny_run(Path("checkpoints/swA") / member, p=11),
            "swB": _tiny_run(Path("checkpoints/swB") / member, p=13)}
    for sweep, run in runs.items():
        capsys.readouterr()
        assert main(["analyze", f"{sweep}/{member}", "--metric", "weight-norm", "--no-progress"]) == 0
        assert f"weight-norm: {len(run.steps)} checkpoint(s) computed, 0 from cache" in capsys.readouterr().out
        assert main(["report", f"{sweep}/{member}"]) == 0
    for sweep, run in runs.items():
        folder = Path("analyses") / sweep / member
        _assert_own_norms(pd.read_csv(folder / "weight-norm.csv"), run)
        assert "weight-norm" in (folder / "report.html").read_text()


def test_a_run_retrained_under_its_name_is_analysed_afresh(tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    path = Path("checkpoints") / "r"
    analyze(_tiny_run(path, model_seed=0), "weight-norm", progress=False)
    shutil.rmtree(path)
    second = _tiny_run(path, model_seed=1)
    result = analyze(second, "weight-norm", progress=False)
    assert result.computed == len(second.steps)
    _assert_own_norms(pd.read_csv(result.csv_path), second)


def test_runs_of_one_name_in_two_folders_keep_their_own_tables(tmp_path):
    a = _tiny_run(tmp_path / "dirA" / "r", steps=10)
    b = _tiny_run(tmp_path / "dirB" / "r", steps=20, checkpoints=4, model_seed=1)
    out = tmp_path / "analyses"
    first, second = (analyze(run, "weight-norm", out_root=out, progress=False) for run in (a, b))
    assert second.computed == len(b.steps) and first.csv_path.parent != second.csv_path.parent
    _assert_own_norms(pd.read_csv(first.csv_path), a)
    _assert_own_norms(pd.read_csv(second.csv_path), b)


def test_a_run_resumed_with_a_larger_budget_keeps_its_cached_rows(tmp_path):
    run = _tiny_run(tmp_path / "r", steps=10)
    before = set(run.steps)
    analyze(run, "weight-norm", out_root=tmp_path / "analyses", progress=False)
    train(run.config.replace(steps=20), run.path, resume=True, device="cpu", progress=False)
    run = load_run(run.path)  # config.json now says steps=20: only the budget changed, not the run
    result = analyze(run, "weight-norm", out_root=tmp_path / "analyses", progress=False)
    assert result.computed == len(set(run.steps) - before) > 0
    _assert_own_norms(pd.read_csv(result.csv_path), run)


def _scaled_norm(scale: float):
    from grokinterp.metrics.weights import weight_norm_metrics

    def fn(ckpt, scale=scale):
        return {"scaled": scale * weight_norm_metrics(ckpt)["norm_sq_total"]}

    return fn


def test_cached_rows_follow_every_effective_parameter_and_the_metrics_version(tiny_run, tmp_path, monkeypatch):
    import dataclasses

    base = METRICS["weight-norm"]
    n = len(tiny_run.steps)

    def run_with(fn, **changes):
        monkeypatch.setitem(METRICS, "weight-norm", dataclasses.replace(base, fn=fn, **changes))
        return analyze(tiny_run, "weight-norm", out_root=tmp_path, progress=False)

    one = run_with(_scaled_norm(1.0))
    two = run_with(_scaled_norm(2.0))  # only a default changed: the rows it served are stale
    assert two.computed == n and list(two.table.scaled) == [2 * v for v in one.table.scaled]
    assert run_with(_scaled_norm(2.0)).computed == 0
    assert run_with(_scaled_norm(2.0), version=base.version + 1).computed == n
    three = analyze(tiny_run, "weight-norm", out_root=tmp_path, progress=False, params={"scale": 3.0})
    assert three.computed == n and list(three.table.scaled) == [3 * v for v in one.table.scaled]
    with pytest.raises(AnalysisError, match="metric 'weight-norm' has no parameter 'sigma'; its parameters: scale"):
        analyze(tiny_run, "weight-norm", out_root=tmp_path, progress=False, params={"sigma": 1.0})


def test_a_cache_written_before_keys_is_never_trusted(tiny_run, tmp_path):
    import json

    from grokinterp.analyze import analysis_dir

    cache = analysis_dir(tiny_run, tmp_path) / ".cache" / "weight-norm.jsonl"
    cache.parent.mkdir(parents=True)
    old_key = hashlib.sha1(json.dumps({"params": {}, "seed": 0}, sort_keys=True).encode()).hexdigest()[:12]
    cache.write_text("".join(json.dumps({"step": s, "norm_sq_total": -1.0, "_key": old_key}) + "\n"
                             for s in tiny_run.steps))
    result = analyze(tiny_run, "weight-norm", out_root=tmp_path, progress=False)
    assert result.computed == len(tiny_run.steps)
    _assert_own_norms(pd.read_csv(result.csv_path), tiny_run)


def test_a_torn_cache_line_costs_only_itself(tiny_run, tmp_path):
    from grokinterp.analyze import analysis_dir

    analyze(tiny_run, "weight-norm", steps="0:1", out_root=tmp_path, progress=False)
    cache = analysis_dir(tiny_run, tmp_path) / ".cache" / "weight-norm.jsonl"
    with open(cache, "a") as f:
        f.write('{"key": {"format": 2, "ru')  # what a process killed mid-write leaves
    assert analyze(tiny_run, "weight-norm", out_root=tmp_path, progress=False).computed == len(tiny_run.steps) - 2
    assert analyze(tiny_run, "weight-norm", out_root=tmp_path, progress=False).computed == 0


def test_every_metric_names_its_version_and_json_parameters():
    import json

    from grokinterp.analyze import effective_params

    for name, metric in METRICS.items():
        assert isinstance(metric.version, int) and metric.version >= 1, name
        if metric.fn is not None:
            json.dumps(effective_params(metric))  # every default can go into the cache key
    assert effective_params(METRICS["sharpness"])["max_rows"] == 1024  # defaults are part of it


def test_analyze_help_lists_every_metric_with_its_description_and_parameters(capsys):
    assert main(["analyze", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps; compare with whitespace folded
    for name, metric in METRICS.items():
        assert f" {name} {' '.join(metric.description.split())[:40]}" in text, name
    assert "max_rows=INT|none" in text and "hutchinson_samples=INT" in text and "key_freqs=INTS|none" in text
    assert "threshold=FLOAT" in text and "[perm tasks]" in text


def test_params_from_the_command_line_are_typed_and_key_the_cached_rows(tiny_run, tmp_path, capsys):
    def circles(*params):
        args = ["analyze", str(tiny_run.path), "--metric", "circles", "--out", str(tmp_path), "--no-progress"]
        assert main(args + [x for p in params for x in ("--param", p)]) == 0
        out = capsys.readouterr().out
        table = pd.read_csv(analysis_dir(tiny_run, tmp_path) / "circles.csv")
        return sorted(c for c in table.columns if c.startswith("circle_k")), out

    n = len(tiny_run.steps)
    assert circles("key_freqs=1,2")[0] == ["circle_k1", "circle_k2"]
    columns, out = circles("key-freqs=1, 3")  # dashes for underscores, spaces allowed
    assert columns == ["circle_k1", "circle_k3"] and f"circles: {n} checkpoint(s) computed" in out
    assert f"circles: 0 checkpoint(s) computed, {n} from cache" in circles("key_freqs=1,3")[1]
    # with --metric all a parameter goes to every metric that takes it (fourier and circles take key_freqs)
    args = ["analyze", str(tiny_run.path), "--metric", "all", "--out", str(tmp_path), "--no-progress"]
    assert main(args + ["--param", "key_freqs=2"]) == 0
    assert [c for c in pd.read_csv(analysis_dir(tiny_run, tmp_path) / "circles.csv").columns
            if c.startswith("circle_k")] == ["circle_k2"]


@pytest.mark.parametrize("metric, param, message", [
    ("circles", "key_freqs=1,x", "--param key_freqs=1,x: circles's key_freqs takes a comma list of integers or none, "
                                 "e.g. --param key_freqs=1,14,35"),
    ("circles", "key_freqs=9", "metric 'circles': key_freqs must lie in 1..5 (p = 11), got [9]"),
    ("circles", "key_freqs=0", "metric 'circles': key_freqs must be > 0, got [0]"),
    ("fourier", "sigma=1", "--param sigma: no metric here takes it (fourier); their parameters: key_freqs"),
    ("all", "n_draws=3", "--param n_draws: no metric here takes it (phases, weight-norm, fourier, circles, sharpness, softmax-collapse, clock-pizza)"),
    ("sharpness", "max_rows", "--param 'max_rows': write NAME=VALUE"),
    ("sharpness", "sigma=-0.1", "metric 'sharpness': sigma must be > 0, got -0.1"),
    ("sharpness", "sigma=nan", "metric 'sharpness': sigma takes a number, got nan"),
    ("sharpness", "hutchinson_samples=2.5", "sharpness's hutchinson_samples takes an integer, e.g. --param "),
    ("sharpness", "acc_target=1.5", "metric 'sharpness': acc_target must be in (0, 1], got 1.5"),
    ("sharpness", "max_rows=-3", "metric 'sharpness': max_rows must be > 0, got -3"),
    ("sharpness", "rel_error=0", "metric 'sharpness': rel_error must be in (0, 1], got 0.0"),
    ("llc", "n_burnin=600", "metric 'llc': n_burnin (600) must be below n_draws (500), or no draw is kept"),
])
def test_a_bad_param_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys, metric, param, message):
    args = ["analyze", str(tiny_run.path), "--metric", metric, "--out", str(tmp_path), "--param", param]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_the_python_api_checks_params_too(tiny_run, tmp_path):
    from grokinterp.analyze import parse_param

    with pytest.raises(AnalysisError, match="lanczos_iters must be > 0, got 0"):
        analyze(tiny_run, "sharpness", out_root=tmp_path, progress=False, params={"lanczos_iters": 0})
    with pytest.raises(AnalysisError, match="eps_steps takes an integer, got 1.5"):
        analyze(tiny_run, "sharpness", out_root=tmp_path, progress=False, params={"eps_steps": 1.5})
    assert not any(tmp_path.iterdir())
    sharpness = METRICS["sharpness"]
    assert parse_param(sharpness, "max_rows", "all") is None and parse_param(sharpness, "max_rows", "64") == 64
    assert parse_param(sharpness, "magnitude_eps", "0") == 0.0  # allowed: a non-negative parameter
    assert parse_param(sharpness, "sigma", "1e-3") == 1e-3


def test_error_and_chance_columns_decorate_their_panels_instead_of_getting_their_own():
    from grokinterp.plots import metric_figure

    table = pd.DataFrame({"step": [1, 10, 100], "circle_k3": [0.5, 0.7, 1.0], "circle_chance": [0.4] * 3,
                          "circle_chance_sd": [0.05] * 3, "hessian_trace": [3.0, 5.0, 4.0],
                          "hessian_trace_se": [0.1, 0.3, 0.2], "sigma_err": [1.0, 2.0, 3.0]})
    fig = metric_figure("t", table, pd.DataFrame(), None)
    panels = [a.text for a in fig.layout.annotations if a.text in table.columns or a.text == "accuracy"]
    assert panels == ["accuracy", "circle_k3", "hessian_trace", "sigma_err"]  # an _err without its column is a panel
    trace = next(t for t in fig.data if t.name == "hessian_trace")
    assert list(trace.error_y.array) == [0.1, 0.3, 0.2]
    assert next(t for t in fig.data if t.name == "circle_k3").error_y.array is None
    chance = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(chance) == 1 and chance[0].yref == "y2"  # dashed, on the circle panel (the second) only
    assert chance[0].y0 == chance[0].y1 == pytest.approx(0.4)
    band = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(band) == 1 and (band[0].y0, band[0].y1) == pytest.approx((0.35, 0.45))


def test_irrep_names_from_the_command_line(tiny_perm_run, tmp_path, capsys):
    args = ["analyze", str(tiny_perm_run.path), "--metric", "irreps", "--out", str(tmp_path), "--no-progress"]
    assert main([*args, "--param", "key_irreps=sign"]) == 0
    table = pd.read_csv(analysis_dir(tiny_perm_run, tmp_path) / "irreps.csv")
    assert (table.restricted_loss_keys == table.restricted_loss_sign).all()
    assert main([*args, "--param", "key_irreps=standard, sign"]) == 0  # spaces allowed; a new key, recomputed
    table = pd.read_csv(analysis_dir(tiny_perm_run, tmp_path) / "irreps.csv")
    assert (table.restricted_loss_keys != table.restricted_loss_sign).all()
    capsys.readouterr()
    assert main([*args, "--param", "key_irreps=standard,bogus"]) == 2
    err = capsys.readouterr().err
    assert "S_4 has no irrep 'bogus'; choose from: " in err and err.count("\n") == 1
    help_text = " ".join(main_help(capsys).split())
    assert "key_irreps=NAMES|none" in help_text


def main_help(capsys) -> str:
    assert main(["analyze", "--help"]) == 0
    return capsys.readouterr().out


def test_phase_labels_of_short_phases_do_not_collide():
    from grokinterp.metrics.phases import Phases
    from grokinterp.plots import LABEL_ROW_PX, label_rows, training_figure

    assert label_rows([0.0, 5.0, 10.0], [2.0, 2.0, 2.0]) == [0, 0, 0]  # apart: one row
    assert label_rows([0.0, 1.0, 1.5, 6.0], [2.0, 2.0, 2.0, 2.0]) == [0, 1, 2, 0]  # close: rows below, then back up
    # a run that generalizes at 2,200-2,300 and stops at 2,600: transition and generalized are centred 0.04 decades
    # apart
    phases = Phases(train_50=100, train_99=200, val_50=2200, val_99=2300, last_step=2600)
    log = pd.DataFrame({"step": [1, 2600], "train_acc": [0.0, 1.0], "val_acc": [0.0, 1.0], "train_loss": [4.0, 1e-7],
                        "val_loss": [4.0, 1e-3]})
    fig = training_figure("t", log, phases)
    labels = [a for a in fig.layout.annotations if a.text in ("memorization", "plateau", "transition", "generalized")]
    assert len(labels) == 4
    placed = sorted(((a.yshift or 0) // -LABEL_ROW_PX, a.x, len(a.text)) for a in labels)
    decades = math.log10(2600)
    for (row_a, x_a, n_a), (row_b, x_b, n_b) in zip(placed, placed[1:]):
        if row_a == row_b:  # two labels on one row leave room for both texts
            assert x_b - x_a >= (n_a + n_b) / 2 * 6.5 / 900 * decades
    assert len({row for row, _, _ in placed}) > 1  # the layout needed a second row here
    shading = [(s.x0, s.x1) for s in fig.layout.shapes if s.type == "rect" and (s.yref, s.y0, s.y1) == ("paper", 0, 1)]
    assert shading == [(1, 200), (200, 2200), (2200, 2300), (2300, 2600)]  # one band per phase, over every panel
